"""The Session's promises for any sequence of changes, checked with hypothesis.

tests/test_properties.py checks them for ``cl.apply``; here the Session is driven through its own public
methods, the way the panels drive it: one site, a kind (with or without blocks), a glob on names,
presets, recipes, the fusion switches and the KV-cache form, the layout of what is quantized, undo, redo,
going back to an earlier state, reset; and deliberately bad changes (bits 9, an unknown site, a glob
that selects nothing, ...). After every step:

- the model's logits on a fixed input equal, bit for bit, those of a fresh ``cl.apply`` of the
  session's plan on a reverted model (an identical one loaded apart), and applying that plan a second
  time changes nothing;
- the session's metrics (its summary, texts and per-site errors) equal an independent evaluation of
  the same plan (``optimize.evaluate_plan``: resolve the exported recipe, apply, snapshot, compare),
  whether the session measured the state or reused the metrics of an earlier one (undo, redo, restore);
- a change made twice is made once: the second call adds no state and changes nothing;
- a refused change raises one ``CiuicError`` of one line and leaves plan, history and logits as they were;
- undo and redo walk the states a shadow stack expects.

At the end the same model, reverted and freshly applied, gives the session's logits, and reset gives
the baseline's logits bit for bit with every loaded parameter back (the same objects, the same bytes).

Automatic kernel choice is limited to the torch reference here (``CIUIC_BACKENDS=torch``): the Numba
kernels compile one loop per weight configuration on first use, which would make this test's run time
depend on the on-disk cache; they have their own tests and fuzzing.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from itertools import chain
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import ciuic_lab as cl
from ciuic_lab import CiuicError
from ciuic_lab.models import embedded_names
from ciuic_lab.optimize import baseline, evaluate_plan
from ciuic_lab.plan import Plan
from ciuic_lab.recipe import FUSIONS, KV_CACHE, PRESETS
from ciuic_lab.session import Session, summarize

# fixed examples (derandomize: the seed comes from the test itself), as few as keep the file near 30 s on two cores
SESSION = settings(max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow])

MODEL = "tiny-deepseek-random"
EVALSET = "tiny"
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11, 300, 64]])

KV_B = "model.layers.1.self_attn.kv_b_proj"
BITS = [2, 3, 4, 5, 8, 16, "keep", "fp8_e4m3"]
GROUPS = [32, 64, 128, "channel", "tensor"]
KIND_GLOBS = ["*", "attn.*", "mlp.*", "moe.expert.*", "moe.shared.*", "norm.*"]
NAME_GLOBS = ["model.layers.1.*", "model.layers.*.self_attn.kv_b_proj", "*.q_b_proj",
              "model.layers.2.mlp.experts.*", "model.layers.?.mlp.shared_experts.*_proj"]
LAYOUT_KERNELS = ["auto", "torch"]  # an explicit "numba" would compile (see the module's docstring)


# ------------------------------------------------------------------------------------ the world
def _load():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cl.load(MODEL)


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, use_cache=False).logits.clone()


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)))


def _digest(t: torch.Tensor) -> tuple[str, tuple[int, ...], str]:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest()


def _hashes(model: torch.nn.Module) -> dict[str, tuple[str, tuple[int, ...], str]]:
    return {n: _digest(t) for n, t in _tensors(model).items()}


@dataclass
class World:
    loaded: Any                      # the model every example's Session drives
    objects: dict[str, torch.Tensor]  # its parameters and buffers as loaded (the very objects)
    hashes: dict[str, tuple]         # and their bytes
    base_logits: torch.Tensor
    twin: Any                        # an identical model, loaded apart: the independent reference
    twin_base: Any                   # its baseline snapshot (with the sites' inputs)
    names: list[str]
    kind_blocks: dict[str, list[int]]  # kind or kind glob -> blocks it has sites in


_WORLD: World | None = None


def _world() -> World:
    global _WORLD
    if _WORLD is None:
        loaded, twin = _load(), _load()
        objects, hashes, base_logits = _tensors(loaded.model), _hashes(loaded.model), _logits(loaded.model)
        sess = Session(loaded, evalset=EVALSET)  # only to read what the controls offer
        try:
            kind_blocks = {}
            for pattern in sess.kinds() + KIND_GLOBS:
                kind_blocks[pattern] = sorted({sess.site(n).block for n in sess.select(pattern)} - {None})
            for glob in NAME_GLOBS:
                assert sess.select(glob), glob
            names = [s.name for s in sess.sites]
        finally:
            sess.close()
        _WORLD = World(loaded, objects, hashes, base_logits, twin,
                       baseline(twin.model, twin.tokenizer, EVALSET, timing=False), names, kind_blocks)
        # the twin is the same model: same bytes, same logits
        assert _hashes(twin.model) == _WORLD.hashes
        assert torch.equal(_logits(twin.model), _WORLD.base_logits)
    return _WORLD


@pytest.fixture(scope="module", autouse=True)
def _torch_kernels_one_thread():
    """The torch reference kernels (see the module's docstring), on one thread: this model's operations are
    tiny, and on a shared machine a second thread mostly waits for its share of a busy core."""
    old, threads = os.environ.get("CIUIC_BACKENDS"), torch.get_num_threads()
    os.environ["CIUIC_BACKENDS"] = "torch"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("CIUIC_BACKENDS", None)
    else:
        os.environ["CIUIC_BACKENDS"] = old
    _free_world()


def _free_world() -> None:
    global _WORLD
    if _WORLD is not None:
        cl.revert(_WORLD.twin.model)
    _WORLD = None


# ------------------------------------------------------------------------------- the operations
_scheme_group = {"scheme": st.sampled_from(["asym", "sym"]), "group": st.sampled_from(GROUPS)}
_with_bits = st.fixed_dictionaries({"bits": st.sampled_from(BITS)}, optional=_scheme_group)
# mostly with bits; else scheme or group alone (kept as is on a kept site) or nothing (refused)
fields = st.sampled_from([_with_bits, _with_bits, _with_bits, st.fixed_dictionaries({}, optional=_scheme_group)]).flatmap(
    lambda strategy: strategy)


def _kind_op(pattern: str):
    blocks = _world().kind_blocks[pattern]
    where = st.none()
    if blocks:
        where = st.one_of(st.none(), st.sampled_from(blocks), st.lists(st.sampled_from(blocks), min_size=1, unique=True))
    return st.tuples(st.just("kind"), st.just(pattern), where, fields)


def _weighted(*strategies):
    """One of the strategies, each as often as it is listed (``one_of`` favours its first ones)."""
    return st.sampled_from(strategies).flatmap(lambda strategy: strategy)


by_kind = st.deferred(lambda: st.sampled_from(sorted(_world().kind_blocks)).flatmap(_kind_op))
changes = _weighted(  # set, as the precision map and the inspector do
    st.tuples(st.just("site"), st.deferred(lambda: st.sampled_from(_world().names)), fields),
    by_kind,
    by_kind,
    st.tuples(st.just("glob"), st.sampled_from(NAME_GLOBS), fields),
)
whole = st.tuples(st.sampled_from(["preset", "recipe", "what-if"]), st.sampled_from(list(PRESETS)))
switches = st.tuples(st.just("fusions"), st.dictionaries(st.sampled_from(FUSIONS), st.booleans(), max_size=len(FUSIONS)),
                     st.sampled_from([None, *KV_CACHE]))
layout = st.tuples(st.just("layout"), st.sampled_from(["rowmajor", "interleaved1", "interleaved4"]),
                   st.sampled_from(LAYOUT_KERNELS))
history = _weighted(st.tuples(st.sampled_from(["undo", "redo", "reset"])), st.tuples(st.just("restore"), st.integers(0, 50)))
bad = st.one_of(
    st.tuples(st.just("bad"), st.just("bits 9"), st.deferred(lambda: st.sampled_from(_world().names))),
    st.tuples(st.just("bad"), st.sampled_from(["unknown site", "glob selects nothing", "block out of range",
                                               "group 100", "unknown preset", "unknown fusion", "kv_cache huge",
                                               "unknown field", "no such state"])),
)
# weights: changes 3, whole-model plans 2, switches 1, layout 1, history 3, refused 2 (out of 12)
operations = _weighted(changes, changes, changes, whole, whole, switches, layout, history, history, history, bad, bad)


def _bad(s: Session, what: str, arg: Any = None) -> Any:
    """A change the Session must refuse, with the words its message must hold."""
    return {
        "bits 9": (lambda: s.set(arg, bits=9), "bits 9 is not supported"),
        "unknown site": (lambda: s.set("model.layers.0.self_attn.q_z_proj", bits=4), "selects no site"),
        "glob selects nothing": (lambda: s.set("moe.nothing.*", bits=4, group=64), "selects no site"),
        "block out of range": (lambda: s.set("attn.kv_b", blocks=[7], bits=4), "no site in block"),
        "group 100": (lambda: s.set(KV_B, bits=4, group=100), "group 100 does not divide"),
        "unknown preset": (lambda: s.preset("int5"), "unknown preset"),
        "unknown fusion": (lambda: s.set_fusions(warp=True), "unknown fusion"),
        "kv_cache huge": (lambda: s.set_fusions(kv_cache="huge"), "kv_cache 'huge'"),
        "unknown field": (lambda: s.set(KV_B, colour="red"), "unknown field"),
        "no such state": (lambda: s.restore(10**6), "no state #1000000"),
    }[what]


def _run(s: Session, op: tuple) -> tuple[Any, str | None, bool]:
    """(call, words a refusal must hold or None where the change must be made, whether repeating it is a no-op)."""
    kind = op[0]
    if kind == "site":
        _, name, f = op
        return (lambda: s.set(name, **f)), (None if f else "nothing to set"), True
    if kind == "kind":
        _, pattern, blocks, f = op
        return (lambda: s.set(pattern, blocks=blocks, **f)), (None if f else "nothing to set"), True
    if kind == "glob":
        _, pattern, f = op
        return (lambda: s.set(pattern, **f)), (None if f else "nothing to set"), True
    if kind == "preset":
        return (lambda: s.preset(op[1])), None, True
    if kind == "recipe":
        return (lambda: s.set_plan(op[1])), None, True
    if kind == "what-if":
        return (lambda: s.evaluate(op[1])), None, False
    if kind == "fusions":
        _, switches, kv = op
        return (lambda: s.set_fusions(kv_cache=kv, **switches)), None, True
    if kind == "layout":  # as the fusion panel does: the layout of every quantized site
        _, layout, kernel = op
        names = s.plan.quantized()
        return (lambda: s.set(names, layout=layout, kernel=kernel)), (None if names else "selection is empty"), True
    if kind == "undo":
        return s.undo, (None if s.can_undo else "nothing to undo"), False
    if kind == "redo":
        return s.redo, (None if s.can_redo else "nothing to redo"), False
    if kind == "restore":
        index = _restore_index(s, op)
        return (lambda: s.restore(index)), None, True
    if kind == "reset":
        return s.reset, None, True
    call, words = _bad(s, *op[1:])
    return call, words, False


# ------------------------------------------------------------------------------------ the checks
def _same_plan(a: Plan, b: Plan) -> bool:
    return a == b and a.recipe.kv_cache == b.recipe.kv_cache


def _details(rep: dict[str, Any]) -> dict[str, Any]:
    """What a report says about a state beyond the summary: texts, bytes, per-site errors, the plan."""
    return {
        "perplexity": rep["perplexity"],
        "text": rep["text"]["after"],
        "first_divergence": rep["first_divergence"],
        "weight_bytes": rep["weight_bytes"],
        "quantized_sites": rep["quantized_sites"],
        "site_errors": {n: (e["rel_error"], e["basis"]) for n, e in rep["site_errors"].items()},
        "plan": {k: rep["plan"][k] for k in ("by_kind", "fusions", "kv_cache")},
    }


def _independent(w: World, recipe: Any) -> tuple[Plan, dict[str, Any], torch.Tensor]:
    """A fresh apply of ``recipe`` on the reverted twin, its report and its logits (applied twice: the same)."""
    twin = w.twin.model
    cl.revert(twin)
    plan, ref = evaluate_plan(twin, w.twin.tokenizer, recipe, EVALSET, timing=False, base=w.twin_base)
    logits = _logits(twin)
    cl.apply(twin, plan)  # applied twice equals applied once
    assert torch.equal(_logits(twin), logits)
    return plan, ref, logits


def _check_state(w: World, s: Session) -> torch.Tensor:
    """The session's model and metrics against a fresh apply and an independent evaluation of its plan."""
    got = _logits(s.model)
    plan, ref, fresh = _independent(w, s.plan.as_recipe())
    assert _same_plan(plan, s.plan), "the exported recipe does not resolve to the session's plan"
    assert torch.equal(fresh, got), "the session's model differs from a fresh apply of its plan"
    assert s.summary() == summarize(ref)
    assert _details(s.report) == _details(ref)
    assert s.report["weight_bytes"]["after"] == s.plan.summary()["weight_bytes"]["after"]
    return got


def _check_change(s: Session, op: tuple, before: Plan) -> None:
    """What each kind of change promises about the plan it makes."""
    kind, plan = op[0], s.plan
    if kind in ("site", "kind", "glob"):
        target, blocks, f = (op[1], None, op[2]) if kind != "kind" else op[1:]
        wanted = None if blocks is None else {blocks} if isinstance(blocks, int) else set(blocks)
        chosen = {n for n in s.select(target) if wanted is None or s.site(n).block in wanted}
        assert {n for n, _, _ in before.diff(plan)} <= chosen, "a site outside the selection changed"
        assert plan.recipe.fusions == before.recipe.fusions and plan.recipe.kv_cache == before.recipe.kv_cache
        bits = f.get("bits")
        for n in chosen:
            spec = plan.configs[n].spec
            if bits in (16, "keep"):
                assert spec.keep
            elif bits == "fp8_e4m3":
                assert spec.is_fp8
            elif bits is not None or (before.configs[n].spec.format == "int" and not before.configs[n].spec.keep):
                assert spec.format == "int" and spec.bits == (bits or before.configs[n].spec.bits)
                for k in ("scheme", "group"):
                    assert k not in f or getattr(spec, k) == f[k]
            elif before.configs[n].spec.keep:
                assert spec.keep, "scheme or group alone must leave a kept site kept"
    elif kind in ("preset", "recipe"):
        want = cl.resolve(op[1], s.sites)
        assert plan.configs == want.configs
        if kind == "preset":  # a preset sets bits; the switches stay
            assert plan.recipe.fusions == before.recipe.fusions and plan.recipe.kv_cache == before.recipe.kv_cache
        else:
            assert plan.recipe.fusions == want.recipe.fusions and plan.recipe.kv_cache == want.recipe.kv_cache
    elif kind == "fusions":
        _, switches, kv = op
        assert s.fusions() == {f: switches.get(f, bool(before.recipe.fusions.get(f))) for f in FUSIONS}
        assert plan.recipe.kv_cache == (kv or before.recipe.kv_cache) and plan.configs == before.configs
    elif kind == "layout":
        assert {(plan.configs[n].layout, plan.configs[n].kernel) for n in plan.quantized()} == {op[1:]}
        assert {n: c.spec for n, c in plan.configs.items()} == {n: c.spec for n, c in before.configs.items()}
    elif kind == "reset":
        assert plan.quantized() == [] and not any(s.fusions().values()) and s.report["kl"] == 0.0


def _step(w: World, s: Session, op: tuple, undo: list[Plan], redo: list[Plan]) -> None:
    logits, plan, entry, states = _logits(s.model), s.plan, s.current, len(s.history)
    can = (s.can_undo, s.can_redo)
    call, refusal, repeatable = _run(s, op)
    target = s.entry(_restore_index(s, op)) if op[0] == "restore" else None
    if refusal is None and op[0] in ("site", "kind", "glob"):
        try:
            call()
        except CiuicError as e:  # the one refusal a well-formed set may meet: mixing layouts in a bank
            assert "share one layout" in str(e) and any(
                plan.configs[n].layout != "rowmajor" or plan.configs[n].kernel != "auto" for n in plan.quantized())
            refusal = "share one layout"
            _check_refused(s, e, refusal, logits, plan, entry, states, can)
            return
    elif op[0] == "what-if":  # what a plan would give, the current state left as it is
        report = call()
        assert s.plan is plan and s.current is entry and len(s.history) == states
        assert torch.equal(_logits(s.model), logits), "evaluate() did not put the model back"
        _, ref, _ = _independent(w, op[1])
        assert summarize(report) == summarize(ref) and _details(report) == _details(ref)
        event("made: what-if")
        return
    elif refusal is None:
        call()
    else:
        with pytest.raises(CiuicError) as info:
            call()
        _check_refused(s, info.value, refusal, logits, plan, entry, states, can)
        return

    if op[0] == "undo":
        assert _same_plan(s.plan, undo[-1])
        redo.append(plan)
        undo.pop()
    elif op[0] == "redo":
        assert _same_plan(s.plan, redo[-1])
        undo.append(plan)
        redo.pop()
    else:
        changed = not _same_plan(s.plan, plan)
        assert (s.current is not entry) == changed, "a new state must be made exactly when the plan changes"
        assert len(s.history) == states + changed
        if changed:
            undo.append(plan)
            redo.clear()
        _check_change(s, op, plan)
        if op[0] == "restore":
            assert _same_plan(s.plan, target.plan) and summarize(s.report) == target.metrics()
    assert (s.can_undo, s.can_redo) == (bool(undo), bool(redo))

    event(f"made: {op[0]}")
    now = _check_state(w, s)
    if repeatable:  # made twice is made once
        entry, report = s.current, s.report
        call()
        assert s.current is entry and s.report == report and torch.equal(_logits(s.model), now)


def _restore_index(s: Session, op: tuple) -> int:
    entries = list(s.history)
    return entries[op[1] % len(entries)].index


def _check_refused(s: Session, err: CiuicError, words: str, logits, plan, entry, states, can) -> None:
    event(f"refused: {words}")
    msg = str(err)
    assert words in msg, msg
    assert msg.strip() and "\n" not in msg, f"not one line: {msg!r}"
    assert s.plan is plan and s.current is entry and len(s.history) == states and (s.can_undo, s.can_redo) == can
    assert torch.equal(_logits(s.model), logits), "a refused change changed the model"


# ------------------------------------------------------------------------------------- the test
EXPERT_BANK = "model.layers.1.mlp.experts"


@SESSION
# two sequences always run, whatever is drawn: the history walked both ways with switches and layouts in
# between, and every refusal (the one a well-formed set meets included: experts of one bank in two layouts)
@example(first=("preset", "int4-g128"), then=[
    ("fusions", {"gate_up": True, "norm_fold": True, "moe_grouped": True}, "expanded"),
    ("kind", "attn.*", [1, 2], {"bits": 3, "group": 64}), ("preset", "int8"), ("undo",), ("undo",), ("redo",),
    ("layout", "interleaved4", "auto"), ("site", f"{EXPERT_BANK}.down_proj[3]", {"bits": 2}), ("what-if", "mixed"),
    ("fusions", {"gate_up": False, "qkv_a": True}, "latent"), ("restore", 0), ("redo",), ("undo",), ("undo",),
    ("redo",), ("recipe", "mixed"), ("reset",)])
@example(first=("kind", "moe.expert.gate_up", [1], {"bits": 4}), then=[
    ("layout", "interleaved1", "torch"), ("site", f"{EXPERT_BANK}.down_proj[0]", {"bits": 4}),
    ("bad", "bits 9", KV_B), ("bad", "unknown site"), ("bad", "glob selects nothing"), ("bad", "block out of range"),
    ("bad", "group 100"), ("bad", "unknown preset"), ("bad", "unknown fusion"), ("bad", "kv_cache huge"),
    ("bad", "unknown field"), ("bad", "no such state"), ("site", KV_B, {}), ("undo",), ("undo",), ("redo",), ("redo",),
    ("redo",), ("reset",), ("reset",)])
@given(first=st.one_of(changes, whole), then=st.lists(operations, min_size=1, max_size=7))
def test_any_session_sequence_matches_a_fresh_apply_and_reset_is_bit_exact(first, then):
    ops = [first, *then]  # a change first, so that undo, redo and the rest have something to work on
    w = _world()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = Session(w.loaded, evalset=EVALSET)
    model = s.model
    try:
        assert torch.equal(_logits(model), w.base_logits)
        undo: list[Plan] = []
        redo: list[Plan] = []
        for op in ops:
            _step(w, s, op, undo, redo)

        # the same model, reverted and freshly applied, computes what the session's model computes
        now = _logits(model)
        cl.revert(model)
        cl.apply(model, s.plan)
        assert torch.equal(_logits(model), now)

        s.reset()
        assert torch.equal(_logits(model), w.base_logits), "reset is not bit-exact"
        assert s.summary()["kl"] == 0.0 and s.summary()["top1_agreement"] == 1.0
        assert s.summary()["perplexity"] == s.report["perplexity"]["before"]
    finally:
        s.close()
    tensors = _tensors(model)
    assert tensors.keys() == w.objects.keys()
    assert all(tensors[n] is t for n, t in w.objects.items()), "revert must put back the loaded objects"
    assert _hashes(model) == w.hashes, "a parameter's bytes differ from the loaded ones"
    assert torch.equal(_logits(model), w.base_logits)


# ----------------------------------------------------------------------- two states, one at a time
def test_the_as_loaded_state_is_the_baseline_and_an_expanded_cache_is_not():
    """The as-loaded plan (kv_cache "latent", the recipe default: nothing swapped) reuses the baseline's
    measurements; "expanded" swaps in FusedMLA, so it is timed on its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = Session(_world().loaded, evalset=EVALSET)
    try:
        out = s.measure(repeats=1)
        assert out["after"] == out["before"]  # the same model: not timed twice
        s.preset("int8")
        s.reset()
        assert s.report["kl"] == 0.0 and s.current.tokens == s.baseline.token_ids
        assert s.measure(repeats=1)["after"] == out["before"]
        s.set_fusions(kv_cache="expanded")
        assert type(s.model.get_submodule("model.layers.0.self_attn")).__name__ == "FusedMLA"
        assert s.measure(repeats=1)["after"] != out["before"]  # measured, not assumed
    finally:
        s.close()
    assert _hashes(_world().loaded.model) == _world().hashes


def test_site_errors_follow_norm_folding():
    """Folding a norm changes the weight a site quantizes, so its error is measured again (on a trained
    model: the random one's norms are all ones, and folding changes nothing)."""
    if "tiny-deepseek" not in embedded_names():
        pytest.skip("the trained tiny-deepseek is not installed here")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, twin = cl.load("tiny-deepseek"), cl.load("tiny-deepseek")
        s = Session(loaded, evalset=EVALSET)
    base = baseline(twin.model, twin.tokenizer, EVALSET, timing=False)
    q_a = "model.layers.0.self_attn.q_a_proj"
    try:
        s.set(q_a, bits=4)
        unfolded = s.report["site_errors"][q_a]["rel_error"]
        s.set_fusions(norm_fold=True)
        _, ref = evaluate_plan(twin.model, twin.tokenizer, s.plan.as_recipe(), EVALSET, timing=False, base=base)
        assert s.report["site_errors"][q_a] == ref["site_errors"][q_a]
        assert s.report["site_errors"][q_a]["rel_error"] != unfolded
        s.undo()
        assert s.report["site_errors"][q_a]["rel_error"] == unfolded
        s.set_fusions(norm_fold=True, gate_up=True)  # folded again: from the cache, still the folded one
        assert s.report["site_errors"][q_a] == ref["site_errors"][q_a]
    finally:
        s.close()
