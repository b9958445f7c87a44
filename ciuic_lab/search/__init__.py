"""Search: per-site sensitivity, attribution of a plan's error, automatic allocation of formats to a
budget (bits per weight, bytes or measured latency), and calibration for error-compensating quantizers."""

from .allocate import allocate, kernel_latency, refine, uniform, verify
from .calibrate import collect_hessians, prepare_calibrated
from .sensitivity import KLProbe, SensitivityTable, attribution, label, parse_formats, sensitivity, units_of

__all__ = ["sensitivity", "attribution", "allocate", "refine", "verify", "uniform", "kernel_latency", "prepare_calibrated",
           "collect_hessians", "SensitivityTable", "KLProbe", "parse_formats", "label", "units_of"]
