"""Running out of GPU memory, for real: one clear line, and the model keeps what it had.

The GPU is filled (a tensor holding all but a few MiB) before loading or applying; afterwards the
weights are hashed against the ones before. Skips without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import ciuic_lab as cl
from ciuic_lab.errors import CiuicError, ModelLoadError
from ciuic_lab.measure import fingerprint
from ciuic_lab.transforms import state_of

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

DEV = torch.device("cuda")


def _fill(leave_mib: int):
    """Hold all but ``leave_mib`` of the GPU's free memory; returns the tensors to drop afterwards."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    hog, chunk = [], 1 << 30
    while chunk >= 1 << 20:
        free, _ = torch.cuda.mem_get_info(DEV)
        if free - chunk < leave_mib << 20:
            chunk //= 2
            continue
        try:
            hog.append(torch.empty(chunk, dtype=torch.uint8, device=DEV))
        except torch.OutOfMemoryError:
            chunk //= 2
    return hog


def test_apply_out_of_gpu_memory_is_one_line_and_the_model_is_unchanged():
    loaded = cl.load("tiny-deepseek", dtype="bf16", device="cuda")
    m = loaded.model
    ids = torch.tensor([[11, 42, 7, 300, 5, 99]], device=DEV)
    with torch.no_grad():
        base = m(ids).logits.clone()
    fp = fingerprint(m)
    sites = cl.sites(m)
    hog = _fill(leave_mib=1)
    try:
        with pytest.raises(CiuicError) as err:
            # the codes and scales of 100+ sites (and their temporaries) cannot fit in a megabyte
            cl.apply(m, cl.resolve("int4-g128", sites))
    finally:
        del hog
        torch.cuda.empty_cache()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("out of memory") and "MiB free of" in msg, msg
    assert fingerprint(m) == fp and state_of(m).plan is None
    with torch.no_grad():
        assert torch.equal(m(ids).logits, base)


def test_load_out_of_gpu_memory_is_one_line():
    hog = _fill(leave_mib=1)
    try:
        with pytest.raises(ModelLoadError) as err:
            cl.load("tiny-deepseek", dtype="fp32", device="cuda")
    finally:
        del hog
        torch.cuda.empty_cache()
    msg = str(err.value)
    assert "\n" not in msg and "out of memory" in msg and "loading 'tiny-deepseek' onto cuda" in msg, msg
    # and the machine is usable afterwards
    assert cl.load("tiny-deepseek", dtype="bf16", device="cuda").model.device.type == "cuda"
