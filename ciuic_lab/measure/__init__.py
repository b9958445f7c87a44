"""Measure: compare baseline and candidate on the same inputs (text, KL, top-1, perplexity, per-site
error, latency, bytes)."""

from .compare import compare, first_divergence, kl_top1, site_errors, weight_bytes
from .evalset import EvalSet, evalset
from .snapshot import Snapshot, fingerprint, greedy, snapshot

__all__ = ["EvalSet", "evalset", "Snapshot", "snapshot", "compare", "kl_top1", "site_errors", "weight_bytes",
           "fingerprint", "greedy", "first_divergence"]
