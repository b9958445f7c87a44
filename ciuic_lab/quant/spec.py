"""QuantSpec: what one weight is turned into.

A spec is pure data (frozen, hashable) so it can key caches and be written into recipes and plans.

- ``bits``: 2, 3, 4, 5, 6, 8 for integer codes; 16 means "keep as loaded".
- ``scheme``: ``"asym"`` (min-max with an integer zero point, the classic formula) or ``"sym"``
  (scale from max |w|, the zero point fixed at 2**(bits-1)).
- ``group``: an int > 0 (that many consecutive input elements of a row share a scale; the last group
  of a row may be shorter when the row length is not a multiple), ``"channel"`` (one scale per output
  row) or ``"tensor"`` (one scale for the whole weight).
- ``format``: ``"int"`` or ``"fp8_e4m3"`` (DeepSeek-V3's own: e4m3 codes with one fp32 scale per
  128x128 block; bits, scheme and group are implied).
- ``clip``: ``"minmax"`` (plain round-to-nearest), ``"mse"`` (per-group clipping search on the weight
  error) or ``"output"`` (per-group clipping and zero point chosen on the layer's output error over
  calibration inputs).
- ``method``: ``"rtn"`` or ``"gptq"`` (error compensation with calibration data).

``clip: "output"`` and ``method: "gptq"`` read calibration statistics (``needs_calibration``): the
transforms get them from :mod:`ciuic_lab.search.calibrate`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import RecipeError

INT_BITS = (2, 3, 4, 5, 6, 8)
KEEP_BITS = 16
SCHEMES = ("asym", "sym")
FORMATS = ("int", "fp8_e4m3")
GRANULARITIES = ("channel", "tensor")
CLIPS = ("minmax", "mse", "output")
METHODS = ("rtn", "gptq")
FP8_BLOCK = 128


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 16
    scheme: str = "asym"
    group: int | str = 128
    format: str = "int"
    clip: str = "minmax"
    method: str = "rtn"

    def __post_init__(self):
        validate_spec_fields(self.bits, self.scheme, self.group, self.format, self.clip, self.method)

    # ------------------------------------------------------------------ properties
    @property
    def keep(self) -> bool:
        return self.format == "int" and self.bits == KEEP_BITS

    @property
    def is_fp8(self) -> bool:
        return self.format == "fp8_e4m3"

    @property
    def needs_calibration(self) -> bool:
        """Quantizing it needs the layer's input statistics (GPTQ, output-aware clipping)."""
        return not self.keep and not self.is_fp8 and (self.method == "gptq" or self.clip == "output")

    def group_size(self, k: int) -> int:
        """Elements per group along a row of length ``k``."""
        if self.group == "channel":
            return k
        if self.group == "tensor":
            return k
        return int(self.group)

    def label(self) -> str:
        """Short human label: ``int4 g128 asym``, ``fp8 e4m3 b128``, ``keep``."""
        if self.keep:
            return "keep"
        if self.is_fp8:
            return "fp8_e4m3 b128"
        g = f"g{self.group}" if isinstance(self.group, int) else self.group
        extra = "" if self.clip == "minmax" else f" {self.clip}"
        extra += "" if self.method == "rtn" else f" {self.method}"
        return f"int{self.bits} {g} {self.scheme}{extra}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **kw) -> "QuantSpec":
        return replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        fields = {k: d[k] for k in ("bits", "scheme", "group", "format", "clip", "method") if k in d}
        if fields.get("format") == "fp8_e4m3" or fields.get("bits") == "fp8_e4m3":
            fields["format"] = "fp8_e4m3"
            fields["bits"] = 8
            fields.setdefault("group", FP8_BLOCK)
            fields.setdefault("scheme", "sym")
        return cls(**fields)



def validate_spec_fields(bits, scheme, group, fmt, clip, method) -> None:
    """Raise RecipeError naming the bad field and what is accepted."""
    if fmt not in FORMATS:
        raise RecipeError(f"format {fmt!r} is not supported; accepted: {', '.join(FORMATS)}")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise RecipeError(
            f"bits must be an integer, got {bits!r}; accepted: {', '.join(map(str, INT_BITS))}, "
            f"16 (keep) or 'fp8_e4m3'"
        )
    if fmt == "fp8_e4m3":
        if bits != 8:
            raise RecipeError(f"fp8_e4m3 stores 8 bits, got bits={bits}")
        return
    if bits not in INT_BITS and bits != KEEP_BITS:
        raise RecipeError(
            f"bits={bits} is not supported; accepted: {', '.join(map(str, INT_BITS))}, 16 (keep) "
            f"or 'fp8_e4m3'"
        )
    if scheme not in SCHEMES:
        raise RecipeError(f"scheme {scheme!r} is not supported; accepted: {', '.join(SCHEMES)}")
    if isinstance(group, str):
        if group not in GRANULARITIES:
            raise RecipeError(
                f"group {group!r} is not supported; accepted: a positive integer, "
                f"{', '.join(repr(g) for g in GRANULARITIES)}"
            )
    elif isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        raise RecipeError(
            f"group must be a positive integer, 'channel' or 'tensor'; got {group!r}"
        )
    if clip not in CLIPS:
        raise RecipeError(f"clip {clip!r} is not supported; accepted: {', '.join(CLIPS)}")
    if method not in METHODS:
        raise RecipeError(f"method {method!r} is not supported; accepted: {', '.join(METHODS)}")


KEEP = QuantSpec()
