"""Fusions on a GPU (skips without one).

Unquantized, every fusion on gives the unfused model's greedy tokens. With int4 on the CUDA kernels
(which take bf16 activations, so a fusion that moves a rounding point changes the last bits) the
fused and unfused quantized models agree to bf16 precision; norm_fold is left out there because it
changes the weights that are quantized (W * gamma instead of W), by design.
"""

from __future__ import annotations

import pytest
import torch

import ciuic_lab as cl
from ciuic_lab.models.cache import cache_kwargs, cache_of

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

ALL = {"qkv_a": True, "gate_up": True, "norm_fold": True, "mla_absorb": True, "moe_grouped": True}


@pytest.fixture(scope="module")
def loaded():
    return cl.load("tiny-deepseek", dtype="fp32", device="cuda")


def _ids(tok):
    return tok("def fibonacci(n):\n    ", return_tensors="pt").input_ids.to("cuda")


def test_every_fusion_on_the_gpu_gives_the_same_tokens(loaded):
    m, tok = loaded.model, loaded.tokenizer
    ids = _ids(tok)
    with torch.no_grad():
        plain = m.generate(ids, max_new_tokens=24, do_sample=False)
        cl.apply(m, cl.resolve({"rules": [], "fusions": ALL}, cl.sites(m)))
        try:
            fused = m.generate(ids, max_new_tokens=24, do_sample=False)
        finally:
            cl.revert(m)
    assert torch.equal(plain, fused)


def _int4_unfused_and_fused(m, logits_of, on_fused=None):
    """``logits_of(m)`` with int4 g128 on the CUDA kernels, without fusions and with every one but
    norm_fold (``on_fused(m)`` runs while those are applied); the model is reverted afterwards."""
    sites = cl.sites(m)
    rules = [{"match": "*", "bits": 4, "group": 128}]
    fus = {k: v for k, v in ALL.items() if k != "norm_fold"}
    with torch.no_grad():
        try:
            cl.apply(m, cl.resolve({"rules": rules}, sites))
            a = logits_of(m)
            cl.apply(m, cl.resolve({"rules": rules, "fusions": fus}, sites))
            b = logits_of(m)
            if on_fused is not None:
                on_fused(m)
        finally:
            cl.revert(m)
    return a, b


def test_fusions_with_int4_on_the_cuda_kernels_agree_to_bf16_precision(loaded):
    ids = _ids(loaded.tokenizer)
    a, b = _int4_unfused_and_fused(loaded.model, lambda m: m(ids).logits[0, -1].double())
    assert float((a - b).norm() / a.norm()) < 2e-2
    assert int(a.argmax()) == int(b.argmax())


def test_bf16_norm_and_softmax_round_once_like_the_fp32_forms():
    from ciuic_lab.transforms.fusions import rms_unscaled

    g = torch.Generator(device="cuda").manual_seed(3)
    for n in (7, 513, 1536):
        x = (torch.randn(3, n, device="cuda", generator=g) * 3).to(torch.bfloat16)
        want = torch.nn.functional.rms_norm(x.float(), (n,), None, 1e-6).to(torch.bfloat16)
        torch.testing.assert_close(rms_unscaled(x, (n,), 1e-6), want, rtol=2 ** -7, atol=1e-6)
        s = x * 2
        want = torch.softmax(s, -1, dtype=torch.float32).to(torch.bfloat16)
        torch.testing.assert_close(torch.softmax(s, -1), want, rtol=2 ** -7, atol=1e-6)


def test_bf16_decode_with_every_fusion_and_int4_agrees_with_unfused():
    from ciuic_lab.transforms.fusions import FusedMoE

    lo = cl.load("tiny-deepseek", dtype="bf16", device="cuda")
    ids = _ids(lo.tokenizer)
    nxt = []  # the unfused model's next token, fed to both decode steps

    def step_logits(m):
        out = m(ids, use_cache=True)
        nxt.append(nxt[0] if nxt else out.logits[:, -1:].argmax(-1))
        return m(nxt[0], **cache_kwargs(m, cache_of(out)), use_cache=True).logits[0, -1].double()

    def shared_expert_in_the_grouped_launch(m):
        moes = [mod for mod in m.modules() if isinstance(mod, FusedMoE)]
        assert moes and all(mod._shared[1] is not None for mod in moes)

    a, b = _int4_unfused_and_fused(lo.model, step_logits, shared_expert_in_the_grouped_launch)
    assert float((a - b).norm() / a.norm()) < 3e-2
    assert int(a.argmax()) == int(b.argmax())
