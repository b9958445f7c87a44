"""What each fusion is worth: decode and prefill time with it alone and with all of them, against none.

Variants are interleaved round by round (so drift on a shared machine hits them alike) and each
variant's figure is the median over rounds of its per-round median step time; speed-ups are ratios
to the all-off variant measured in the same rounds. Also proves the point before timing it: every
variant's greedy tokens must equal the all-off ones.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from ..plan import resolve
from ..recipe import FUSIONS, load as load_recipe
from ..sites import sites as list_sites
from ..transforms import apply, revert
from ..transforms.fusions import kv_cache_report
from .snapshot import greedy, time_prefill

PROMPT = "import os\n\n\ndef read_config(path):\n    \"\"\"Read a config file.\"\"\"\n    with open(path) as f:\n"


def _variants(base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {"none": {}}
    for f in FUSIONS:
        out[f] = {f: True}
    out["all"] = {f: True for f in FUSIONS}
    return {name: {**base, "fusions": fus} for name, fus in out.items()}


@torch.no_grad()
def bench_fusions(model: nn.Module, tokenizer, recipe: Any = "keep", rounds: int = 5, new_tokens: int = 32,
                  prefill_tokens: int = 128) -> dict[str, Any]:
    base = load_recipe(recipe).to_dict()
    base.pop("fusions", None)
    site_list = list_sites(model)
    plans = {name: resolve(r, site_list) for name, r in _variants(base).items()}
    ids = tokenizer(PROMPT * 8, return_tensors="pt", verbose=False).input_ids[0][:prefill_tokens]
    tokens: dict[str, list[int]] = {}
    decode: dict[str, list[float]] = {n: [] for n in plans}
    prefill: dict[str, list[float]] = {n: [] for n in plans}
    t0 = time.perf_counter()
    try:
        for r in range(rounds + 1):  # round 0 warms up and checks the tokens
            for name, plan in plans.items():
                apply(model, plan)
                steps: list[float] = []
                out = greedy(model, tokenizer, PROMPT, new_tokens, steps)
                if r == 0:
                    tokens[name] = out
                    continue
                decode[name].append(statistics.median(steps))
                prefill[name].append(time_prefill(model, ids, repeats=1))
    finally:
        revert(model)
    off_d = statistics.median(decode["none"])
    off_p = statistics.median(prefill["none"])
    rows = []
    for name in plans:
        d, p = statistics.median(decode[name]), statistics.median(prefill[name])
        rows.append({"fusions": name, "decode_ms": d, "decode_speedup": off_d / d, "prefill_ms": p,
                     "prefill_speedup": off_p / p, "same_tokens": tokens[name] == tokens["none"]})
    cfg = getattr(model, "config", None)
    return {
        "recipe": base.get("name", "custom"),
        "rounds": rounds,
        "new_tokens": new_tokens,
        "prefill_tokens": int(ids.numel()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "kv_cache": kv_cache_report(cfg, 4) if cfg is not None and getattr(cfg, "kv_lora_rank", None) else None,
        "seconds": time.perf_counter() - t0,
    }
