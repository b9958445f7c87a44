"""Properties that must hold for any input, checked with hypothesis."""

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ciuic_lab as cl
from ciuic_lab.plan import SiteConfig, keep_plan
from ciuic_lab.quant import QuantSpec, dequantize, pack, quantize, unpack

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])

specs = st.builds(
    QuantSpec,
    bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
    scheme=st.sampled_from(["asym", "sym"]),
    group=st.one_of(st.sampled_from([8, 16, 32, 64, 128]), st.sampled_from(["channel", "tensor"])),
)


@FAST
@given(bits=st.integers(1, 8), rows=st.integers(1, 9), k=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_pack_unpack_identity(bits, rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, k), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, k), codes)


@FAST
@given(spec=specs, n=st.integers(1, 40), k=st.integers(1, 300), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 2**31))
def test_error_bound_per_format(spec, n, k, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale
    qt = quantize(w, spec)
    d = dequantize(qt)
    assert d.shape == w.shape and torch.isfinite(d).all()
    step = qt.group_scales().float()
    gs = k if spec.group in ("channel", "tensor") else spec.group
    step = step.repeat_interleave(gs, dim=-1)[..., :k]
    bound = 0.5 if spec.scheme == "asym" else 1.0  # sym clips the lowest code only at -amax - step
    assert ((d - w).abs() <= step * bound * (1 + 1e-3) + 1e-30).all()
    assert qt.nbytes == cl.quant.expected_nbytes((n, k), spec)


def _model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cl.load("tiny-deepseek-random")


_LOADED = _model()
_SITES = cl.sites(_LOADED.model)
_QSITES = [s for s in _SITES if not s.keep_default]
_IDS = torch.tensor([[11, 42, 7, 300, 5, 99, 1000, 3]])
with torch.no_grad():
    _BASE = _LOADED.model(_IDS).logits.clone()

config = st.builds(lambda b, sch, g: SiteConfig(QuantSpec(bits=b, scheme=sch, group=g)),
                   st.sampled_from([2, 3, 4, 8, 16]), st.sampled_from(["asym", "sym"]),
                   st.sampled_from([32, 64, 128, "channel"]))
changes = st.lists(st.tuples(st.sampled_from(_QSITES), config), min_size=1, max_size=6)
fusions = st.dictionaries(st.sampled_from(list(cl.recipe.FUSIONS)), st.booleans(), max_size=5)


@torch.no_grad()
def _logits():
    return _LOADED.model(_IDS).logits.clone()


@MODEL
@given(steps=st.lists(st.tuples(changes, fusions), min_size=1, max_size=4))
def test_any_sequence_then_revert_is_bit_exact_and_each_state_equals_a_fresh_apply(steps):
    m = _LOADED.model
    plan = keep_plan(_SITES)
    try:
        for ch, fus in steps:
            plan = plan.with_configs({s.name: c for s, c in ch})
            plan.recipe = cl.Recipe(fusions=dict(fus))
            cl.apply(m, plan)
            incremental = _logits()
            cl.apply(m, plan)  # twice equals once
            assert torch.equal(_logits(), incremental)
            cl.revert(m)
            cl.apply(m, plan)  # fresh
            assert torch.equal(_logits(), incremental)
    finally:
        cl.revert(m)
    assert torch.equal(_logits(), _BASE)
