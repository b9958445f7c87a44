"""Recipes: the user's rules, as JSON data (parsed, never evaluated).

A recipe is an ordered list of rules plus switches::

    {"name": "my-plan",
     "rules": [
        {"match": "*", "bits": 4, "group": 128},
        {"match": "attn.*", "bits": 8, "scheme": "sym", "group": "channel"},
        {"match": "model.layers.3.mlp.experts.down_proj[5]", "bits": 2},
        {"match": ["moe.expert.*"], "blocks": [1, 2], "layout": "interleaved4"}
     ],
     "fusions": {"qkv_a": true, "gate_up": true},
     "kv_cache": "latent"}

- ``match``: a glob (or a list of globs) on site names or kinds. An exact name matches itself even
  when it holds ``[...]``. Router, norms, embedding and head are kept unless a rule names them with a
  pattern that does not start with a wildcard (``head``, ``lm_head``, ``norm.*``, ``model.embed_tokens``).
- ``blocks``: optional list of block indices (or ``"a-b"`` ranges) the rule is limited to.
- Spec fields (``bits``, ``scheme``, ``group``, ``format``, ``clip``, ``method``) and ``layout``
  (``rowmajor``, ``interleaved1``, ``interleaved4``: see ``kernels/layouts.py``) / ``kernel`` (``auto`` or a
  backend name from ``ciuic-lab info``); both are checked against the kernel registry when the plan is applied. Later rules win, field by field: a rule that sets only ``bits`` keeps the scheme and group
  an earlier matching rule gave.
- ``optional``: a rule that may match nothing (presets use it so they fit every family); any other
  rule that matches no site is an error.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .quant.spec import QuantSpec, validate_spec_fields

SPEC_KEYS = ("bits", "scheme", "group", "format", "clip", "method")
RULE_KEYS = ("match", "blocks", "layout", "kernel", "optional", "note") + SPEC_KEYS
RECIPE_KEYS = ("name", "description", "rules", "fusions", "kv_cache", "device")
FUSIONS = ("qkv_a", "gate_up", "norm_fold", "mla_absorb", "moe_grouped")
KV_CACHE = ("latent", "expanded")

PRESETS: dict[str, dict[str, Any]] = {
    "int8": {
        "name": "int8",
        "description": "every linear and expert at int8 per-channel, symmetric",
        "rules": [{"match": "*", "bits": 8, "scheme": "sym", "group": "channel"}],
    },
    "int4": {
        "name": "int4",
        "description": "every linear and expert at int4 per-channel, asymmetric",
        "rules": [{"match": "*", "bits": 4, "scheme": "asym", "group": "channel"}],
    },
    "int4-g128": {
        "name": "int4-g128",
        "description": "every linear and expert at int4 with groups of 128, asymmetric",
        "rules": [{"match": "*", "bits": 4, "scheme": "asym", "group": 128}],
    },
    "int3-g128": {
        "name": "int3-g128",
        "description": "every linear and expert at int3 with groups of 128, asymmetric",
        "rules": [{"match": "*", "bits": 3, "scheme": "asym", "group": 128}],
    },
    "int2-g64": {
        "name": "int2-g64",
        "description": "every linear and expert at int2 with groups of 64, asymmetric (watch it break)",
        "rules": [{"match": "*", "bits": 2, "scheme": "asym", "group": 64}],
    },
    "fp8": {
        "name": "fp8",
        "description": "every linear and expert in fp8 e4m3 with 128x128 block scales (DeepSeek-V3's format)",
        "rules": [{"match": "*", "bits": "fp8_e4m3"}],
    },
    "mixed": {
        "name": "mixed",
        "description": "attention int8, experts and MLPs int4 g128, embedding and head kept",
        "rules": [
            {"match": "*", "bits": 4, "scheme": "asym", "group": 128},
            {"match": "attn.*", "bits": 8, "scheme": "sym", "group": "channel", "optional": True},
        ],
    },
    "keep": {"name": "keep", "description": "nothing quantized (the baseline)", "rules": []},
}


@dataclass
class Rule:
    match: tuple[str, ...]
    fields: dict[str, Any]
    blocks: tuple[int, ...] | None = None
    optional: bool = False
    index: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"match": self.match[0] if len(self.match) == 1 else list(self.match)}
        if self.blocks is not None:
            d["blocks"] = list(self.blocks)
        d.update(self.fields)
        if self.optional:
            d["optional"] = True
        return d


@dataclass
class Recipe:
    rules: list[Rule] = field(default_factory=list)
    name: str = "custom"
    description: str = ""
    fusions: dict[str, Any] = field(default_factory=dict)
    kv_cache: str = "latent"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "rules": [r.to_dict() for r in self.rules]}
        if self.description:
            d["description"] = self.description
        if self.fusions:
            d["fusions"] = dict(self.fusions)
        if self.kv_cache != "latent":
            d["kv_cache"] = self.kv_cache
        return d

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json() + "\n")


def _parse_blocks(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not v:
        raise RecipeError(f"{where}: 'blocks' must be a non-empty list of block indices or 'a-b' ranges, got {v!r}")
    out: list[int] = []
    for item in v:
        if isinstance(item, bool):
            raise RecipeError(f"{where}: block {item!r} is not an index; accepted: integers >= 0 or 'a-b'")
        if isinstance(item, int) and item >= 0:
            out.append(item)
        elif isinstance(item, str) and "-" in item:
            a, _, b = item.partition("-")
            if not (a.strip().isdigit() and b.strip().isdigit()) or int(a) > int(b):
                raise RecipeError(f"{where}: block range {item!r} is not 'a-b' with a <= b")
            out.extend(range(int(a), int(b) + 1))
        else:
            raise RecipeError(f"{where}: block {item!r} is not an index; accepted: integers >= 0 or 'a-b'")
    return tuple(out)


def _parse_rule(d: Any, i: int) -> Rule:
    where = f"rule {i + 1}"
    if not isinstance(d, dict):
        raise RecipeError(f"{where} must be an object like {{\"match\": \"attn.*\", \"bits\": 8}}, got {d!r}")
    unknown = [k for k in d if k not in RULE_KEYS]
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(RULE_KEYS)}")
    if "match" not in d:
        raise RecipeError(f"{where}: 'match' is required (a glob on site names or kinds, e.g. \"attn.*\")")
    m = d["match"]
    pats = (m,) if isinstance(m, str) else tuple(m) if isinstance(m, list) else None
    if not pats or not all(isinstance(p, str) and p for p in pats):
        raise RecipeError(f"{where}: 'match' must be a non-empty glob string or list of them, got {m!r}")
    fields = {k: d[k] for k in SPEC_KEYS + ("layout", "kernel") if k in d}
    if fields.get("bits") == "fp8_e4m3":
        fields["bits"] = 8
        fields["format"] = "fp8_e4m3"
    if "bits" in fields and (isinstance(fields["bits"], bool) or not isinstance(fields["bits"], int)):
        raise RecipeError(
            f"{where}: bits must be an integer 2, 3, 4, 5, 6, 8, 16 (keep) or 'fp8_e4m3', got {d['bits']!r}"
        )
    # validate each field alone against defaults so the message names the rule
    probe = {"bits": 4, "scheme": "asym", "group": 128, "format": "int", "clip": "minmax", "method": "rtn"}
    probe.update({k: v for k, v in fields.items() if k in SPEC_KEYS})
    if probe["format"] == "fp8_e4m3":
        probe["bits"] = 8
    try:
        validate_spec_fields(probe["bits"], probe["scheme"], probe["group"], probe["format"], probe["clip"], probe["method"])
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    for key in ("layout", "kernel"):
        if key in fields and not isinstance(fields[key], str):
            raise RecipeError(f"{where}: {key} must be a string, got {fields[key]!r}")
    blocks = _parse_blocks(d["blocks"], where) if "blocks" in d else None
    optional = d.get("optional", False)
    if not isinstance(optional, bool):
        raise RecipeError(f"{where}: 'optional' must be true or false, got {optional!r}")
    return Rule(pats, fields, blocks, optional, i)


def parse(data: Any) -> Recipe:
    """A Recipe from a dict (parsed JSON) or a list of rules. Raises RecipeError naming the problem."""
    if isinstance(data, Recipe):
        return data
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a JSON object with 'rules' (or a list of rules), got {type(data).__name__}")
    unknown = [k for k in data if k not in RECIPE_KEYS]
    if unknown:
        raise RecipeError(f"recipe: unknown key(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(RECIPE_KEYS)}")
    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, list):
        raise RecipeError(f"recipe: 'rules' must be a list, got {type(rules_raw).__name__}")
    rules = [_parse_rule(r, i) for i, r in enumerate(rules_raw)]
    fusions = data.get("fusions", {}) or {}
    if not isinstance(fusions, dict):
        raise RecipeError(f"recipe: 'fusions' must be an object of switches ({', '.join(FUSIONS)}), got {fusions!r}")
    bad = [k for k in fusions if k not in FUSIONS]
    if bad:
        raise RecipeError(f"recipe: unknown fusion(s) {', '.join(map(repr, bad))}; accepted: {', '.join(FUSIONS)}")
    nonbool = [k for k, v in fusions.items() if not isinstance(v, bool)]
    if nonbool:
        raise RecipeError(f"recipe: fusion switch(es) {', '.join(map(repr, nonbool))} must be true or false")
    kv = data.get("kv_cache", "latent")
    if kv not in KV_CACHE:
        raise RecipeError(f"recipe: kv_cache {kv!r} is not supported; accepted: {', '.join(KV_CACHE)}")
    name = data.get("name", "custom")
    if not isinstance(name, str):
        raise RecipeError(f"recipe: 'name' must be a string, got {name!r}")
    return Recipe(rules, name, str(data.get("description", "")), dict(fusions), kv)


def load(recipe: Any) -> Recipe:
    """A preset name, a path to a JSON file, a JSON string, a dict, a list of rules, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (dict, list)):
        return parse(copy.deepcopy(recipe))
    if isinstance(recipe, os.PathLike):
        recipe = str(recipe)
    if not isinstance(recipe, str):
        raise RecipeError(f"a recipe is a preset name, a JSON file or a dict; got {type(recipe).__name__}")
    if recipe in PRESETS:
        return parse(copy.deepcopy(PRESETS[recipe]))
    text = recipe.strip()
    if text.startswith(("{", "[")):
        return _parse_json(text, "recipe text")
    path = Path(recipe).expanduser()
    if path.suffix == ".json" or path.exists() or os.sep in recipe:
        if not path.exists():
            raise RecipeError(f"recipe file {recipe!r} does not exist; accepted: a preset ({', '.join(PRESETS)}) or a JSON file")
        if path.is_dir():
            raise RecipeError(f"recipe {recipe!r} is a directory; accepted: a preset ({', '.join(PRESETS)}) or a JSON file")
        return _parse_json(path.read_text(), f"recipe file {recipe!r}")
    raise RecipeError(f"unknown recipe {recipe!r}; accepted: a preset ({', '.join(PRESETS)}) or a JSON file path")


def _parse_json(text: str, where: str) -> Recipe:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return parse(data)


def spec_from_fields(fields: dict[str, Any]) -> QuantSpec:
    d = {k: fields[k] for k in SPEC_KEYS if k in fields}
    if d.get("format") == "fp8_e4m3":
        d["bits"] = 8
        d.setdefault("scheme", "sym")
        d["group"] = 128
    return QuantSpec(**d)
