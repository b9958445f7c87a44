"""The figures of an embedded model, measured on the CPU, written into its model card.

    python -m ciuic_lab.models.zoo.evaluate --model ciuic_lab/models/zoo/tiny_deepseek --corpus CORPUS

- held-out perplexity against a unigram model's on the same tokens (the unigram model counts the
  training corpus's tokens, add-one smoothed);
- greedy completions of the fixed prompts, cut at the end of the first complete block and checked
  with ``ast.parse``;
- routing load per routed expert on the held-out text;
- load time and fp32 greedy-decode speed;
- held-out perplexity after round-to-nearest per-channel fake quantization (int8, int4, int2) of
  every Linear weight and expert bank, through :mod:`ciuic_lab.quant`.

The evaluation text and prompts are ``ciuic_lab/measure/evalset/heldout.txt`` and ``prompts.json``.
``--no-write`` prints the figures without touching the model directory.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
import tokenize
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import CiuicError
from . import card
from .corpus import SEPARATOR, build_corpus, split_documents

EVALSET_DIR = Path(__file__).resolve().parents[2] / "measure" / "evalset"
HELDOUT_TEXT = EVALSET_DIR / "heldout.txt"
PROMPTS = EVALSET_DIR / "prompts.json"


def load(model_dir: str | Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CiuicError(f"{model_dir} holds no model (no config.json); accepted: a directory saved by save_pretrained")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def read_prompts(path: str | Path = PROMPTS) -> list[str]:
    prompts = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise CiuicError(f"{path} must hold a JSON list of prompt strings")
    return prompts


# ------------------------------------------------------------------------------------ perplexity
@torch.no_grad()
def token_nll(model, ids: torch.Tensor, window: int) -> torch.Tensor:
    """NLL of every token of ``ids`` but the first, each scored with up to ``window`` tokens of context
    from the start of its (non-overlapping) window."""
    out = []
    n = ids.numel()
    for s in range(0, n - 1, window):
        w = ids[s : s + window + 1][None]
        logits = model(input_ids=w[:, :-1], use_cache=False).logits.float()
        out.append(F.cross_entropy(logits[0], w[0, 1:], reduction="none"))
    return torch.cat(out)


def unigram_logprobs(train_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def encode_eval_text(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"], dtype=torch.long)


def perplexity_figures(model, tokenizer, text: str, train_ids: np.ndarray, window: int) -> dict:
    ids = encode_eval_text(tokenizer, text)
    nll = token_nll(model, ids, window)
    uni = -unigram_logprobs(train_ids, len(tokenizer))[ids[1:].numpy()]
    model_ppl = math.exp(float(nll.double().mean()))
    unigram_ppl = math.exp(float(uni.mean()))
    return {"tokens": int(nll.numel()), "window": window, "model_ppl": model_ppl, "unigram_ppl": unigram_ppl,
            "ratio": model_ppl / unigram_ppl, "pass": model_ppl <= unigram_ppl / 4}


# ------------------------------------------------------------------------------------ completions
def first_block(text: str) -> tuple[str, bool]:
    """``text`` cut at the end of its first complete indented block.

    Returns the cut text and whether the block was closed, i.e. a later line came back to the
    header's indentation (a partial last line counts: it shows where the block ended). If no block
    closes, the text less its partial last line is returned with False. Blocks are found with the
    tokenizer (so strings spanning lines are handled); where it fails (broken brackets), with the
    indentation of physical lines.
    """
    lines = text.splitlines(keepends=True)
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    depth, opened = 0, False
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.INDENT:
                depth += 1
                opened = True
            elif tok.type == tokenize.DEDENT:
                depth -= 1
                if opened and depth == 0:
                    if tok.start[0] > len(lines) or not lines[tok.start[0] - 1].strip():
                        break  # dedent at the end of the text: no line closed the block
                    return "".join(lines[: tok.start[0] - 1]), True
        return complete, False
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return _first_block_by_lines(lines, complete)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _first_block_by_lines(lines: list[str], complete: str) -> tuple[str, bool]:
    header = None
    for i, line in enumerate(lines):
        if header is None:
            if line.split("#", 1)[0].rstrip().endswith(":"):
                header = i
            continue
        if line.strip() and i > header + 1 and _indent(line) <= _indent(lines[header]):
            return "".join(lines[:i]), True
    return complete, False


def check_python(src: str) -> str | None:
    """None if ``src`` parses, else the error in one line."""
    try:
        ast.parse(src)
    except SyntaxError as e:
        return f"{type(e).__name__}: {e.msg} (line {e.lineno})"
    return None


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int, min_new_tokens: int = 0) -> tuple[str, bool]:
    """Greedy continuation of ``prompt`` (text only) and whether the model ended it with ``<|endoftext|>``."""
    ids = encode_eval_text(tokenizer, prompt)[None]
    eot = tokenizer.convert_tokens_to_ids(SEPARATOR)
    out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                         eos_token_id=eot, pad_token_id=eot)
    new = out[0, ids.shape[1] :].tolist()
    ended = eot in new
    if ended:
        new = new[: new.index(eot)]
    return tokenizer.decode(new, skip_special_tokens=True), ended


def completion_figures(model, tokenizer, prompts: list[str], max_new_tokens: int = 160) -> dict:
    items = []
    for p in prompts:
        completion, ended = greedy(model, tokenizer, p, max_new_tokens)
        text = p + completion
        cut, closed = first_block(text + ("\n" if ended and not text.endswith("\n") else ""))
        closed = closed or ended
        err = check_python(cut) if closed else "block not closed within the token budget"
        items.append({"prompt": p, "completion": completion, "ended": ended, "closed": closed, "cut": cut,
                      "valid": err is None, "error": err})
    n_valid = sum(it["valid"] for it in items)
    return {"items": items, "n_valid": n_valid, "max_new_tokens": max_new_tokens, "pass": n_valid >= 5}


# ------------------------------------------------------------------------------------ routing
@torch.no_grad()
def routing_figures(model, ids: torch.Tensor, window: int) -> dict:
    from .train import RouterMonitor, load_fractions, routers

    mon = RouterMonitor(model, 0.0)
    try:
        token_nll(model, ids, window)
        counts = mon.take_counts()
    finally:
        mon.remove()
    top_k = routers(model)[0].top_k
    fr = load_fractions(counts, top_k)
    layers = [i for i, layer in enumerate(model.model.layers) if routers(layer)]
    mx = max(max(f) for f in fr)
    mn = min(min(f) for f in fr)
    return {"top_k": top_k, "n_experts": len(fr[0]), "layers": layers, "fractions": fr, "max": mx, "min": mn,
            "pass": mx <= 0.5 and mn >= 0.01}


# ------------------------------------------------------------------------------------ speed
_LOAD_SNIPPET = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1}))
"""


def load_seconds(model_dir: Path, repeats: int = 5) -> tuple[float, float, float]:
    """Seconds to import transformers, and to ``from_pretrained`` model + tokenizer, in fresh processes:
    the median of each, and the fastest load."""
    imp, ld = [], []
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    for _ in range(repeats):
        r = subprocess.run([sys.executable, "-c", _LOAD_SNIPPET, str(model_dir)], capture_output=True, text=True,
                           env=env, check=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        imp.append(d["import"])
        ld.append(d["load"])
    return statistics.median(imp), statistics.median(ld), min(ld)


def decode_tok_s(model, tokenizer, prompt: str, new_tokens: int = 128, repeats: int = 3) -> tuple[float, int]:
    ids = encode_eval_text(tokenizer, prompt)[None]
    eot = tokenizer.convert_tokens_to_ids(SEPARATOR)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=eot, eos_token_id=eot)
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            times.append(time.perf_counter() - t)
    assert out.shape[1] - ids.shape[1] == new_tokens
    return new_tokens / statistics.median(times), int(ids.shape[1])


def speed_figures(model_dir: Path, model, tokenizer, prompt: str, repeats: int = 3, threads: int | None = None) -> dict:
    """Load time, and greedy-decode speed with one thread and with all of them.

    A model this small decodes in many tiny kernels: on a busy machine, two OpenMP threads can wait
    on each other far longer than the work takes, so both counts are measured and the best is the
    figure.
    """
    imp, ld, ld_min = load_seconds(model_dir)
    n0 = torch.get_num_threads()
    per_threads = {}
    try:
        for n in sorted({1, threads or n0}):
            torch.set_num_threads(n)
            per_threads[n], n_prompt = decode_tok_s(model, tokenizer, prompt, 128, repeats)
    finally:
        torch.set_num_threads(n0)
    best = max(per_threads, key=per_threads.get)
    loadavg = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"loadavg": loadavg, "import_seconds": imp, "load_seconds": ld, "load_seconds_min": ld_min,
            "load_repeats": 5, "load_pass": ld <= 3.0, "decode_tok_s": per_threads[best],
            "threads": best, "decode_tok_s_by_threads": {str(k): v for k, v in per_threads.items()},
            "decode_pass": per_threads[best] >= 30.0, "new_tokens": 128, "prompt_tokens": n_prompt,
            "repeats": repeats}


# ------------------------------------------------------------------------------------ quantization
def quantizable_weights(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Every Linear weight (head included) and every 3-D expert bank; not the embedding or the router."""
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out.append((f"{mname}.weight", mod.weight))
        elif type(mod).__name__.endswith("Experts"):
            for pname, p in mod.named_parameters(recurse=False):
                if p.dim() == 3:
                    out.append((f"{mname}.{pname}", p))
    return out


@torch.no_grad()
def fake_quantize_(model, spec) -> int:
    """Replace weights in place by ``dequantize(quantize(w, spec))``; return how many were changed."""
    from ...quant import dequantize, quantize

    ws = quantizable_weights(model)
    for _, p in ws:
        p.copy_(dequantize(quantize(p.data, spec)).to(p.dtype))
    return len(ws)


def quantization_figures(model, ids: torch.Tensor, window: int, bits=(8, 4, 2), tokenizer=None,
                         sample_prompt: str | None = None, sample_tokens: int = 48) -> dict:
    """Perplexity after fake quantization per bit width; with a tokenizer and a prompt, a greedy sample too."""
    from ...quant import QuantSpec

    def sample() -> str | None:
        if tokenizer is None or sample_prompt is None:
            return None
        return sample_prompt + greedy(model, tokenizer, sample_prompt, sample_tokens)[0]

    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = math.exp(float(token_nll(model, ids, window).double().mean()))
    base_sample = sample()
    rows = []
    try:
        for b in bits:
            spec = QuantSpec(bits=b, group="channel")
            n = fake_quantize_(model, spec)
            p = math.exp(float(token_nll(model, ids, window).double().mean()))
            rows.append({"bits": b, "label": spec.label(), "weights": n, "ppl": p, "change": p / base - 1,
                         "sample": sample()})
            model.load_state_dict(base_state)
    finally:
        model.load_state_dict(base_state)
    by_bits = {r["bits"]: r for r in rows}
    out = {"baseline_ppl": base, "baseline_sample": base_sample, "rows": rows}
    if 8 in by_bits:
        out["int8_change"] = by_bits[8]["change"]
        out["int8_pass"] = abs(by_bits[8]["change"]) < 0.01
    if 2 in by_bits:
        out["int2_factor"] = by_bits[2]["ppl"] / base
        out["int2_pass"] = by_bits[2]["ppl"] / base >= 2.0
    return out


# ------------------------------------------------------------------------------------ driver
def training_token_ids(tokenizer, corpus: str | Path | None) -> np.ndarray:
    """Training-corpus token ids with the model's own tokenizer (the corpus is rebuilt if not given)."""
    import tempfile

    if corpus is not None and (Path(corpus) / "train.txt").is_file():
        text = (Path(corpus) / "train.txt").read_text(encoding="utf-8")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build_corpus(tmp)
            text = (Path(tmp) / "train.txt").read_text(encoding="utf-8")
    from .tokenizer import encode_documents

    return encode_documents(tokenizer, split_documents(text), tokenizer.convert_tokens_to_ids(SEPARATOR))


PARTS = ("perplexity", "completions", "routing", "speed", "quantization")


def evaluate(model_dir: str | Path, corpus: str | Path | None = None, text_path: Path = HELDOUT_TEXT,
             prompts_path: Path = PROMPTS, window: int = 512, quant_bits=(8, 4, 2), parts=PARTS,
             speed_threads: int | None = None) -> dict:
    """The figures named in ``parts`` (all by default), as a dict keyed like :data:`PARTS`."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise CiuicError(f"unknown evaluation part(s) {', '.join(bad)}; accepted: {', '.join(PARTS)}")
    import transformers

    model_dir = Path(model_dir)
    model, tok = load(model_dir)
    text = Path(text_path).read_text(encoding="utf-8")
    ids = encode_eval_text(tok, text)
    prompts = read_prompts(prompts_path)
    e = {"device": f"CPU ({os.cpu_count()} cores), torch {torch.__version__}, transformers {transformers.__version__}"}
    if "perplexity" in parts:
        e["perplexity"] = perplexity_figures(model, tok, text, training_token_ids(tok, corpus), window)
    if "completions" in parts:
        e["completions"] = completion_figures(model, tok, prompts)
    if "routing" in parts:
        e["routing"] = routing_figures(model, ids, window)
    if "speed" in parts:
        e["speed"] = speed_figures(model_dir, model, tok, prompts[0], threads=speed_threads)
    if "quantization" in parts:
        e["quantization"] = quantization_figures(model, ids, window, quant_bits, tok, prompts[0])
    return e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ciuic_lab.models.zoo.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a model directory (e.g. ciuic_lab/models/zoo/tiny_deepseek)")
    ap.add_argument("--corpus", default=None, help="corpus directory (default: rebuild from this Python's stdlib)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--no-write", action="store_true", help="print the figures only")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for everything but the decode-speed figure, which tries 1 and all (default 1)")
    ap.add_argument("--only", nargs="+", default=list(PARTS), metavar="PART",
                    help=f"measure only these parts and merge them into the model's metrics ({', '.join(PARTS)})")
    args = ap.parse_args(argv)
    all_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    new = evaluate(args.model, args.corpus, window=args.window, parts=args.only, speed_threads=all_threads)
    cmd = "python -m ciuic_lab.models.zoo.evaluate --model " + str(args.model) + (
        f" --corpus {args.corpus}" if args.corpus else "")
    e = dict(card.read_metrics(args.model).get("evaluation", {})) if set(args.only) != set(PARTS) else {}
    commands = dict(e.get("commands", {}))
    for part in args.only:
        e[part] = new[part]
        commands[part] = cmd + ("" if set(args.only) == set(PARTS) else " --only " + " ".join(args.only))
    e.update(command=cmd, commands=commands, device=new["device"])
    if not args.no_write:
        card.update_metrics(args.model, {"evaluation": e})
        card.render(args.model)
    g = lambda part, key: e.get(part, {}).get(key)  # noqa: E731
    summary = {
        "model_ppl": g("perplexity", "model_ppl"), "unigram_ppl": g("perplexity", "unigram_ppl"),
        "valid_completions": g("completions", "n_valid"), "routing_max": g("routing", "max"),
        "routing_min": g("routing", "min"), "load_s": g("speed", "load_seconds"),
        "decode_tok_s": g("speed", "decode_tok_s"), "baseline_ppl": g("quantization", "baseline_ppl"),
        "quant": {r["label"]: round(r["ppl"], 3) for r in (g("quantization", "rows") or [])},
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
