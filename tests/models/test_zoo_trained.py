"""The embedded tiny-deepseek model, its corpus, its trainer and its evaluation helpers."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ciuic_lab.errors import CiuicError
from ciuic_lab.models.zoo import TINY_DEEPSEEK_DIR, corpus
from ciuic_lab.models.zoo.evaluate import (
    PROMPTS,
    HELDOUT_TEXT,
    check_python,
    fake_quantize_,
    first_block,
    greedy,
    quantizable_weights,
    read_prompts,
)

MB = 1_000_000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny kernels: one thread is faster than two, and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINY_DEEPSEEK_DIR, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(TINY_DEEPSEEK_DIR)


# ------------------------------------------------------------------------------ shipped model
def test_shipped_files_are_small_bf16_shards():
    from safetensors import safe_open

    shards = sorted(TINY_DEEPSEEK_DIR.glob("*.safetensors"))
    assert shards, "no safetensors in the shipped directory"
    assert all(p.stat().st_size <= 15 * MB for p in shards)
    assert sum(p.stat().st_size for p in shards) <= 30 * MB
    dtypes = set()
    for p in shards:
        with safe_open(p, "pt") as f:
            for k in f.keys():
                dtypes.add((k.endswith("e_score_correction_bias"), f.get_slice(k).get_dtype()))
    assert {d for bias, d in dtypes if not bias} == {"BF16"}
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "MODEL_CARD.md", "loss_curve.json", "loss_curve.png", "metrics.json"):
        assert (TINY_DEEPSEEK_DIR / name).is_file(), name


def test_architecture_facts(shipped):
    model, _ = shipped
    cfg = model.config
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert cfg.q_lora_rank and cfg.kv_lora_rank  # MLA with low-rank q and kv
    assert cfg.first_k_dense_replace == 1
    assert 8 <= cfg.n_routed_experts <= 16 and cfg.num_experts_per_tok == 2 and cfg.n_shared_experts == 1
    assert cfg.n_group == 1 and cfg.topk_group == 1
    n_params = sum(p.numel() for p in model.parameters())
    assert 5e6 <= n_params <= 15e6
    layers = model.model.layers
    assert hasattr(layers[0].mlp, "gate_proj") and not hasattr(layers[0].mlp, "experts")
    for layer in layers[1:]:
        assert layer.mlp.experts.gate_up_proj.shape[0] == cfg.n_routed_experts
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 128 == 0, name
    assert 4096 <= cfg.vocab_size <= 8192


def test_tokenizer_prepends_separator_and_round_trips(shipped):
    _, tok = shipped
    src = "def f(x):\n    return {'a': x ** 2}  # ünïcode\n"
    ids = tok(src)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(corpus.SEPARATOR) == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == src
    assert 4096 <= len(tok) <= 8192


def test_greedy_completion_is_python(shipped):
    model, tok = shipped
    completion, ended = greedy(model, tok, "if __name__ == '__main__':", 48)
    text = "if __name__ == '__main__':" + completion
    cut, closed = first_block(text + ("\n" if ended else ""))
    assert closed or ended
    assert check_python(cut) is None, cut


def test_fake_quantization_int8_close_int2_far(shipped):
    model, tok = shipped
    names = [n for n, _ in quantizable_weights(model)]
    cfg = model.config
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert sum(n.endswith((".gate_up_proj", ".down_proj")) and ".experts." in n for n in names) == 2 * n_moe
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names
    ids = tok(HELDOUT_TEXT.read_text(encoding="utf-8")[:1500], return_tensors="pt").input_ids[:, :128]
    from ciuic_lab.quant import QuantSpec

    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).logits.float(), -1)
            kl = {}
            for bits in (8, 2):
                fake_quantize_(model, QuantSpec(bits=bits, group="channel"))
                lp = torch.log_softmax(model(ids).logits.float(), -1)
                kl[bits] = float((ref.exp() * (ref - lp)).sum(-1).mean())
                model.load_state_dict(state)
    finally:
        model.load_state_dict(state)
    assert kl[8] < 0.01 < 0.1 < kl[2]


def test_shipped_training_command_parses_to_its_config():
    import shlex
    from dataclasses import asdict

    from ciuic_lab.models.zoo.train import parse_args

    t = json.loads((TINY_DEEPSEEK_DIR / "metrics.json").read_text())["training"]
    argv = shlex.split(t["command"])
    assert argv[:3] == ["python", "-m", "ciuic_lab.models.zoo.train"]
    assert asdict(parse_args(argv[3:])) == t["config"]


def test_model_card_states_the_figures():
    m = json.loads((TINY_DEEPSEEK_DIR / "metrics.json").read_text())
    t, e = m["training"], m["evaluation"]
    assert t["corpus_sha256"] == corpus.REFERENCE_SHA256
    assert e["perplexity"]["model_ppl"] <= e["perplexity"]["unigram_ppl"] / 4
    card = (TINY_DEEPSEEK_DIR / "MODEL_CARD.md").read_text()
    assert f"{e['perplexity']['unigram_ppl']:.1f}" in card and f"{e['perplexity']['model_ppl']:.2f}" in card
    assert len(e["completions"]["items"]) == len(read_prompts(PROMPTS)) == 8


# ------------------------------------------------------------------------------ corpus
def test_corpus_file_lists_are_fixed():
    assert len(corpus.FILES) == len(set(corpus.FILES)) == 517
    assert set(corpus.HELDOUT) <= set(corpus.FILES) and set(corpus.EVALSET) <= set(corpus.HELDOUT)
    assert not set(corpus.TRAIN) & set(corpus.HELDOUT)
    assert not any(p.startswith(("test/", "idlelib/", "encodings/")) or "/test" in p for p in corpus.FILES)
    digest = hashlib.sha256("\n".join(corpus.FILES).encode()).hexdigest()
    assert digest == "4a65d3dee8defa2f66aa3da67f9c0270574a4a1bfaf9c1079d2c75e025212148"


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the corpus is drawn from a 3.11 standard library")
def test_corpus_rebuild_matches_reference_hash(tmp_path):
    m = corpus.build_corpus(tmp_path)
    if not m["matches_reference"]:
        pytest.skip("this 3.11 standard library differs from the 3.11.7 one the model was trained on")
    assert m["corpus_sha256"] == corpus.REFERENCE_SHA256
    assert (tmp_path / "heldout.txt").read_text().count(corpus.SEPARATOR) == len(corpus.HELDOUT) - 1
    assert corpus.evalset_text() == HELDOUT_TEXT.read_text(encoding="utf-8")


def test_corpus_rejects_a_bad_stdlib(tmp_path):
    with pytest.raises(CiuicError, match="not a Python standard library"):
        corpus.build_corpus(tmp_path / "out", stdlib=tmp_path)
    with pytest.raises(CiuicError, match="missing"):
        corpus.read_source(tmp_path, "os.py")


# ------------------------------------------------------------------------------ evaluation helpers
@pytest.mark.parametrize(
    "text, cut, closed",
    [
        ("def f(x):\n    return x\n\ndef g():\n    pass\n", "def f(x):\n    return x\n\n", True),
        ("import os\n\ndef f():\n    '''doc\nmore'''\n    return 1\nx = 2", "import os\n\ndef f():\n    '''doc\nmore'''\n    return 1\n", True),
        ("def f(x):\n    return x\n", "def f(x):\n    return x\n", False),
        ("class A:\n    def f(self):\n        return (1,\n", "class A:\n    def f(self):\n        return (1,\n", False),
        ("def f(x):\n    return x\n\n    ", "def f(x):\n    return x\n\n", False),
    ],
)
def test_first_block(text, cut, closed):
    assert first_block(text) == (cut, closed)


def test_check_python():
    assert check_python("def f():\n    return 1\n") is None
    assert "SyntaxError" in check_python("def f(:\n")


# ------------------------------------------------------------------------------ trainer
def _tiny_corpus(path: Path) -> None:
    import ciuic_lab.errors
    import ciuic_lab.quant

    qdir = Path(ciuic_lab.quant.__file__).parent
    train = {p.name: p.read_text(encoding="utf-8") for p in sorted(qdir.glob("*.py"))}
    heldout = {"errors.py": Path(ciuic_lab.errors.__file__).read_text(encoding="utf-8")}
    corpus.write_corpus(path, train, heldout)


def test_trainer_cpu_smoke_is_deterministic(tmp_path):
    from transformers import AutoModelForCausalLM

    from ciuic_lab.models.zoo.train import lr_at, main, parse_args

    _tiny_corpus(tmp_path / "corpus")
    args = ["--corpus", str(tmp_path / "corpus"), "--preset", "smoke", "--vocab-size", "320", "--steps", "5",
            "--stop-after", "2", "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--log-every", "1",
            "--eval-every", "2", "--eval-windows", "2", "--dropout", "0.1", "--device", "cpu", "--seed", "3"]
    for run in ("a", "b"):
        assert main(args + ["--out", str(tmp_path / run)]) == 0
    ca, cb = (json.loads((tmp_path / r / "loss_curve.json").read_text()) for r in ("a", "b"))
    assert ca["train_loss"] == cb["train_loss"] and ca["heldout_loss"] == cb["heldout_loss"]
    assert len(ca["train_loss"]) == 2 and all(math.isfinite(x) for x in ca["train_loss"])
    t = json.loads((tmp_path / "a" / "metrics.json").read_text())["training"]
    assert t["steps_done"] == 2 and t["config"]["seed"] == 3 and "stop-after 2" in t["stopped_early"]
    cfg = parse_args(args + ["--out", "x"])
    assert ca["lr"] == [lr_at(0, cfg), lr_at(1, cfg)] and lr_at(1, cfg) > lr_at(4, cfg)  # the 5-step schedule
    assert "--seed 3" in (tmp_path / "a" / "MODEL_CARD.md").read_text()
    with pytest.raises(CiuicError, match="vocab_size=320, not 400"):
        main([a if a != "320" else "400" for a in args] + ["--out", str(tmp_path / "c")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 320
    from safetensors.torch import load_file

    wa = {k: v for p in sorted((tmp_path / "a").glob("*.safetensors")) for k, v in load_file(p).items()}
    wb = {k: v for p in sorted((tmp_path / "b").glob("*.safetensors")) for k, v in load_file(p).items()}
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_trainer_rejects_bad_arguments(tmp_path):
    from ciuic_lab.models.zoo.train import make_config, parse_args

    with pytest.raises(CiuicError, match="unknown model preset"):
        make_config("huge", 1000)
    with pytest.raises(CiuicError, match="dropout"):
        parse_args(["--corpus", "c", "--out", "o", "--dropout", "1.5"])
    with pytest.raises(CiuicError, match="no manifest.json"):
        corpus.load_manifest(tmp_path)
