"""Our decode loops pass and read the KV cache under the name the installed transformers uses."""

import warnings

import torch

from ciuic_lab.models.cache import cache_kwargs, cache_of, greedy_steps


def test_a_cached_step_matches_the_full_forward_without_deprecation_warnings(tiny, ids):
    m = tiny.model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = m(input_ids=ids, use_cache=True)
        past = cache_of(out)
        assert past is not None and past.get_seq_length() == ids.shape[1]
        nxt = out.logits[:, -1:].argmax(-1)
        step = m(input_ids=nxt, **cache_kwargs(m, past), use_cache=True)
        assert cache_of(step).get_seq_length() == ids.shape[1] + 1
        full = m(input_ids=torch.cat([ids, nxt], dim=1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-4)


def test_no_cache_returned_reads_as_none(tiny, ids):
    with torch.no_grad():
        out = tiny.model(input_ids=ids, use_cache=False)
    assert cache_of(out) is None
    assert list(cache_kwargs(object(), 1)) == ["past_key_values"]  # no forward to read: the old name


def test_greedy_steps_are_generate_greedy_and_run_one_forward_per_token(tiny, ids):
    m = tiny.model.eval()
    calls = []
    hook = m.register_forward_hook(lambda mod, args, kw, out: calls.append(1), with_kwargs=True)
    try:
        with torch.no_grad():
            steps = greedy_steps(m, ids)
            toks = torch.cat([next(steps) for _ in range(6)], dim=1)
    finally:
        hook.remove()
    assert len(calls) == 6  # the prompt, then one per further token; nothing ahead of what was asked
    with torch.no_grad():
        ref = m.generate(ids, max_new_tokens=6, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(toks, ref)
