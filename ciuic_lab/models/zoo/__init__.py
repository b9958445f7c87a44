"""Embedded models: shipped weights, tokenizer and config, with the scripts that made them.

``tiny-deepseek`` (directory :data:`TINY_DEEPSEEK_DIR`) is a small DeepSeek-V3-architecture model
trained on the Python standard library's source; it loads with transformers' ``from_pretrained``.
"""

from pathlib import Path

TINY_DEEPSEEK_DIR = Path(__file__).resolve().parent / "tiny_deepseek"

__all__ = ["TINY_DEEPSEEK_DIR"]
