"""Load any causal LM with its tokenizer, and know its family.

``load(name_or_path)`` accepts

- an embedded name: ``tiny-deepseek`` (trained, shipped in the package) or ``tiny-deepseek-random``
  (built from a config with a fixed seed; its weights are random);
- a local directory of a Hugging Face causal LM with safetensors weights;
- a hub id (``org/name``) where the machine is online.

Weights are read from safetensors only (never pickle), and ``trust_remote_code`` stays off unless the
caller turns it on.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ModelLoadError, out_of_memory

ZOO = Path(__file__).parent / "zoo"
EMBEDDED = {
    "tiny-deepseek": ZOO / "tiny_deepseek",
    "tiny-deepseek-random": ZOO / "tiny_deepseek_random",
}
RANDOM_SEED = 0
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

FAMILIES = {
    "deepseek_v3": "deepseek_v3",
    "deepseek_v32": "deepseek_v3",
    "deepseek_v2": "deepseek_v2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen2",
}


# Directory formats written elsewhere in the package: marker file -> loader(path, dtype=, device=, trust_remote_code=)
DIR_LOADERS: dict[str, Callable[..., "Loaded"]] = {}


def register_dir_loader(marker: str, loader: Callable[..., "Loaded"]) -> None:
    """Let ``load(path)`` hand a directory holding ``marker`` to ``loader``."""
    DIR_LOADERS[marker] = loader


@dataclass
class Loaded:
    """What :func:`load` returns; unpacks as ``model, tokenizer, family``."""

    model: Any
    tokenizer: Any
    family: str
    name: str
    source: str
    random_weights: bool = False
    trust_remote_code: bool = False
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.family))


def family_of(model_or_config) -> str:
    """``deepseek_v3`` (V3 and V3.2), ``deepseek_v2``, ``llama``, ``qwen2`` or ``generic``."""
    config = getattr(model_or_config, "config", model_or_config)
    return FAMILIES.get(getattr(config, "model_type", ""), "generic")


def embedded_names() -> list[str]:
    return [n for n, p in EMBEDDED.items() if (p / "config.json").exists()]


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelLoadError(f"dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)} or a torch.dtype")


def _check_local_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(
            f"no model at {str(path)!r}: expected an embedded name ({', '.join(EMBEDDED)}), "
            "a directory with config.json and *.safetensors, or a hub id"
        )
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{str(path)!r} is not a model directory: config.json is missing")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir())[:6]
        raise ModelLoadError(
            f"{str(path)!r} has no *.safetensors weights (found: {', '.join(found) or 'nothing'}); "
            "only safetensors checkpoints are loaded"
        )


def _tokenizer(path: str | Path, trust_remote_code: bool, **kw):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kw)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise ModelLoadError(f"cannot load the tokenizer of {str(path)!r}: {str(e).splitlines()[0]}") from e


def _build_random(path: Path, dtype, **kw) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32, **kw)
    return model


def load(name_or_path: str | os.PathLike, dtype=None, device: str = "cpu", trust_remote_code: bool = False,
         attn_implementation: str | None = "eager") -> Loaded:
    """Load a causal LM and its tokenizer. Returns :class:`Loaded` (unpacks as model, tokenizer, family).

    ``dtype``: None keeps the checkpoint's own dtype for local and hub models and uses fp32 for the
    embedded ones (they are meant for the CPU); ``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch dtype.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    dtype = _resolve_dtype(dtype)
    name = str(name_or_path)
    notes: list[str] = []
    random_weights = False
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if name in EMBEDDED:
            path = EMBEDDED[name]
            if not (path / "config.json").exists():
                raise ModelLoadError(
                    f"embedded model {name!r} is not in this installation; available: {', '.join(embedded_names())}"
                )
            source = "embedded"
            if name == "tiny-deepseek-random":
                model = _build_random(path, dtype, **kw)
                random_weights = True
                notes.append(
                    "tiny-deepseek-random has RANDOM weights (built from a config with a fixed seed): "
                    "its text is noise at any bit width; use tiny-deepseek to see real effects"
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    str(path), dtype=dtype or torch.float32, use_safetensors=True, **kw)
            tokenizer = _tokenizer(path, False)
        else:
            path = Path(name).expanduser()
            loader = next((f for marker, f in DIR_LOADERS.items() if (path / marker).is_file()), None)
            if loader is not None:
                return loader(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
                _check_local_dir(path)
                source = "local"
            elif name.count("/") == 1:
                source = "hub"
            else:
                raise ModelLoadError(
                    f"unknown model {name!r}: expected an embedded name ({', '.join(EMBEDDED)}), "
                    "a local directory with config.json and *.safetensors, or a hub id 'org/name'"
                )
            if trust_remote_code:
                notes.append("trust_remote_code is ON: this model's own Python code was executed")
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    str(path) if source == "local" else name, dtype=dtype or "auto", use_safetensors=True,
                    trust_remote_code=trust_remote_code, **kw)
            except ModelLoadError:
                raise
            except Exception as e:  # noqa: BLE001
                why = _diagnose(path) if source == "local" else None
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelLoadError(f"cannot load model {name!r}: {why or first}") from e
            tokenizer = _tokenizer(path if source == "local" else name, trust_remote_code)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    _check_vocab(model, tokenizer, name)
    model.eval()
    model.requires_grad_(False)
    if device and str(device) != "cpu":
        try:
            model.to(device)
        except torch.OutOfMemoryError:
            model.to("cpu")
            need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
            del model
            raise ModelLoadError(out_of_memory(f"loading {name!r} onto {device}", device, need)) from None
    if random_weights:
        warnings.warn(notes[0], stacklevel=2)
    return Loaded(model, tokenizer, family_of(model), name, source, random_weights, trust_remote_code,
                  time.perf_counter() - t0, notes)


def _diagnose(path: Path) -> str | None:
    """Why a local checkpoint does not load: weights that do not match the config, missing tensors."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        shapes: dict[str, tuple] = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    shapes[k] = tuple(h.get_slice(k).get_shape())
        with torch.device("meta"):
            ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
        expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    except Exception:  # noqa: BLE001 - the original error is reported instead
        return None
    bad = [f"{k} is {list(shapes[k])} in the weights but {list(v)} by config.json"
           for k, v in expected.items() if k in shapes and shapes[k] != v]
    if bad:
        return f"the weights do not match config.json ({len(bad)} tensor(s)): {bad[0]}"
    missing = [k for k in expected if k not in shapes and not k.endswith("lm_head.weight")]
    if missing:
        return f"{len(missing)} tensor(s) named by config.json are missing from the weights, e.g. {missing[0]}"
    return None


def _check_vocab(model, tokenizer, name: str) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is not None and tokenizer is not None and len(tokenizer) > rows:
        raise ModelLoadError(
            f"the tokenizer of {name!r} has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
            "accepted: a tokenizer whose vocabulary fits the weights"
        )


def describe(loaded: Loaded) -> dict:
    cfg = loaded.model.config
    return {
        "name": loaded.name,
        "source": loaded.source,
        "family": loaded.family,
        "model_type": getattr(cfg, "model_type", None),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "random_weights": loaded.random_weights,
        "trust_remote_code": loaded.trust_remote_code,
        "notes": loaded.notes,
    }


def read_config(path: str | os.PathLike) -> dict:
    with open(Path(path) / "config.json") as f:
        return json.load(f)
