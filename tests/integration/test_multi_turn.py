"""Multi-turn: a cache generate continued keeps the held-back token in the context.

``generate(..., cache=c)`` leaves the last chosen token held back (not fed).
A next turn through the same cache must include it: ``generate`` feeds it
first automatically, ``forward`` refuses with an error saying how. Checked
over three turns against one uncached forward of the full context.

Tolerance: float64, the cached and the uncached pass differ by summation order
only (~1e-14); 1e-10 catches a missing token (off by 1-2 logits on these models).
"""

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.core.heldback import HeldBackTokenError
from interpkv.generation.resume import prepend_held_back, release

TOL = 1e-10
NEW = 4


def _turns(d_vocab, batch):
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(1, d_vocab, (batch, n), generator=gen) for n in (6, 3, 2)]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_three_generate_turns_equal_the_uncached_full_context(name):
    model = zoo.load(name, dtype=torch.float64)
    turns = _turns(model.cfg.d_vocab, 2)
    mask0 = torch.ones_like(turns[0])
    mask0[1, :2] = 0  # a ragged first turn
    cache = interpkv.KVCache.for_model(model, 2)
    context, context_mask, chosen_at, kept = [], [], [], []
    for i, prompt in enumerate(turns):
        mask = mask0 if i == 0 else None
        out = interpkv.generate(model, prompt, attention_mask=mask, cache=cache, max_new_tokens=NEW, keep_logits=True)
        if i > 0:  # the previous turn's last token comes first
            assert torch.equal(out.tokens[:, 0], context[-1][:, -1])
            assert out.prompt_length == prompt.shape[1] + 1
            out_tokens, out_mask = out.tokens[:, 1:], out.attention_mask[:, 1:]
        else:
            out_tokens, out_mask = out.tokens, out.attention_mask
        start = sum(t.shape[1] for t in context)
        chosen_at.append(start + out.prompt_length - (1 if i > 0 else 0) - 1 + torch.arange(NEW))
        context.append(out_tokens)
        context_mask.append(out_mask)
        kept.append(out.logits)
    full, full_mask = torch.cat(context, 1), torch.cat(context_mask, 1)
    ref = interpkv.forward(model, full, attention_mask=full_mask)  # uncached: [batch, pos, d_vocab]
    for i in range(3):
        want = ref[:, chosen_at[i]]
        err = (kept[i] - want).abs().max().item()
        assert err < TOL, f"turn {i}: logits off by {err}"
        assert torch.equal(context[i][:, -NEW:], want.argmax(-1))  # greedy picks the same tokens


@torch.no_grad()
def test_forward_refuses_and_says_how_then_matches_the_uncached_context():
    model = zoo.load("llama", dtype=torch.float64)
    first, second, third = _turns(model.cfg.d_vocab, 1)
    cache = interpkv.KVCache.for_model(model)
    out = interpkv.generate(model, first, cache=cache, max_new_tokens=NEW)
    with pytest.raises(HeldBackTokenError, match="prepend_held_back") as caught:
        interpkv.forward(model, second, cache=cache)
    assert "interpkv.generate(model, tokens, cache=cache" in str(caught.value)
    with pytest.raises(HeldBackTokenError):  # capture goes through forward: same rule
        interpkv.capture(model, second, cache=cache)
    assert cache.seq_len == out.tokens.shape[1] - 1  # nothing was fed
    tokens, mask = prepend_held_back(cache, second)
    logits = interpkv.forward(model, tokens, cache=cache, attention_mask=mask)
    interpkv.forward(model, third, cache=cache)  # nothing held back any more: plain continuation
    full = torch.cat([out.tokens, second], 1)
    ref = interpkv.forward(model, full)
    assert (logits[:, 1:] - ref[:, -second.shape[1]:]).abs().max() < TOL
    assert cache.seq_len == full.shape[1] + third.shape[1]


@torch.no_grad()
def test_release_drops_the_held_back_token_on_purpose():
    model = zoo.load("gpt2", dtype=torch.float64)
    first, second, _ = _turns(model.cfg.d_vocab, 1)
    cache = interpkv.KVCache.for_model(model)
    out = interpkv.generate(model, first, cache=cache, max_new_tokens=3)
    release(cache)
    logits = interpkv.forward(model, second, cache=cache)
    without = interpkv.forward(model, torch.cat([out.tokens[:, :-1], second], 1))
    assert (logits - without[:, -second.shape[1]:]).abs().max() < TOL


def test_prefill_and_resume_keep_the_held_back_token():
    """generate(max_new_tokens=0) on a cache holding a token back, then a resume: one context."""
    model = zoo.load("gpt2", dtype=torch.float64)
    first, second, _ = _turns(model.cfg.d_vocab, 1)
    cache = interpkv.KVCache.for_model(model)
    out = interpkv.generate(model, first, cache=cache, max_new_tokens=2)
    interpkv.generate(model, second, cache=cache, max_new_tokens=0)
    more = interpkv.generate(model, cache=cache, max_new_tokens=3)
    alone = interpkv.generate(model, torch.cat([out.tokens, second], 1), max_new_tokens=3)
    assert torch.equal(more.new_tokens, alone.new_tokens)


def test_passing_exactly_the_held_back_column_is_not_repeated():
    """The older idiom generate(model, out.tokens[:, -1:], cache=cache) continues as generate(model, cache=cache)."""
    model = zoo.load("llama", dtype=torch.float64)
    first, _, _ = _turns(model.cfg.d_vocab, 2)
    caches = [interpkv.KVCache.for_model(model, 2) for _ in range(2)]
    outs = [interpkv.generate(model, first, cache=c, max_new_tokens=3) for c in caches]
    explicit = interpkv.generate(model, outs[0].tokens[:, -1:], cache=caches[0], max_new_tokens=4)
    resumed = interpkv.generate(model, cache=caches[1], max_new_tokens=4)
    assert torch.equal(explicit.tokens, resumed.tokens)
    assert caches[0].seq_len == caches[1].seq_len
