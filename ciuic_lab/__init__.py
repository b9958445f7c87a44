"""Ciuic Lab: a workbench for making DeepSeek models (and any Hugging Face causal LM) cheaper to run,
layer by layer.

    import ciuic_lab as cl
    model, tok, family = cl.load("tiny-deepseek")
    plan = cl.resolve("mixed", cl.sites(model))
    cl.apply(model, plan)
    ...
    cl.revert(model)      # bit-exactly as loaded
"""

from .errors import CiuicError, KernelError, ModelLoadError, RecipeError, SafetyError
from .models import load
from .optimize import baseline, compare, evaluate_plan, safe_optimize
from .plan import Plan, SiteConfig, resolve
from .quant import QTensor, QuantSpec, dequantize, quantize
from .recipe import PRESETS, Recipe
from .recipe import load as load_recipe
from .sites import Site, sites
from .transforms import apply, revert
from .export import save

__version__ = "0.1.0"


def __getattr__(name: str):
    # The notebook front end (ipywidgets, plotly) loads only when asked for.
    if name in ("Workbench", "Session"):
        if name == "Workbench":
            from .panels import Workbench as obj
        else:
            from .session import Session as obj
        return obj
    raise AttributeError(f"module 'ciuic_lab' has no attribute {name!r}")

__all__ = [
    "load", "save", "sites", "Site", "QuantSpec", "QTensor", "quantize", "dequantize", "Recipe", "PRESETS",
    "load_recipe", "resolve", "Plan", "SiteConfig", "apply", "revert", "compare", "baseline",
    "evaluate_plan", "safe_optimize", "CiuicError", "RecipeError", "ModelLoadError", "KernelError",
    "SafetyError", "Workbench", "Session", "__version__",
]
