import pytest
import torch

from ciuic_lab import apply, resolve, revert
from ciuic_lab.errors import CiuicError
from ciuic_lab.measure import fingerprint
from ciuic_lab.quant import dequantize
from ciuic_lab.transforms import QuantExperts, QuantLinear, backends_in_use, state_of


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits.clone()


def test_apply_swaps_and_revert_is_bit_exact(tiny, tiny_sites, ids):
    m = tiny.model
    base, fp = _logits(m, ids), fingerprint(m)
    plan = resolve("mixed", tiny_sites)
    apply(m, plan)
    assert isinstance(m.model.layers[0].self_attn.q_a_proj, QuantLinear)
    assert isinstance(m.model.layers[1].mlp.experts, QuantExperts)
    out = _logits(m, ids)
    assert not torch.equal(out, base)
    assert float((out - base).norm() / base.norm()) < 0.2
    revert(m)
    assert torch.equal(_logits(m, ids), base)
    assert fingerprint(m) == fp
    assert state_of(m).plan is None


def test_any_sequence_of_plans_then_revert(tiny, tiny_sites, ids):
    m = tiny.model
    base = _logits(m, ids)
    for r in ["int8", "int4-g128", "mixed", "fp8", "keep", "int2-g64", "int4"]:
        apply(m, resolve(r, tiny_sites))
    revert(m)
    assert torch.equal(_logits(m, ids), base)


def test_incremental_equals_fresh_and_twice_equals_once(tiny, tiny_sites, ids):
    m = tiny.model
    a, b = resolve("int4-g128", tiny_sites), resolve("mixed", tiny_sites)
    apply(m, a)
    apply(m, b)
    inc = _logits(m, ids)
    revert(m)
    apply(m, b)
    fresh = _logits(m, ids)
    apply(m, b)
    assert torch.equal(inc, fresh) and torch.equal(_logits(m, ids), fresh)
    revert(m)


def test_quant_linear_matches_dequantized_weight(tiny, tiny_sites):
    m = tiny.model
    apply(m, resolve("int4-g128", tiny_sites))
    mod = m.model.layers[0].mlp.down_proj
    x = torch.randn(5, mod.in_features)
    ref = x @ dequantize(mod.qt).T
    assert torch.allclose(mod(x), ref, atol=1e-5)
    assert set(backends_in_use(m).values()) <= {"torch", "numba", "not run yet"}  # (no forward of the model yet)
    revert(m)


def test_expert_bank_mixed_per_expert(tiny, tiny_sites, ids):
    m = tiny.model
    plan = resolve({"rules": [{"match": "model.layers.1.mlp.experts.down_proj[2]", "bits": 2},
                              {"match": "model.layers.1.mlp.experts.gate_up_proj[2]", "bits": 8}]}, tiny_sites)
    apply(m, plan)
    bank = m.model.layers[1].mlp.experts
    assert sum(q is not None for q in bank.gate_up_q + bank.down_q) == 2
    # a bank with every expert quantized at one spec, against a loop over dequantized experts
    revert(m)
    apply(m, resolve("int4-g128", tiny_sites))
    bank = m.model.layers[2].mlp.experts
    x = torch.randn(7, 128)
    idx = torch.randint(0, 8, (7, 2))
    w = torch.rand(7, 2)
    ref = torch.zeros_like(x)
    for t in range(7):
        for j in range(2):
            e = int(idx[t, j])
            g, u = (x[t] @ dequantize(bank.gate_up_q[e]).T).chunk(2)
            ref[t] += w[t, j] * (dequantize(bank.down_q[e]) @ (torch.nn.functional.silu(g) * u))
    assert torch.allclose(bank(x, idx, w), ref, atol=1e-4)
    revert(m)


def test_embedding_head_router_norm(tiny, tiny_sites, ids):
    m = tiny.model
    base = _logits(m, ids)
    plan = resolve({"rules": [{"match": "model.embed_tokens", "bits": 8, "group": "channel"},
                              {"match": "head", "bits": 8},
                              {"match": "moe.router", "bits": 8, "group": "tensor"},
                              {"match": "norm.*", "bits": 8, "group": "channel"}]}, tiny_sites)
    apply(m, plan)
    out = _logits(m, ids)
    assert float((out - base).norm() / base.norm()) < 0.1
    assert "simulated" in backends_in_use(m).values()
    revert(m)
    assert torch.equal(_logits(m, ids), base)


def test_failed_apply_leaves_model_as_it_was(tiny, tiny_sites, ids):
    m = tiny.model
    base, fp = _logits(m, ids), fingerprint(m)
    with torch.no_grad():
        m.model.layers[2].self_attn.o_proj.weight[0, 0] = float("nan")
    fp_nan = fingerprint(m)
    with pytest.raises(CiuicError, match=r"model.layers.2.self_attn.o_proj: weight holds 1 NaN/Inf"):
        apply(m, resolve("int4-g128", tiny_sites))
    assert fingerprint(m) == fp_nan
    assert state_of(m).plan is None
    assert not isinstance(m.model.layers[0].self_attn.q_a_proj, QuantLinear)
    with torch.no_grad():
        m.model.layers[2].self_attn.o_proj.weight[0, 0] = 0.0
    assert fp != fp_nan and base.shape == _logits(m, ids).shape


@pytest.mark.parametrize("field,value,accepted", [("layout", "blocked", "interleaved4"), ("kernel", "avx9", "numba")])
def test_unknown_layout_or_kernel_is_refused_before_anything_changes(tiny, tiny_sites, field, value, accepted):
    m = tiny.model
    apply(m, resolve("int8", tiny_sites))
    fp = fingerprint(m)
    rule = {"match": "*", "bits": 4, "group": 128, field: value}
    with pytest.raises(CiuicError, match=rf"{field} '{value}' is unknown; accepted: .*{accepted}"):
        apply(m, resolve({"rules": [rule]}, tiny_sites))
    assert fingerprint(m) == fp
    revert(m)


def test_generate_runs_quantized(tiny, tiny_sites, ids):
    m = tiny.model
    apply(m, resolve("int4-g128", tiny_sites))
    out = m.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    revert(m)


@pytest.mark.parametrize("phase", ["quantize", "swap"])
def test_out_of_memory_is_one_clear_line_and_keeps_the_plan_in_force(tiny, tiny_sites, ids, monkeypatch, phase):
    """Running out of (GPU) memory half way, in either phase, gives one line that says so and what to
    do, and the model keeps the plan it had, bit for bit (simulated here; tests/gpu runs a real one)."""
    import importlib

    ap = importlib.import_module("ciuic_lab.transforms.apply")

    m = tiny.model
    apply(m, resolve("int8", tiny_sites))
    before, fp = _logits(m, ids), fingerprint(m)
    prev = state_of(m).plan
    target = "_quantize_site" if phase == "quantize" else "_swap_owner"
    real, calls = getattr(ap, target), []

    def fail_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(ap, target, fail_on_third)
    with pytest.raises(CiuicError) as err:
        apply(m, resolve("int4-g128", tiny_sites))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("out of memory") and "nothing was changed" in msg
    assert "Accepted:" in msg and "device cpu" in msg
    monkeypatch.undo()
    assert state_of(m).plan is prev and fingerprint(m) == fp
    assert torch.equal(_logits(m, ids), before)
    revert(m)
