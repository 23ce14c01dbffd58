"""Windowed caches: eviction keeps memory flat and logits equal a window-restricted uncached run.

The reference is TransformerLens's uncached forward with every layer's
``hook_attn_scores`` set to -inf outside the keys a windowed cache keeps
(``k < sinks`` or ``k > q - window``), see ``lifecycle_helpers.reference``.
"""

import functools

import pytest
import torch

import interpkv

from .lifecycle_helpers import D_VOCAB, SCHEMES, padded_batch, reference
from .lifecycle_helpers import tiny_model as build_model

# float64: cached and uncached agree to ~1e-14; 1e-10 allows summation order only.
ATOL = 1e-10
tiny_model = functools.lru_cache(maxsize=None)(build_model)


@torch.no_grad()
def run_chunks(model, rows, pads, chunks, window, sinks):
    """Feed left-padded ragged ``rows`` through a windowed cache in ``chunks``; return logits."""
    tokens, mask = padded_batch(rows, pads)
    cache = interpkv.KVCache.for_model(model, len(rows), window=window, sinks=sinks)
    out, start = [], 0
    for n in chunks:
        out.append(interpkv.forward(
            model, tokens[:, start:start + n], cache=cache, attention_mask=mask[:, start:start + n]
        ))
        start += n
    return torch.cat(out, dim=1), tokens, cache


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize(
    "window, sinks, chunks",
    [(4, 0, [6] + [1] * 10), (3, 2, [2, 5, 1, 1, 3, 4]), (1, 1, [1] * 16), (5, 1, [16])],
    ids=["w4-prefill-then-steps", "w3-s2-ragged-chunks", "w1-s1-steps", "w5-one-chunk"],
)
def test_windowed_cache_equals_window_restricted_uncached(scheme, window, sinks, chunks):
    model = tiny_model(scheme)
    gen = torch.Generator().manual_seed(window * 10 + sinks)
    rows = [torch.randint(0, D_VOCAB, (n,), generator=gen).tolist() for n in (16, 11, 13)]
    logits, tokens, cache = run_chunks(model, rows, [0, 5, 3], chunks, window, sinks)
    width = tokens.shape[1]
    for b, row in enumerate(rows):
        want = reference(model, row, window, sinks)
        got = logits[b, width - len(row):]
        assert (got - want).abs().max().item() < ATOL
        # Not vacuous: the window changed the logits compared with full attention.
        assert (reference(model, row) - want).abs().max().item() > 1e-3
        m = len(row)
        kept = cache.positions[b][cache.positions[b] >= 0].tolist()
        assert kept == [p for p in range(m) if p < sinks or p >= m - window]
    assert cache.seq_len == sinks + window  # ragged rows compacted to one rectangle


@pytest.mark.parametrize(
    "n_tokens", [512, pytest.param(4096, marks=pytest.mark.slow)], ids=["512", "4096"]
)
@torch.no_grad()
def test_memory_is_flat_over_generated_tokens(n_tokens):
    """A tiny rotary model generates tokens one at a time; nbytes never grows once full.

    The 4,096-token run is ~16 s of per-call overhead on a tiny model, so it is
    marked slow; the 512-token run exercises the same steady state.
    """
    model = build_model("neox", torch.float32, n_layers=1, n_ctx=32)
    window, sinks = 16, 4
    cache = interpkv.KVCache.for_model(model, 2, window=window, sinks=sinks)
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    interpkv.forward(model, tokens, cache=cache)
    full_bytes, capacity = None, None
    token = tokens[:, -1:]
    for step in range(n_tokens):
        logits = interpkv.forward(model, token, cache=cache)
        token = logits[:, -1:].argmax(-1)
        if cache.seq_len == sinks + window:
            if full_bytes is None:
                full_bytes, capacity = cache.nbytes, cache.layers[0].capacity
            assert cache.nbytes == full_bytes and cache.layers[0].capacity == capacity
    end = n_tokens + 3
    assert cache.next_positions.tolist() == [end, end]
    assert cache.positions[0].tolist() == list(range(sinks)) + list(range(end - window, end))
    assert bool(torch.isfinite(logits).all())
    # 20 slots x (2 x 1 layer x 4 kv heads x 8 d_head x 4 bytes + 8 bytes of position) x 2 rows
    assert full_bytes == 2 * (sinks + window) * (2 * 4 * 8 * 4 + 8)


def test_evicting_cache_matches_a_cache_that_keeps_everything_far_past_the_window():
    """Past thousands of positions, eviction changes no logit (same mask, all keys kept)."""
    model = build_model("llama", torch.float64, n_layers=2)
    window, sinks = 8, 2
    evicting = interpkv.KVCache.for_model(model, 1, window=window, sinks=sinks)
    keeping = interpkv.KVCache.for_model(model, 1, window=window, sinks=sinks)
    keeping._evict = lambda: None  # the mask alone restricts attention; storage grows
    gen = torch.Generator().manual_seed(0)
    for n in [40] + [1] * 30 + [300, 7] + [1] * 20:
        tokens = torch.randint(0, D_VOCAB, (1, n), generator=gen)
        a = interpkv.forward(model, tokens, cache=evicting)
        b = interpkv.forward(model, tokens, cache=keeping)
        assert (a - b).abs().max().item() < ATOL
    assert evicting.seq_len == sinks + window and keeping.seq_len == 397


def test_learned_positions_cannot_pass_n_ctx_even_with_a_window():
    model = tiny_model("gpt2")  # n_ctx = 64
    cache = interpkv.KVCache.for_model(model, window=4, sinks=1)
    interpkv.forward(model, torch.zeros(1, 64, dtype=torch.long), cache=cache)
    assert cache.seq_len == 5
    with pytest.raises(ValueError, match="position 64 is past this model's n_ctx=64"):
        interpkv.forward(model, torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.next_positions.tolist() == [64]


def test_crop_within_the_window_works_and_past_it_raises():
    model = tiny_model("neox")
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(0, D_VOCAB, (1, 12), generator=gen)
    cache = interpkv.KVCache.for_model(model, window=4, sinks=1)
    interpkv.forward(model, seq[:, :3], cache=cache)
    cache.crop(2)  # nothing evicted yet: fine
    interpkv.forward(model, seq[:, 2:12], cache=cache)  # stores 0, 8, 9, 10, 11
    before = cache.positions.clone()
    with pytest.raises(ValueError, match=r"crop\(3\) would leave row 0 continuing at position 10 "
                                         r"without positions \[6, 7\], which the window"):
        cache.crop(3)
    assert torch.equal(cache.positions, before)
    cache.crop(5)  # keeping everything is fine
    nxt = torch.randint(0, D_VOCAB, (1, 1), generator=gen)
    got = interpkv.forward(model, nxt, cache=cache)
    want = reference(model, seq[0].tolist() + nxt[0].tolist(), 4, 1)[-1]
    assert (got[0, -1] - want).abs().max().item() < ATOL


def test_frozen_windowed_cache_evicts_nothing():
    model = tiny_model("bloom")
    cache = interpkv.KVCache.for_model(model, window=3, sinks=1)
    interpkv.forward(model, torch.arange(6)[None], cache=cache)
    before = cache.positions.clone()
    with cache.freeze():
        a = interpkv.forward(model, torch.tensor([[7, 8]]), cache=cache)
    assert torch.equal(cache.positions, before)
    want = reference(model, list(range(6)) + [7, 8], 3, 1)[-2:]
    assert (a[0] - want).abs().max().item() < ATOL


@pytest.mark.parametrize("scheme", ["gpt2", "llama", "bloom"])
def test_capture_through_an_evicting_cache_records_keys_at_their_positions(scheme):
    """Token-by-token steps evict as many slots as they add; keys must keep their positions.

    Regression: capture tracked key positions by slot count, so once eviction
    kept the length constant, query 19's keys came out as [0..7, 19] instead of
    [0, 1, 14..19]. The one-call windowed capture (no eviction inside a call)
    is the reference.
    """
    model = interpkv.zoo.load(scheme, dtype=torch.float64)
    tokens = torch.arange(3, 23)[None]
    window, sinks = 6, 2

    def windowed():
        return interpkv.KVCache.for_model(model, window=window, sinks=sinks)

    stepped = interpkv.capture(model, tokens, cache=windowed(), steps=[8] + [1] * 12, names="hook_pattern")
    one_call = interpkv.capture(model, tokens, cache=windowed(), names="hook_pattern")
    pattern = stepped["blocks.0.attn.hook_pattern"][0, 0, 19]  # (P,)
    attended = (pattern > 0).nonzero().flatten().tolist()
    assert attended == [0, 1, 14, 15, 16, 17, 18, 19]
    # Evicted keys are 0 in the stepped run (not stored) and in the one-call run (masked).
    for name in one_call:
        torch.testing.assert_close(stepped[name], one_call[name], atol=1e-10, rtol=1e-10, msg=name)
