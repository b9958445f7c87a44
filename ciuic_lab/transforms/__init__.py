"""Apply a plan to a model (swap in quantized modules, fuse, relayout) and revert it exactly."""

from .apply import AppliedState, apply, backends_in_use, current_plan, describe, revert, state_of
from .modules import QuantEmbedding, QuantExperts, QuantLinear

__all__ = ["apply", "revert", "state_of", "current_plan", "backends_in_use", "describe", "AppliedState",
           "QuantLinear", "QuantExperts", "QuantEmbedding"]
