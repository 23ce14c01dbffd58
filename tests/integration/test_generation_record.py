"""generate(capture=...).record: the whole generation as one Record, equal to run_with_cache.

Tolerances: float64 runs differ from TransformerLens's only by summation order
(~1e-14), so 1e-10 catches any real difference. float32: one query at a time
against a whole-sequence pass sums in another order, ~1e-7 relative per op
over a few layers; 1e-4 absolute on these tiny models (activations and logits
of size ~1-10) is the stated bar.
"""

import pytest
import torch

import interpkv
from interpkv import zoo

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 1e-4}
NEW = 7


def _prompts(d_vocab, length=10):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, d_vocab, (3, length), generator=gen)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # ragged left padding
    mask[2, :6] = 0
    return tokens, mask


def _forget_alibi(m):
    """TransformerLens memoizes each layer's ALiBi matrix and slices a later, shorter call out
    of it with a per-row offset (interpkv.verify.findings.stale_alibi): a fresh
    matrix per reference run keeps the reference right."""
    for block in m.blocks:
        if getattr(block.attn, "alibi", None) is not None:
            block.attn.alibi = None


def _check_against_run_with_cache(m, out, dtype, every_hook=True):
    """Row by row: the row's real tokens run alone through run_with_cache (absolute layout).

    tests/integration/test_ragged_layout.py checks the default (token) layout
    against run_with_cache on the ragged batch itself."""
    record = out.record.absolute()
    cache = record.to_activation_cache(m)
    checked = 0
    for row in range(out.tokens.shape[0]):
        real = out.tokens[row][out.attention_mask[row] == 1]
        n = real.shape[0]
        _forget_alibi(m)
        logits, ref = m.run_with_cache(real[None])
        assert record.valid[row, :n].all() and not record.valid[row, n:].any()
        if every_hook:
            assert list(record.activations) == list(ref.keys())  # same hooks, same (firing) order
        for name in record.activations:
            want, got = ref[name], cache[name][row : row + 1]
            if name.endswith(("hook_pattern", "hook_attn_scores")):
                got = got[:, :, :n, :n]
                masked = torch.isinf(want)
                assert torch.equal(masked, torch.isinf(got)), name  # TL's IGNORE where TL has it
                got, want = got.masked_fill(masked, 0), want.masked_fill(masked, 0)
            else:
                got = got[:, :n]
            assert got.shape == want.shape, name
            assert (got.double() - want.double()).abs().max() <= TOL[dtype], name
            checked += 1
        assert (record.logits[row, :n] - logits[0]).abs().max() <= TOL[dtype]
    assert checked > (20 if every_hook else 3)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom", "mistral"])
def test_whole_generation_record_equals_run_with_cache(name, dtype):
    m = zoo.load(name, dtype=dtype)
    tokens, mask = _prompts(m.cfg.d_vocab)
    if name == "mistral":  # past its sliding window of 8
        assert m.cfg.window_size < 10 + NEW
    out = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=NEW, capture=lambda n: True)
    assert out.record.n_positions == 10 + NEW
    assert len(out.records) == NEW
    _check_against_run_with_cache(m, out, dtype)


def test_trained_model_record_equals_run_with_cache_on_the_text():
    m = zoo.load("llama", trained=True, dtype=F64)
    out = interpkv.generate(m, ["def add", "x = "], max_new_tokens=NEW, capture="blocks.1")
    _check_against_run_with_cache(m, out, F64, every_hook=False)


def test_pattern_rows_sum_to_one_like_transformer_lens():
    """Regression: a Record's pattern was NaN above the diagonal, so rows summed to NaN."""
    m = zoo.load("gpt2", dtype=F64)
    tokens, mask = _prompts(m.cfg.d_vocab)
    out = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=3, capture="hook_pattern")
    pattern = out.record["pattern", 0]  # (B, H, P, P)
    sums = pattern.sum(-1).transpose(1, 2)  # (B, P, H)
    done = out.record.computed("pattern", 0)
    assert not torch.isnan(pattern).any()
    assert (sums[done] - 1).abs().max() < 1e-10 and (sums[~done] == 0).all()
    step = out.records[1]["pattern", 0]
    assert not torch.isnan(step).any()


def test_step_records_are_cut_from_the_whole_record():
    m = zoo.load("neox", dtype=F64)
    tokens, mask = _prompts(m.cfg.d_vocab)
    hooks = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_attn_scores"]
    out = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=4, capture=hooks)
    whole = out.record.absolute()  # step records are in the absolute layout
    assert all(record.layout == "absolute" for record in out.records)
    for step, record in enumerate(out.records):
        valid = record.valid
        assert valid.sum(1).tolist() == ([10, 7, 4] if step == 0 else [1, 1, 1])
        n = valid.shape[1]
        assert torch.equal(record["blocks.1.hook_resid_post"][valid], whole["blocks.1.hook_resid_post"][:, :n][valid])
        assert (record["blocks.1.hook_resid_post"][~valid] == 0).all()
        scores = record["blocks.0.attn.hook_attn_scores"]
        assert torch.isinf(scores.transpose(1, 2)[~valid]).all()  # not this step's rows: TL's IGNORE


def test_buffers_are_allocated_once_per_hook():
    """Every step writes into one buffer: the whole record's tensors are views of it.

    (Rectangular prompts: a ragged batch's record is laid out by token columns, one copy at the end.)"""
    m = zoo.load("llama", dtype=F64)
    tokens, mask = _prompts(m.cfg.d_vocab)
    mask = torch.ones_like(mask)
    out = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=5, capture="hook_resid_post")
    data = {t.untyped_storage().data_ptr() for t in out.record.activations.values()}
    assert len(data) == len(out.record.activations) == m.cfg.n_layers
    for t in out.record.activations.values():  # one [batch, prompt + max_new, d_model] block each
        assert t.untyped_storage().nbytes() == 3 * 15 * m.cfg.d_model * 8


def test_record_with_a_caller_cache_history_and_a_continuation():
    m = zoo.load("llama", dtype=F64)
    tokens = torch.randint(0, m.cfg.d_vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = interpkv.KVCache.for_model(m)
    first = interpkv.generate(m, tokens, cache=cache, max_new_tokens=3)
    more = interpkv.generate(m, cache=cache, max_new_tokens=4, capture="hook_resid_pre")
    full = torch.cat([first.tokens, more.new_tokens], 1)
    _, ref = m.run_with_cache(full)
    record = more.record
    start = first.tokens.shape[1] - 1  # the held-back token's position
    assert record.valid[0].tolist() == [False] * start + [True] * (full.shape[1] - start)
    got = record["blocks.1.hook_resid_pre"][:, start:]
    assert (got - ref["blocks.1.hook_resid_pre"][:, start:]).abs().max() < 1e-10
    assert (record["blocks.1.hook_resid_pre"][:, :start] == 0).all()


def test_capture_with_max_new_tokens_zero_is_refused():
    m = zoo.load("gpt2")
    with pytest.raises(ValueError, match="interpkv.capture"):
        interpkv.generate(m, torch.tensor([[1, 2]]), max_new_tokens=0, capture="resid")
