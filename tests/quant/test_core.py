import math

import pytest
import torch

from ciuic_lab.errors import CiuicError, RecipeError
from ciuic_lab.quant import QuantSpec, dequantize, expected_nbytes, quantize
from ciuic_lab.quant.pack import unpack

GROUPS = [32, 64, 128, 100, "channel", "tensor"]


def _steps(qt, k):
    s = qt.group_scales().float()
    g = k if qt.spec.group in ("channel", "tensor") else qt.spec.group
    return s.repeat_interleave(g, dim=-1)[..., :k]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", GROUPS)
def test_asym_rtn_within_half_a_step(bits, group):
    g = torch.Generator().manual_seed(bits * 7 + len(str(group)))
    w = torch.randn(2, 37, 301, generator=g) * 0.05 + 0.01
    qt = quantize(w, QuantSpec(bits=bits, scheme="asym", group=group))
    err = (dequantize(qt) - w).abs() / _steps(qt, 301)
    assert err.max() <= 0.5 + 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [64, "channel"])
def test_sym_error_bound_and_zero_exact(bits, group):
    w = torch.randn(33, 256)
    w[:, 5] = 0.0
    qt = quantize(w, QuantSpec(bits=bits, scheme="sym", group=group))
    d = dequantize(qt)
    assert qt.zeros is None
    assert torch.all(d[:, 5] == 0)
    assert ((d - w).abs() / _steps(qt, 256)).max() <= 0.5 + 1e-4


def test_codes_reconstruct_exactly():
    w = torch.randn(16, 96)
    qt = quantize(w, QuantSpec(bits=4, group=32))
    q = unpack(qt.codes, 4, 96).float()
    s = qt.scales.float().repeat_interleave(32, -1)
    z = qt.zeros.float().repeat_interleave(32, -1)
    assert torch.equal((q - z) * s, dequantize(qt, torch.float32))
    assert int(q.max()) <= 15


@pytest.mark.parametrize("bits,group,expected", [(4, 128, 4 + 24 / 128), (8, 128, 8 + 24 / 128), (2, 64, 2 + 24 / 64)])
def test_bits_per_weight_counts_scales_and_zeros(bits, group, expected):
    qt = quantize(torch.randn(64, 512), QuantSpec(bits=bits, group=group))
    assert math.isclose(qt.bits_per_weight, expected)
    assert qt.nbytes == expected_nbytes((64, 512), qt.spec)


def test_more_bits_less_error():
    w = torch.randn(64, 512)
    errs = [float((dequantize(quantize(w, QuantSpec(bits=b, group=128))) - w).norm() / w.norm()) for b in (2, 3, 4, 5, 6, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 0.01 and errs[0] > 0.2


def test_mse_clipping_beats_minmax_at_low_bits():
    w = torch.randn(128, 512)
    plain = dequantize(quantize(w, QuantSpec(bits=3, group=128)))
    clipped = dequantize(quantize(w, QuantSpec(bits=3, group=128, clip="mse")))
    assert (clipped - w).pow(2).sum() < (plain - w).pow(2).sum()


def test_fp8_blocks():
    w = torch.randn(300, 200) * 3
    qt = quantize(w, QuantSpec.from_dict({"format": "fp8_e4m3"}))
    assert qt.codes.shape == (300, 200) and qt.scales.shape == (3, 2)
    d = dequantize(qt)
    assert float((d - w).norm() / w.norm()) < 0.05
    assert qt.nbytes == 300 * 200 + 6 * 4


def test_bank_leading_dims_and_indexing():
    w = torch.randn(4, 24, 64)
    qt = quantize(w, QuantSpec(bits=4, group=32))
    assert torch.equal(dequantize(qt[2]), dequantize(qt)[2])


def test_bf16_roundtrip_dtype():
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    assert dequantize(quantize(w, QuantSpec(bits=8, group=64))).dtype == torch.bfloat16


def test_all_zero_rows_and_constant_groups():
    w = torch.zeros(4, 64)
    w[1] = 0.3
    d = dequantize(quantize(w, QuantSpec(bits=4, group=32)))
    assert torch.allclose(d, w, atol=0.3 / 15)
    assert torch.all(d[0] == 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(4, 64)
    w[1, 3] = bad
    with pytest.raises(CiuicError, match="NaN/Inf"):
        quantize(w, QuantSpec(bits=4))


@pytest.mark.parametrize("kw", [dict(bits=1), dict(bits=9), dict(bits=3.5), dict(bits="four"), dict(group=0),
                                dict(group=-32), dict(scheme="nf4"), dict(group="row")])
def test_bad_specs(kw):
    with pytest.raises(RecipeError):
        QuantSpec(**{"bits": 4, **kw})


def test_keep_is_not_quantizable():
    with pytest.raises(CiuicError, match="keep"):
        quantize(torch.randn(4, 8), QuantSpec(bits=16))
