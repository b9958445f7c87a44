"""Take an optimized model elsewhere.

- :func:`save` / :func:`load_saved`: the project's own format, restored bit for bit (``ciuic_lab.load(dir)``
  reads it too);
- :func:`export_gguf`: llama.cpp's GGUF, one type per tensor, our codes written as they are where the
  block math is ours;
- :func:`export_compressed`: a compressed-tensors checkpoint (vLLM, transformers);
- :func:`compile_plan`: the plan as llama.cpp's ``--tensor-type-file``, torchao's ``FqnToConfig`` or
  GPTQModel's ``dynamic`` map.

The GGUF and compressed-tensors writers import their packages (``gguf``, ``compressed-tensors``) when
called, not before.
"""

from .. import models as _models
from .ciuic import MARKER, is_saved, load_as_loaded, load_saved, save
from .compressed import export_compressed
from .gguf_export import export_gguf, read_gguf
from .plans import compile_plan

# ciuic_lab.load(dir) reads a saved directory through the loader registered for its marker file
_register = getattr(_models, "register_dir_loader", None)
if _register is not None:
    _register(MARKER, load_as_loaded)

__all__ = ["save", "load_saved", "is_saved", "MARKER", "export_gguf", "read_gguf", "export_compressed", "compile_plan"]
