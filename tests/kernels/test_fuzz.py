"""Every available backend against the torch reference on 500 random shapes and formats.

The CPU backend runs here; the CUDA backend runs where a GPU is (the same module, on the lent GPU:
``python -m ciuic_lab.kernels.fuzz --backend cuda --cases 500``). The seed is in every failure.

Each group size is a kernel of its own for the Numba backend, compiled on first use: drawing all six
costs about three minutes on a cold cache, most of this suite's cold-start time. So the suite draws
every bit width, scheme, layout and shape, but two group sizes per run: 128 (the default, which
the other tests compile anyway) and one more, chosen at random each run and named in the failures.
``python -m ciuic_lab.kernels.fuzz --backend numba --cases 500`` draws them all.
"""

import random

import pytest
import torch

from ciuic_lab.errors import KernelError
from ciuic_lab.kernels import REGISTRY
from ciuic_lab.kernels.fuzz import GROUPS, available_backends, fuzz_backend, main

CASES = 500


@pytest.mark.parametrize("name", ["numba", "cuda"])
def test_backend_agrees_with_the_reference_on_random_cases(name):
    if name not in available_backends():
        pytest.skip(f"{name}: {REGISTRY.get(name).available()[1]}")
    groups = (128, random.choice([g for g in GROUPS if g != 128])) if name == "numba" else GROUPS
    rep = fuzz_backend(name, CASES, groups=groups)
    assert rep.cases == CASES
    assert not rep.failures, (f"{len(rep.failures)} of {CASES} failed (seed {rep.seed}, groups {groups}):\n"
                              + "\n".join(rep.failures[:10]))
    # the draw covers what the backend takes: every layout, several bit widths
    assert set(rep.by_layout) == set(REGISTRY.get(name).layouts)
    assert len(rep.by_format) >= (4 if name == "numba" else 3)


def test_a_wrong_answer_is_caught(monkeypatch):
    """The fuzzer is not blind: a backend that is off by a little fails its cases."""
    if "numba" not in available_backends():
        pytest.skip("numba is not available")
    numba = REGISTRY.get("numba")
    real = numba.linear
    monkeypatch.setattr(numba, "linear", lambda x, p, b=None: real(x, p, b) * 1.01)
    rep = fuzz_backend("numba", 20, seed=3, groups=(128,))
    assert len(rep.failures) == 20 and "rel err" in rep.failures[0]


def test_unavailable_backend_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(KernelError, match="cuda.*not available"):
        fuzz_backend("cuda", 1)


def test_cli_reports_counts(capsys):
    if "numba" not in available_backends():
        pytest.skip("numba is not available")
    assert main(["--backend", "numba", "--cases", "12", "--seed", "1", "--groups", "128,channel"]) == 0
    assert "numba: 12 cases, 0 failed" in capsys.readouterr().out
    with pytest.raises(KernelError, match="fuzz groups .*96.* accepted"):
        fuzz_backend("numba", 1, groups=(96,))
