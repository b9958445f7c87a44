"""Pure tensor maths of quantization: specs, quantize/dequantize, bit packing. No modules, no models."""

from .core import QTensor, concat_rows, dequantize, expected_nbytes, quantize
from .pack import pack, row_bytes, unpack
from .spec import KEEP, QuantSpec

__all__ = ["QuantSpec", "KEEP", "QTensor", "concat_rows", "quantize", "dequantize", "expected_nbytes", "pack", "unpack", "row_bytes"]
