"""capture / compare on the zoo: chunked-cached runs line up with uncached ones by position."""

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.diagnostics.comparator import Comparator

# float64 parity: cached and uncached runs differ only by summation order (~1e-14).
TOL64 = dict(atol=1e-10, rtol=1e-10)
STEPS = [8, 1, 1, 3, 11]  # 24 tokens: a prefill, single tokens, then chunks
N_TOKENS = sum(STEPS)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def load(name, dtype=torch.float64):
        if (name, dtype) not in cache:
            cache[name, dtype] = zoo.load(name, dtype=dtype)
        return cache[name, dtype]

    return load


def tokens_for(model, batch=2, n=N_TOKENS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, n), generator=generator)


@pytest.mark.parametrize("name", zoo.names())
def test_compare_cached_equals_uncached(models, name):
    model = models(name)
    report = interpkv.compare(model, tokens_for(model), steps=STEPS)
    assert report.ok(**TOL64), report.first_divergence(**TOL64)
    assert "hook_embed" in report.hooks[:3] and report.hooks[-1] == "logits"
    assert report.logits_max_abs < 1e-10
    assert report.kl < 1e-12
    # Every hook was compared at every position it computed (all of them, but an
    # expert's: only the tokens routed to it, by the Record's explicit mask).
    reference = interpkv.capture(model, tokens_for(model))
    for hook in report.hooks:
        compared = ~torch.isnan(report.stats[hook]["max_abs"])
        assert torch.equal(compared, reference.computed(hook)), hook
        assert compared.all() or ".experts." in hook, hook


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_diff_of_two_captures_equals_compare(models, name):
    model = models(name)
    tokens = tokens_for(model)
    streamed = interpkv.compare(model, tokens, steps=STEPS)
    cached = interpkv.capture(model, tokens, steps=STEPS)
    whole = interpkv.capture(model, tokens)
    report = interpkv.diff(cached, whole)
    assert report.hooks == streamed.hooks
    for hook in report.hooks:
        for stat in ("max_abs", "rel", "cos"):
            torch.testing.assert_close(report.stats[hook][stat], streamed.stats[hook][stat], equal_nan=True)


def test_capture_matches_transformer_lens_run_with_cache(models):
    model = models("gpt2")
    tokens = tokens_for(model, batch=1)
    _, tl_cache = model.run_with_cache(tokens)
    record = interpkv.capture(model, tokens, steps=STEPS)
    lower = torch.tril(torch.ones(N_TOKENS, N_TOKENS, dtype=torch.bool))
    checked = 0
    for name, act in record.activations.items():
        ref = tl_cache[name]
        if name.endswith(("hook_attn_scores", "hook_pattern")):
            # keys after the query: TL's masked value (0 pattern, attn.IGNORE scores)
            assert torch.equal(act[..., ~lower], ref[..., ~lower]), name
            torch.testing.assert_close(act, ref, atol=1e-10, rtol=0)
        else:
            torch.testing.assert_close(act, ref, atol=1e-10, rtol=0)
        checked += 1
    assert checked == len(record.activations) > 20
    torch.testing.assert_close(record.logits, model(tokens), atol=1e-10, rtol=0)


def test_order_is_the_firing_order(models):
    model = models("llama")
    tokens = tokens_for(model, batch=1, n=6)
    fired = []
    with model.hooks(fwd_hooks=[(lambda n: True, lambda x, hook: fired.append(hook.name))]):
        interpkv.forward(model, tokens)
    record = interpkv.capture(model, tokens)
    assert record.order == list(dict.fromkeys(fired)) + ["logits"]
    position = {name: i for i, name in enumerate(record.order)}
    assert position["blocks.0.attn.hook_rot_q"] < position["blocks.0.attn.hook_attn_scores"]
    assert position["blocks.0.hook_resid_post"] < position["blocks.1.hook_resid_pre"]


@pytest.mark.parametrize("name", ["gpt2", "neox", "bloom"])
def test_left_padding_is_recorded_at_absolute_positions(models, name):
    model = models(name)
    tokens = tokens_for(model, batch=2, n=12)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # row 1: 4 padding tokens, 8 real
    record = interpkv.capture(model, tokens, steps=[6, 1, 5], attention_mask=mask, layout="absolute")
    alone = interpkv.capture(model, tokens[1:, 4:])
    assert record.valid[1].tolist() == [True] * 8 + [False] * 4
    for hook in ("blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", "logits"):
        got, want = record[hook][1:], alone[hook]
        if hook.endswith("hook_pattern"):
            got = got[:, :, :8, :8]
        else:
            got = got[:, :8]
            assert (record[hook][1, 8:] == 0).all()  # never computed: 0, named by the mask
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert not record.computed(hook)[1, 8:].any() and record.computed(hook)[1, :8].all()
    assert not torch.isnan(record["blocks.0.attn.hook_pattern"]).any()
    report = interpkv.compare(model, tokens, steps=[6, 1, 5], attention_mask=mask)
    assert report.ok(**TOL64)
    assert len(report.to_frame().query("hook == 'logits'")) == 12 + 8


def test_steps_must_cover_the_tokens(models):
    model = models("gpt2")
    with pytest.raises(ValueError, match=r"sum to 23 .* 24 positions"):
        interpkv.capture(model, tokens_for(model), steps=[8, 15])


@pytest.mark.parametrize(
    "names,expected",
    [
        (["blocks.0.attn.hook_q", "hook_embed"], ["hook_embed", "blocks.0.attn.hook_q", "logits"]),
        ("hook_resid_post", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "logits"]),
        (lambda n: n.endswith("ln_final.hook_normalized"), ["ln_final.hook_normalized", "logits"]),
    ],
    ids=["list", "substring", "callable"],
)
def test_names_select_hooks(models, names, expected):
    model = models("gpt2")
    record = interpkv.capture(model, tokens_for(model, n=6), steps=[3, 3], names=names)
    assert record.order == expected


def test_capture_continues_a_cache(models):
    model = models("mistral")
    tokens = tokens_for(model, batch=1)
    cache = interpkv.KVCache.for_model(model)
    interpkv.forward(model, tokens[:, :10], cache=cache)
    record = interpkv.capture(model, tokens[:, 10:], cache=cache, steps=[4, 10])
    whole = interpkv.capture(model, tokens)
    assert record.valid[0].tolist() == [False] * 10 + [True] * 14
    torch.testing.assert_close(record.logits[:, 10:], whole.logits[:, 10:], atol=1e-10, rtol=0)
    pattern = record["blocks.1.attn.hook_pattern"]
    # Keys at positions 0..9 came from the cache's history.
    torch.testing.assert_close(pattern[:, :, 10:], whole["blocks.1.attn.hook_pattern"][:, :, 10:], atol=1e-10, rtol=0)
    assert (pattern[:, :, :10] == 0).all() and not record.computed("pattern", 1)[0, :10].any()


def test_diff_float32_against_float64(models):
    a = interpkv.capture(models("llama", torch.float32), tokens_for(models("llama")))
    b = interpkv.capture(models("llama"), tokens_for(models("llama")))
    report = interpkv.diff(a, b)
    assert report.ok(atol=1e-4, rtol=1e-4)
    assert not report.ok(**TOL64)
    assert 0 < report.logits_max_abs < 1e-4


def test_diff_patched_against_clean(models):
    model = models("gpt2")
    tokens = tokens_for(model, batch=1)
    clean = interpkv.capture(model, tokens, steps=STEPS)

    def patch(resid, hook):
        resid[:, 5] += 1.0  # in place: the Record must hold a copy, not this tensor
        return resid

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", patch)]):
        patched = interpkv.capture(model, tokens)
    site = interpkv.diff(patched, clean).first_divergence(**TOL64)
    assert (site.hook, site.layer, site.pos) == ("blocks.1.hook_resid_pre", 1, 5)
    assert site.max_abs == pytest.approx(1.0)


def test_compare_keeps_only_a_bounded_buffer(models, monkeypatch):
    """compare holds one Record plus <= FLUSH_SITES positions per hook of the cached run."""
    model = models("gpt2")
    peak = {"sites": 0}
    push = Comparator._push

    def watched(self, name, entry):
        push(self, name, entry)
        peak["sites"] = max(peak["sites"], max(self.pending_sites.values(), default=0))

    monkeypatch.setattr(Comparator, "_push", watched)
    tokens = tokens_for(model, batch=1, n=160)
    report = interpkv.compare(model, tokens, steps=[32] + [1] * 128)
    assert report.ok(**TOL64)
    assert 0 < peak["sites"] < Comparator.FLUSH_SITES


@pytest.mark.parametrize("name", ["gpt2", "mistral"], ids=["gpt2", "mistral-local-window"])
def test_compare_attention_rows_fast_path_equals_by_row(models, monkeypatch, name):
    """Plain chunks (keys 0..S-1, no padding) place attention rows without gathers: same report."""
    model = models(name)
    tokens = tokens_for(model, batch=2, n=24)
    steps = [9, 1, 1, 13]
    fast = interpkv.compare(model, tokens, steps=steps)
    monkeypatch.setattr(Comparator, "_keys", lambda self, q_pos, k_pos: False)
    by_row = interpkv.compare(model, tokens, steps=steps)
    assert fast.hooks == by_row.hooks
    for hook in fast.hooks:
        for stat, value in fast.stats[hook].items():
            assert torch.equal(value.nan_to_num(nan=-1.0), by_row.stats[hook][stat].nan_to_num(nan=-1.0)), (hook, stat)


def test_to_frame_filters(models):
    model = models("llama")
    frame = interpkv.compare(model, tokens_for(model), steps=STEPS).to_frame()
    assert {"hook", "layer", "pos", "batch", "max_abs", "rel", "cos"} <= set(frame.columns)
    scores = frame[(frame.family == "attn.hook_attn_scores") & (frame.layer == 1)]
    assert len(scores) == 2 * N_TOKENS
    assert (scores.cos > 1 - 1e-12).all()


@pytest.mark.parametrize("steps,during_forward", [(None, True), ([5, 1, 2], False)], ids=["one-chunk", "chunked"])
def test_one_chunk_capture_writes_activations_as_they_fire(models, monkeypatch, steps, during_forward):
    """One chunk: the Record copies each activation as it fires (no private copy of every hook
    held until the call returns: the reference of a compare at 512 tokens held ~750 MB twice).
    Chunked: activations are handed over after each call, a hook firing twice keeping its last value."""
    from interpkv.core import calls
    from interpkv.diagnostics.capture import RecordBuilder

    model = models("gpt2")
    seen = []
    activation = RecordBuilder.activation

    def watched(self, name, act, q_pos, k_pos):
        seen.append(calls.current_positions() is not None)  # set only while a forward runs
        activation(self, name, act, q_pos, k_pos)

    monkeypatch.setattr(RecordBuilder, "activation", watched)
    record = interpkv.capture(model, tokens_for(model, batch=1, n=8), steps=steps)
    assert seen and all(s == during_forward for s in seen)
    assert record["blocks.0.hook_resid_pre"].shape[1] == 8
