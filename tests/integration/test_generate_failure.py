"""A failed generate step leaves a caller's cache where continuing equals the uninterrupted run.

Issue 16 item 2b: a hook raising at step 3 (or KeyboardInterrupt) used to
leave the cache advanced by the completed steps with nothing held back, so
``generate(model, cache=cache, ...)`` could not continue (or continued from
the wrong point). float64: the continuation and the uninterrupted run differ
only by summation order, so logits agree to 1e-10.
"""

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.generation import loop as loop_module
from interpkv.generation.resume import held_tokens

F64 = torch.float64
NEW = 8
FAIL_AT = 3  # 0-based step whose forward fails: steps 0, 1, 2 complete


def _setup(name="llama"):
    m = zoo.load(name, dtype=F64)
    tokens = torch.randint(0, m.cfg.d_vocab, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return m, tokens, mask


def _raising_on_call(n, exc):
    calls = []

    def hook(x, hook):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return x

    return hook


def _cache(m, windowed):
    return interpkv.KVCache.for_model(m, 3, window=6, sinks=1) if windowed else interpkv.KVCache.for_model(m, 3)


@pytest.mark.parametrize("windowed", [False, True], ids=["full", "window"])
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_hook_failing_at_step_3_leaves_the_completed_steps_and_the_next_token(exc, windowed):
    m, tokens, mask = _setup()
    full = interpkv.generate(m, tokens, attention_mask=mask, cache=_cache(m, windowed), max_new_tokens=NEW,
                             keep_logits=True)
    cache = _cache(m, windowed)
    hooks = [("blocks.1.hook_resid_pre", _raising_on_call(FAIL_AT + 1, exc))]
    with pytest.raises(type(exc)) as info:
        interpkv.generate(m, tokens, attention_mask=mask, cache=cache, max_new_tokens=NEW, fwd_hooks=hooks)
    # State after the failure: the prompt and the first FAIL_AT - 1 new tokens are stored, the
    # token step FAIL_AT was feeding is held back at the position it is due.
    assert cache.next_positions.tolist() == (mask.sum(1) + FAIL_AT - 1).tolist()
    assert torch.equal(held_tokens(cache)[0], full.new_tokens[:, FAIL_AT - 1])
    assert any("continues as the uninterrupted call" in note for note in info.value.__notes__)
    assert torch.equal(info.value.interpkv_generation.new_tokens, full.new_tokens[:, :FAIL_AT])
    # Continuing equals the uninterrupted run.
    more = interpkv.generate(m, cache=cache, max_new_tokens=NEW - FAIL_AT, keep_logits=True)
    assert torch.equal(more.new_tokens, full.new_tokens[:, FAIL_AT:])
    assert (more.logits - full.logits[:, FAIL_AT:]).abs().max() < 1e-10


def test_an_interrupt_after_the_step_was_stored_is_rolled_back(monkeypatch):
    """KeyboardInterrupt while sampling: the step's forward had committed; crop undoes it."""
    m, tokens, mask = _setup()
    full = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=NEW)
    real = loop_module.sample_next
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == FAIL_AT + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "sample_next", interrupted)
    cache = interpkv.KVCache.for_model(m, 3)
    with pytest.raises(KeyboardInterrupt):
        interpkv.generate(m, tokens, attention_mask=mask, cache=cache, max_new_tokens=NEW)
    monkeypatch.setattr(loop_module, "sample_next", real)
    assert cache.next_positions.tolist() == (mask.sum(1) + FAIL_AT - 1).tolist()
    more = interpkv.generate(m, cache=cache, max_new_tokens=NEW - FAIL_AT)
    assert torch.equal(more.new_tokens, full.new_tokens[:, FAIL_AT:])


def test_a_failure_in_the_first_step_leaves_the_cache_as_it_was():
    m, tokens, mask = _setup()
    cache = interpkv.KVCache.for_model(m, 3)
    first = interpkv.generate(m, tokens, attention_mask=mask, cache=cache, max_new_tokens=2)
    held, at, length = held_tokens(cache)[0].clone(), held_tokens(cache)[1].clone(), cache.seq_len
    hooks = [("blocks.0.hook_resid_pre", _raising_on_call(1, RuntimeError("boom")))]
    with pytest.raises(RuntimeError, match="boom") as info:
        interpkv.generate(m, cache=cache, max_new_tokens=4, fwd_hooks=hooks)
    assert any("as it was" in note for note in info.value.__notes__)
    assert cache.seq_len == length and torch.equal(held_tokens(cache)[0], held) and torch.equal(held_tokens(cache)[1], at)
    more = interpkv.generate(m, cache=cache, max_new_tokens=4)
    full = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(torch.cat([first.new_tokens, more.new_tokens], 1), full.new_tokens)
