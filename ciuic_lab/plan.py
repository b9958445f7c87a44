"""Plans: a recipe resolved against a model's sites into one concrete config per site.

``resolve(recipe, sites)`` folds the recipe's rules over every site (later rules win, field by field)
and checks what can only be checked against real shapes (a group that does not divide a row, a rule
that matches nothing). Plans are data: they compare, diff, serialize and summarize without a model.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import RecipeError
from .quant import QuantSpec, expected_nbytes
from .quant.spec import KEEP
from .recipe import Recipe, Rule, load as load_recipe, spec_from_fields
from .sites import Site, kinds

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class SiteConfig:
    spec: QuantSpec = KEEP
    layout: str = "rowmajor"
    kernel: str = "auto"

    @property
    def keep(self) -> bool:
        return self.spec.keep

    def to_dict(self) -> dict[str, Any]:
        d = self.spec.to_dict()
        d["layout"] = self.layout
        d["kernel"] = self.kernel
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiteConfig":
        return cls(spec_from_fields(d), d.get("layout", "rowmajor"), d.get("kernel", "auto"))


KEEP_CONFIG = SiteConfig()


@dataclass
class Plan:
    configs: dict[str, SiteConfig]
    sites: dict[str, Site]
    recipe: Recipe = field(default_factory=Recipe)

    # ----------------------------------------------------------- queries
    def __getitem__(self, name: str) -> SiteConfig:
        return self.configs[name]

    def quantized(self) -> list[str]:
        return [n for n, c in self.configs.items() if not c.keep]

    def bytes_of(self, name: str, dtype_bytes: int | None = None) -> int:
        site = self.sites[name]
        c = self.configs[name]
        db = dtype_bytes or DTYPE_BYTES.get(site.dtype, 4)
        return expected_nbytes(site.shape, c.spec, db)

    def summary(self) -> dict[str, Any]:
        """Bits per weight and bytes, predicted from the specs (what apply will store)."""
        q_params = q_bytes = q_before = q_bf16 = 0
        all_before = all_after = all_params = 0
        for name, site in self.sites.items():
            before = site.params * DTYPE_BYTES.get(site.dtype, 4)
            after = self.bytes_of(name)
            all_params += site.params
            all_before += before
            all_after += after
            if not self.configs[name].keep:
                q_params += site.params
                q_bytes += after
                q_before += before
                q_bf16 += site.params * 2
        return {
            "sites": len(self.sites),
            "quantized_sites": len(self.quantized()),
            "params": all_params,
            "quantized_params": q_params,
            "bits_per_weight": 8.0 * all_after / max(all_params, 1),
            "quantized_bits_per_weight": 8.0 * q_bytes / q_params if q_params else None,
            "weight_bytes": {"before": all_before, "after": all_after},
            "quantized_site_bytes": {"before": q_before, "after": q_bytes, "bf16": q_bf16},
        }

    def by_kind(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, site in self.sites.items():
            label = self.configs[name].spec.label()
            out.setdefault(site.kind, {}).setdefault(label, 0)
            out[site.kind][label] += 1
        return out

    # ----------------------------------------------------------- comparison
    def diff(self, other: "Plan") -> list[tuple[str, SiteConfig | None, SiteConfig | None]]:
        """Sites whose config differs: (name, config here, config in other)."""
        out = []
        for name in list(self.configs) + [n for n in other.configs if n not in self.configs]:
            a, b = self.configs.get(name), other.configs.get(name)
            if a != b:
                out.append((name, a, b))
        return out

    def with_configs(self, changes: dict[str, SiteConfig]) -> "Plan":
        unknown = [n for n in changes if n not in self.sites]
        if unknown:
            raise RecipeError(f"unknown site(s) {', '.join(unknown[:3])}; see `ciuic-lab layers` for names")
        cfg = dict(self.configs)
        cfg.update(changes)
        for n, c in changes.items():
            _check_fits(self.sites[n], c, "change")
        return Plan(cfg, self.sites, self.recipe)

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and self.configs == other.configs and self.recipe.fusions == other.recipe.fusions

    # ----------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(),
            "sites": {n: c.to_dict() for n, c in self.configs.items() if not c.keep},
            "summary": self.summary(),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def as_recipe(self, name: str = "exported") -> Recipe:
        """One exact-name rule per quantized site: a recipe that resolves back to this plan."""
        rules = []
        for i, (n, c) in enumerate(self.configs.items()):
            if c.keep:
                continue
            f = {k: v for k, v in c.spec.to_dict().items()}
            if c.spec.is_fp8:
                f = {"bits": 8, "format": "fp8_e4m3"}
            else:
                f.pop("format")
                if f.get("clip") == "minmax":
                    f.pop("clip")
                if f.get("method") == "rtn":
                    f.pop("method")
            if c.layout != "rowmajor":
                f["layout"] = c.layout
            if c.kernel != "auto":
                f["kernel"] = c.kernel
            rules.append(Rule((n,), f, None, False, len(rules)))
        return Recipe(rules, name, self.recipe.description, dict(self.recipe.fusions), self.recipe.kv_cache)


# ------------------------------------------------------------------ matching
def _literal_prefix(pattern: str) -> str:
    for i, ch in enumerate(pattern):
        if ch in "*?[":
            return pattern[:i]
    return pattern


def matches(pattern: str, site: Site) -> bool:
    """Does ``pattern`` select ``site``? Exact names first, then globs on the name and the kind."""
    if pattern in (site.name, site.kind):
        hit = True
    else:
        hit = fnmatch.fnmatchcase(site.name, pattern) or fnmatch.fnmatchcase(site.kind, pattern)
    if hit and site.keep_default and not _literal_prefix(pattern):
        return False  # kept-by-default sites need a rule that names them
    return hit


def _rule_selects(rule: Rule, site: Site) -> bool:
    if rule.blocks is not None and site.block not in rule.blocks:
        return False
    return any(matches(p, site) for p in rule.match)


def _check_fits(site: Site, cfg: SiteConfig, where: str) -> None:
    spec = cfg.spec
    if spec.keep or spec.is_fp8:
        return
    if site.role == "norm" or len(site.shape) < 2:
        if isinstance(spec.group, int) and site.k % spec.group:
            raise RecipeError(
                f"{where}: group {spec.group} does not divide the length {site.k} of {site.name}; "
                f"accepted: a divisor of {site.k}, 'channel' or 'tensor'"
            )
        return
    if isinstance(spec.group, int) and site.k % spec.group:
        divisors = [g for g in (32, 64, 128, 256) if site.k % g == 0]
        hint = ", ".join(map(str, divisors)) if divisors else f"a divisor of {site.k}"
        raise RecipeError(
            f"{where}: group {spec.group} does not divide the row length {site.k} of {site.name} "
            f"(kind {site.kind}); accepted: {hint}, 'channel' or 'tensor'"
        )


def resolve(recipe: Any, site_list: Iterable[Site]) -> Plan:
    """One concrete :class:`SiteConfig` per site. Raises RecipeError naming the rule and the site."""
    rec = load_recipe(recipe)
    site_list = list(site_list)
    configs: dict[str, SiteConfig] = {}
    hits = [0] * len(rec.rules)
    for site in site_list:
        fields: dict[str, Any] = {}
        touched = None
        for i, rule in enumerate(rec.rules):
            if _rule_selects(rule, site):
                hits[i] += 1
                f = dict(rule.fields)
                if "bits" in f and "format" not in f:
                    f["format"] = "int"
                fields.update(f)
                touched = rule
        if touched is None or fields.get("bits", 16) == 16 and fields.get("format", "int") == "int":
            cfg = SiteConfig(KEEP, fields.get("layout", "rowmajor"), fields.get("kernel", "auto"))
            configs[site.name] = cfg if touched else KEEP_CONFIG
            continue
        try:
            spec = spec_from_fields(fields)
        except RecipeError as e:
            raise RecipeError(f"rule {touched.index + 1} on {site.name}: {e}") from None
        cfg = SiteConfig(spec, fields.get("layout", "rowmajor"), fields.get("kernel", "auto"))
        _check_fits(site, cfg, f"rule {touched.index + 1}")
        configs[site.name] = cfg
    for i, rule in enumerate(rec.rules):
        if hits[i] == 0 and not rule.optional:
            ks = ", ".join(kinds(site_list)[:12])
            raise RecipeError(
                f"rule {i + 1} (match {', '.join(rule.match)}) matches no site; site kinds here: {ks}; "
                "names as in `ciuic-lab layers`"
            )
    return Plan(configs, {s.name: s for s in site_list}, rec)


def keep_plan(site_list: Iterable[Site]) -> Plan:
    site_list = list(site_list)
    return Plan({s.name: KEEP_CONFIG for s in site_list}, {s.name: s for s in site_list}, Recipe(name="keep"))


def from_dict(d: dict[str, Any], site_list: Iterable[Site]) -> Plan:
    """Rebuild a plan written by :meth:`Plan.to_dict`."""
    base = keep_plan(site_list)
    changes = {n: SiteConfig.from_dict(c) for n, c in d.get("sites", {}).items()}
    plan = base.with_configs(changes)
    plan.recipe = load_recipe(d.get("recipe", {"rules": []}))
    return plan
