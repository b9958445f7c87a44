import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny():
    """A fresh tiny-deepseek-random (random weights, fixed seed): model, tokenizer, family."""
    from ciuic_lab import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load("tiny-deepseek-random")


@pytest.fixture
def tiny_sites(tiny):
    from ciuic_lab import sites

    return sites(tiny.model)


@pytest.fixture
def ids(tiny):
    return tiny.tokenizer("def is_prime(n):\n    if n < 2:\n        return False\n", return_tensors="pt").input_ids
