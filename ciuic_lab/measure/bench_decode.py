"""``ciuic-lab bench decode --device cpu``: end-to-end decode tokens/s, quantized plan vs fp32 and bf16.

Two models: the embedded one (``tiny-deepseek``, or whatever ``model`` names) and a ~1 B-parameter
DeepSeek-V3-architecture model built from a config with random weights (MLA attention, one dense
layer then MoE layers with a shared expert; timing does not depend on the weights' values).

For each model the same prompt is prefilled, then ``new_tokens`` tokens are decoded greedily one at a
time with the KV cache; only the decode steps are timed (median per-token time over ``rounds``
rounds, after a warm-up round). Rows: torch fp32, torch bf16 (the model cast to bf16), and the plan
(``recipe``, default :data:`DECODE_RECIPE`: int4 with groups of 128 and every fusion, as on the GPU)
applied on the fp32 model, running on whatever backend the kernel registry picks (the numba kernels
on a CPU that has them). ``speedup_vs_fp32`` compares per-token
medians taken in the same run; ``backends`` counts the sites by what ran them in the last step
(``transforms.backends_in_use``, as the GPU benchmark reports them: ``simulated`` for routers and norms).
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
import warnings
from collections import Counter
from typing import Any, Callable

import torch

from ..models.cache import greedy_steps
from ..recipe import FUSIONS, PRESETS

# The decode benchmarks' default plan (CPU and GPU): int4 with groups of 128 and every fusion, the form
# in which the kernels carry a decode step (without the fusions the experts run one launch each)
DECODE_RECIPE: dict[str, Any] = {
    **PRESETS["int4-g128"],
    "name": "int4-g128-fused",
    "description": PRESETS["int4-g128"]["description"] + "; every fusion on",
    "fusions": {f: True for f in FUSIONS},
}


# about 1.1 B parameters: 12 layers (1 dense + 11 MoE with 8 routed experts, 4 active, 1 shared), MLA
LARGE_CONFIG: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
    num_hidden_layers=12, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=4,
    n_shared_experts=1, n_group=1, topk_group=1, num_attention_heads=16, num_key_value_heads=16,
    q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    max_position_embeddings=4096, tie_word_embeddings=False, routed_scaling_factor=1.0,
    norm_topk_prob=True,
)
QUICK_CONFIG: dict[str, Any] = dict(LARGE_CONFIG, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                    q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
                                    v_head_dim=32, vocab_size=2048)


def build_large(config: dict[str, Any] | None = None, seed: int = 0) -> torch.nn.Module:
    """A DeepSeek-V3-architecture causal LM from a config, random weights (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = DeepseekV3Config(**(config or LARGE_CONFIG))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.requires_grad_(False)
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def decode_times(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[list[float], list[int]]:
    """Greedy decode with the KV cache; per-token wall times of the decode steps and the tokens."""
    steps = greedy_steps(model, prompt)
    next(steps)  # the prompt's forward
    times, toks = [], []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        toks.append(int(next(steps)))
        times.append(time.perf_counter() - t0)
    return times, toks


def _time_variant(model, prompt, new_tokens, rounds) -> dict[str, Any]:
    decode_times(model, prompt, min(4, new_tokens))  # warm-up: kernels loaded, caches sized
    per_round = []
    for _ in range(rounds):
        ts, _ = decode_times(model, prompt, new_tokens)
        per_round.append(statistics.median(ts))
    ms = statistics.median(per_round) * 1e3
    return {"ms_per_token": round(ms, 3), "tokens_per_s": round(1e3 / ms, 2)}


def bench_model(model: torch.nn.Module, name: str, recipe: Any = None, new_tokens: int = 32,
                rounds: int = 3, prompt_len: int = 16, layout: str | None = None) -> list[dict[str, Any]]:
    """fp32, plan-on-fp32 and bf16 rows for one model (the model is left as it came, in fp32)."""
    from ..plan import resolve
    from ..recipe import load as load_recipe
    from ..sites import sites
    from ..transforms import apply, backends_in_use, revert

    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    params = n_params(model)
    rows = []

    def row(variant, res, extra=None):
        r = {"model": name, "params_m": round(params / 1e6, 1), "variant": variant, **res}
        r.update(extra or {})
        rows.append(r)

    fp32 = _time_variant(model, prompt, new_tokens, rounds)
    row("torch fp32", fp32)

    rec = load_recipe(DECODE_RECIPE if recipe is None else recipe)
    if layout:
        rec = copy.deepcopy(rec)
        for rule in rec.rules:
            rule.fields["layout"] = layout
    plan = resolve(rec, sites(model))
    t0 = time.perf_counter()
    apply(model, plan)
    apply_s = time.perf_counter() - t0
    try:
        q = _time_variant(model, prompt, new_tokens, rounds)
        backends = dict(Counter(backends_in_use(model).values()))
    finally:
        revert(model)
    fp32_again = _time_variant(model, prompt, new_tokens, max(1, rounds // 2))  # drift check, same run
    ref_ms = statistics.median([fp32["ms_per_token"], fp32_again["ms_per_token"]])
    row(f"plan {rec.name or 'recipe'}" + (f" ({layout})" if layout else ""), q,
        {"speedup_vs_fp32": round(ref_ms / q["ms_per_token"], 3), "apply_s": round(apply_s, 1),
         "backends": backends})
    rows[0]["speedup_vs_fp32"] = 1.0
    rows[0]["ms_per_token_rerun"] = fp32_again["ms_per_token"]

    bf = copy.deepcopy(model).to(torch.bfloat16) if params < 5e7 else model.to(torch.bfloat16)
    try:
        b = _time_variant(bf, prompt, new_tokens, rounds)
    finally:
        if bf is model:
            model.to(torch.float32)
        del bf
        gc.collect()
    row("torch bf16", b, {"speedup_vs_fp32": round(ref_ms / b["ms_per_token"], 3)})
    return rows


def _each_model(model: str | None, quick: bool, large: bool, dtype: str,
                run: Callable[[torch.nn.Module, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``run(module, name)``'s rows for the embedded model (or ``model``) and, when ``large``, the ~1 B
    DeepSeek-architecture one (the small one when ``quick``), each loaded in ``dtype`` and let go after."""
    from ..models import _resolve_dtype, load

    rows: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load(model or "tiny-deepseek", dtype=dtype)
    rows += run(loaded.model, loaded.name)
    del loaded
    gc.collect()
    if large:
        big = build_large(QUICK_CONFIG if quick else LARGE_CONFIG).to(_resolve_dtype(dtype))
        name = "deepseek-v3-arch random " + (f"{n_params(big) / 1e6:.0f}M" if quick else
                                             f"{n_params(big) / 1e9:.2f}B")
        rows += run(big, name)
        del big
        gc.collect()
    return rows


def _cpu_info() -> dict[str, Any]:
    from ..kernels import compat

    info = compat.report()
    return {"device": "cpu", "cpu": info["cpu"]["model"], "usable_cpus": info["cpu"]["usable"],
            "torch_threads": torch.get_num_threads()}


def bench_decode(model: str | None = None, quick: bool = False, recipe: Any = None,
                 new_tokens: int | None = None, rounds: int | None = None, large: bool = True,
                 layout: str | None = None) -> dict[str, Any]:
    """Decode tokens/s for the embedded model and a ~1 B DeepSeek-architecture model; JSON-able."""
    from ..recipe import load as load_recipe

    recipe = load_recipe(DECODE_RECIPE if recipe is None else recipe)  # a bad recipe fails before any timing
    new_tokens = new_tokens or (6 if quick else 32)
    rounds = rounds or (1 if quick else 3)
    rows = _each_model(model, quick, large, "fp32",
                       lambda m, name: bench_model(m, name, recipe, new_tokens, rounds, layout=layout))
    return {
        **_cpu_info(),
        "recipe": recipe.name,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "method": "median per-token decode time (batch 1, KV cache, greedy) after a warm-up; ratios within one run",
        "rows": rows,
    }


def prefill_model(model: torch.nn.Module, name: str, recipe: Any, tokens: int, repeats: int) -> dict[str, Any]:
    """One prompt of ``tokens`` tokens through ``model`` as it is, with the plan, and as it is again
    (the two as-loaded times bracket the plan's, in the same run); the model is left as it came."""
    from ..plan import resolve
    from ..sites import sites
    from ..transforms import apply, revert
    from .snapshot import time_prefill

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=gen)
    before = time_prefill(model, ids, repeats)
    apply(model, resolve(recipe, sites(model)))
    try:
        plan = time_prefill(model, ids, repeats)
    finally:
        revert(model)
    again = time_prefill(model, ids, repeats)
    ref = (before + again) / 2
    return {"model": name, "params_m": round(n_params(model) / 1e6, 1),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "as_loaded_ms": round(before, 2), "as_loaded_again_ms": round(again, 2), "plan_ms": round(plan, 2),
            "plan_time_vs_as_loaded": round(plan / ref, 3)}


def bench_prefill(model: str | None = None, quick: bool = False, recipe: Any = None, dtype: str | None = None,
                  tokens: int | None = None, repeats: int | None = None, large: bool = True) -> dict[str, Any]:
    """Prefill time of one prompt, a plan against the model as loaded (``dtype``: fp32 by default, bf16
    to see the bf16 GEMM path), for the embedded model and the ~1 B DeepSeek-architecture one."""
    from ..recipe import load as load_recipe

    rec = load_recipe(DECODE_RECIPE if recipe is None else recipe)  # a bad recipe fails before any timing
    tokens = tokens or (64 if quick else 256)
    repeats = repeats or (1 if quick else 3)
    rows = _each_model(model, quick, large, dtype or "fp32",
                       lambda m, name: [prefill_model(m, name, rec, tokens, repeats)])
    return {
        **_cpu_info(),
        "recipe": rec.name,
        "tokens": tokens,
        "repeats": repeats,
        "method": "median wall time of one prompt's forward (no cache) after a warm-up; as loaded before and "
                  "after the plan, the ratio against their mean",
        "rows": rows,
    }


__all__ = ["bench_decode", "bench_model", "bench_prefill", "build_large", "decode_times", "prefill_model",
           "DECODE_RECIPE", "LARGE_CONFIG"]
