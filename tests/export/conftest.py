import pytest

from export_helpers import MIXED, applied_tiny


@pytest.fixture(scope="module")
def mixed():
    """tiny-deepseek-random with the MIXED plan applied (shared: tests must not change it)."""
    return applied_tiny(MIXED)


@pytest.fixture(scope="module")
def prompt_ids(mixed):
    return mixed.tokenizer("def is_prime(n):\n    if n < 2:\n        return False\n", return_tensors="pt").input_ids
