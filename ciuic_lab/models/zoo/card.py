"""The model card of an embedded model: ``metrics.json`` in, ``MODEL_CARD.md`` out.

``metrics.json`` holds a ``training`` section (written by :mod:`.train`) and an ``evaluation``
section (written by :mod:`.evaluate`); the card is re-rendered from both whenever either changes,
so every figure in it has one source.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def update_metrics(model_dir: str | Path, sections: dict) -> dict:
    """Merge top-level ``sections`` into ``metrics.json`` (each section replaced whole)."""
    m = read_metrics(model_dir)
    m.update(sections)
    (Path(model_dir) / "metrics.json").write_text(json.dumps(m, indent=1) + "\n", encoding="utf-8")
    return m


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def _arch_table(cfg: dict, n_params: int | None) -> list[str]:
    rows = [
        ("architecture", f"`{cfg.get('architectures', ['?'])[0]}` (`model_type` {cfg.get('model_type')})"),
        ("parameters", _fmt_params(n_params) if n_params else "?"),
        ("layers", f"{cfg['num_hidden_layers']} ({cfg['first_k_dense_replace']} dense, "
                   f"{cfg['num_hidden_layers'] - cfg['first_k_dense_replace']} MoE)"),
        ("hidden size", cfg["hidden_size"]),
        ("attention", f"MLA, {cfg['num_attention_heads']} heads, q_lora_rank {cfg['q_lora_rank']}, "
                      f"kv_lora_rank {cfg['kv_lora_rank']}, qk_nope {cfg['qk_nope_head_dim']} + qk_rope "
                      f"{cfg['qk_rope_head_dim']}, v {cfg['v_head_dim']}"),
        ("dense MLP", f"SwiGLU, intermediate {cfg['intermediate_size']}"),
        ("MoE", f"{cfg['n_routed_experts']} routed experts (intermediate {cfg['moe_intermediate_size']}), "
                f"top-{cfg['num_experts_per_tok']}, {cfg['n_shared_experts']} shared expert, sigmoid router "
                f"with correction bias, n_group {cfg['n_group']}"),
        ("vocabulary", f"{cfg['vocab_size']} (byte-level BPE), untied head"
         if not cfg.get("tie_word_embeddings") else f"{cfg['vocab_size']} (byte-level BPE), tied head"),
        ("context", cfg["max_position_embeddings"]),
        ("weights on disk", f"{cfg.get('dtype') or cfg.get('torch_dtype')} safetensors"),
    ]
    return ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]


def _training_section(t: dict) -> list[str]:
    c = t["config"]
    lines = [
        "## Training",
        "",
        f"- Command: `{t['command']}`",
        f"- Corpus sha256 `{t['corpus_sha256']}`: {t['corpus_files']['train']} training files "
        f"({t['corpus_bytes']['train'] / 1e6:.2f} MB, {t['tokens']['train']:,} tokens, "
        f"{t['bytes_per_token']} bytes/token) and {t['corpus_files']['heldout']} held-out modules "
        f"({t['tokens']['heldout']:,} tokens).",
        f"- {t.get('steps_done', c['steps'])} steps"
        + (f" (of a {c['steps']}-step schedule)" if t.get("steps_done", c["steps"]) != c["steps"] else "")
        + f" of {c['batch_size']} x {c['seq_len']} tokens ({t['tokens_seen'] / 1e6:.1f} M tokens, "
        f"{t['epochs']} epochs); AdamW (lr {c['lr']}, betas {c['beta1']}/{c['beta2']}, weight decay "
        f"{c['weight_decay']}), {c['warmup']} warm-up steps then cosine to {c['min_lr_ratio']} x lr, gradient "
        f"clip {c['grad_clip']}, residual dropout {c['dropout']}, seed {c['seed']}.",
        f"- Routing balance: router correction bias updated by {c['bias_update_rate']} x sign(load - mean) "
        f"after each step, plus a batch-wise balance loss of weight {c['aux_loss_coef']}.",
        f"- Precision {t['amp']} autocast, experts implementation `{t['experts_implementation']}`, "
        f"attention `{c['attn_implementation']}`.",
        f"- Wall time: {t['train_seconds']:.0f} s of training ({t['total_seconds']:.0f} s in all) on {t['device']}; "
        + ", ".join(f"{k} {v}" for k, v in t["versions"].items() if k != "gpu") + ".",
        f"- Final loss: train {t['final_train_loss']:.4f}, held-out {t['final_heldout_loss']:.4f} "
        f"(perplexity {t['final_heldout_ppl']:.2f} on the held-out modules, windows of {c['seq_len']}).",
    ]
    if t.get("stopped_early"):
        lines.append(f"- Stopped early: {t['stopped_early']}.")
    if t.get("selection"):
        lines.append(f"- Selection: {t['selection']}")
    lines.append("")
    if t.get("loss_curve_png"):
        lines += ["![loss curve](loss_curve.png)", ""]
    lines += ["The numbers behind the curve are in `loss_curve.json`.", ""]
    return lines


def _evaluation_section(e: dict) -> list[str]:
    lines = ["## Figures", "", f"Measured with `{e['command']}` on {e['device']} (fp32 unless stated).", ""]
    redone = {c for c in e.get("commands", {}).values() if c != e["command"]}
    for c in sorted(redone):
        parts = ", ".join(k for k, v in e["commands"].items() if v == c)
        lines += [f"Re-measured later ({parts}): `{c}`.", ""]
    p = e["perplexity"]
    lines += [
        "### Held-out perplexity",
        "",
        f"On `ciuic_lab/measure/evalset/heldout.txt` ({p['tokens']:,} scored tokens, windows of {p['window']}):",
        "",
        "| model | perplexity |",
        "| --- | --- |",
        f"| unigram (training-token frequencies, add-one) | {p['unigram_ppl']:.1f} |",
        f"| tiny-deepseek | {p['model_ppl']:.2f} |",
        "",
        f"Ratio {p['ratio']:.4f} (requirement: at most 0.25) — {'pass' if p['pass'] else 'FAIL'}.",
        "",
    ]
    c = e["completions"]
    lines += [
        "### Greedy completions",
        "",
        f"{c['n_valid']} of {len(c['items'])} are valid Python when cut at the end of the first complete block "
        f"(requirement: at least 5) — {'pass' if c['pass'] else 'FAIL'}. Up to {c['max_new_tokens']} new tokens, "
        "greedy; the cut text is shown, with the prompt.",
        "",
    ]
    for it in c["items"]:
        status = "valid" if it["valid"] else f"invalid ({it['error']})"
        lines += [f"**`{it['prompt']!r}`** — {status}", "", "```python", it["cut"].rstrip("\n"), "```", ""]
    r = e["routing"]
    lines += [
        "### Routing",
        "",
        f"Fraction of held-out tokens routed to each expert (a token picks {r['top_k']}; "
        f"balanced is {r['top_k'] / r['n_experts']:.1%}):",
        "",
        "| layer | " + " | ".join(f"e{i}" for i in range(r["n_experts"])) + " | max | min |",
        "| --- |" + " --- |" * (r["n_experts"] + 2),
    ]
    for layer, fr in zip(r["layers"], r["fractions"]):
        lines.append(f"| {layer} | " + " | ".join(f"{x:.1%}" for x in fr) + f" | {max(fr):.1%} | {min(fr):.1%} |")
    lines += ["", f"Max {r['max']:.1%}, min {r['min']:.1%} (requirement: none over 50%, none under 1%) — "
              f"{'pass' if r['pass'] else 'FAIL'}.", ""]
    s = e["speed"]
    lines += [
        "### Speed on the CPU",
        "",
        f"- `from_pretrained` of model + tokenizer, fp32: {s['load_seconds']:.2f} s (median of "
        f"{s.get('load_repeats', s['repeats'])} fresh processes"
        + (f", fastest {s['load_seconds_min']:.2f} s" if "load_seconds_min" in s else "")
        + f"; importing transformers before it: {s['import_seconds']:.2f} s) — "
        f"{'pass' if s['load_pass'] else 'FAIL'} (at most 3 s).",
        *([f"- Machine load average during the measurement: {s['loadavg']}."] if s.get("loadavg") else []),
        f"- Greedy decode, fp32, batch 1, {s['new_tokens']} new tokens after a {s['prompt_tokens']}-token prompt, "
        f"best of " + ", ".join(f"{v:.1f} tokens/s with {k} thread{'s' if k != '1' else ''}"
                                for k, v in s.get('decode_tok_s_by_threads', {str(s['threads']): s['decode_tok_s']}).items())
        + f" (median of {s['repeats']} each): {s['decode_tok_s']:.1f} tokens/s — "
        f"{'pass' if s['decode_pass'] else 'FAIL'} (at least 30).",
        "",
    ]
    q = e["quantization"]
    lines += [
        "### Quantization (round-to-nearest, per output channel)",
        "",
        "Every Linear weight (head included) and every expert bank fake-quantized with `ciuic_lab.quant` "
        "(quantize then dequantize), embedding and router kept:",
        "",
        "| weights | held-out perplexity | change |",
        "| --- | --- | --- |",
        f"| fp32 (from bf16) | {q['baseline_ppl']:.3f} | |",
    ]
    for row in q["rows"]:
        lines.append(f"| {row['label']} | {row['ppl']:.3f} | {row['change']:+.2%} |")
    lines += ["", f"int8 moves perplexity by {q['int8_change']:+.2%} (requirement: under 1%) — "
              f"{'pass' if q['int8_pass'] else 'FAIL'}; int2 multiplies it by {q['int2_factor']:.1f} "
              f"— {'visibly broken' if q['int2_pass'] else 'NOT broken'}.", ""]
    if q.get("baseline_sample"):
        lines += ["Greedy continuation of the first prompt (48 new tokens) at each width:", ""]
        for label, text in [("fp32", q["baseline_sample"])] + [(r["label"], r.get("sample")) for r in q["rows"]]:
            if text:
                lines += [f"*{label}*", "", "```python", text.rstrip("\n"), "```", ""]
    return lines


def render(model_dir: str | Path) -> str:
    """Write ``MODEL_CARD.md`` from ``config.json`` and ``metrics.json``; return its text."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    m = read_metrics(model_dir)
    t, e = m.get("training"), m.get("evaluation")
    n_params = t["parameters"] if t else None
    lines = [
        "# tiny-deepseek",
        "",
        "A small DeepSeek-V3-architecture causal language model trained on the Python standard library's "
        "source. It ships inside Ciuic Lab so that every notebook and demo runs with no model hub and no GPU, "
        "on a model whose outputs are real: quantization visibly breaks it at 2 bits and leaves it alone at 8.",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from ciuic_lab.models.zoo import TINY_DEEPSEEK_DIR",
        "",
        "tok = AutoTokenizer.from_pretrained(TINY_DEEPSEEK_DIR)",
        "model = AutoModelForCausalLM.from_pretrained(TINY_DEEPSEEK_DIR, dtype=torch.float32)",
        "ids = tok('def is_prime(n):', return_tensors='pt').input_ids",
        "print(tok.decode(model.generate(ids, max_new_tokens=64, do_sample=False)[0], skip_special_tokens=True))",
        "```",
        "",
        "The tokenizer prepends `<|endoftext|>` (id 0), the document separator of the training text, to every "
        "input: a prompt starts where a file starts.",
        "",
        "## Architecture",
        "",
        *_arch_table(cfg, n_params),
        "",
    ]
    if t:
        lines += _training_section(t)
    if e:
        lines += _evaluation_section(e)
    lines += [
        "## Data and licence",
        "",
        "Training text: the source of the CPython 3.11 standard library (a fixed list of modules and packages, "
        "tests, IDLE, demos, codec tables and generated files left out; see `ciuic_lab/models/zoo/corpus.py`). "
        "Copyright (c) 2001-2023 Python Software Foundation, used under the PSF License Agreement "
        "(https://docs.python.org/3/license.html). Held out of training, and used for every held-out figure: "
        "`bisect`, `calendar`, `colorsys`, `fnmatch`, `fractions`, `graphlib`, `heapq`, `json.decoder`, "
        "`json.encoder`, `queue`, `sched`, `shlex`, `statistics`, `string`, `textwrap`.",
        "",
        "Rebuild: `python -m ciuic_lab.models.zoo.corpus --out CORPUS`, "
        "`python -m ciuic_lab.models.zoo.tokenizer --corpus CORPUS`, then the training command above with "
        "`--corpus CORPUS --out DIR`, then `python -m ciuic_lab.models.zoo.evaluate --model DIR --corpus CORPUS`.",
        "",
    ]
    text = "\n".join(lines)
    (model_dir / "MODEL_CARD.md").write_text(text, encoding="utf-8")
    return text


def ppl(loss: float) -> float:
    return math.exp(loss)
