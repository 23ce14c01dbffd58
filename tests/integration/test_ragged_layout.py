"""A Record from a ragged batch lines up with the left-padded tokens, as ``run_with_cache`` does.

``record[...][:, -1]`` is every row's last real token; ``to_activation_cache``
equals ``run_with_cache(tokens, attention_mask=...)`` on the same ragged batch
at every real entry (TransformerLens computes values for pad tokens too, which
no real token reads; interpkv holds 0 there and marks them with
``record.padding``). The absolute layout stays available, by name.

Tolerance: float64 runs differ from TransformerLens's only by summation order
(~1e-14 on these tiny models), so 1e-10 catches any real difference (the bug
this guards against is off by 4.26 on gpt2's logit lens).
"""

import pytest
import torch

import interpkv
from interpkv import zoo

TOL = 1e-10
MODELS = ["gpt2", "llama", "bloom"]


def _forget_alibi(model):
    """A fresh ALiBi matrix per TransformerLens run (its memo is sliced per row; see test_generation_record)."""
    for block in model.blocks:
        if getattr(block.attn, "alibi", None) is not None:
            block.attn.alibi = None


def _ragged(d_vocab, batch=3, length=9):
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(1, d_vocab, (batch, length), generator=gen)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding, ragged
    mask[2, :7] = 0
    return tokens, mask


def _close(got, want, where):
    assert got.shape == want.shape, where
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err < TOL, f"{where}: max abs error {err}"


def _check_like_run_with_cache(model, record, tokens, mask):
    _forget_alibi(model)
    logits, ref = model.run_with_cache(tokens, attention_mask=mask)
    real = mask.bool()
    cache = record.to_activation_cache(model)
    assert torch.equal(record.padding, ~real) and torch.equal(record.valid, real)
    _close(record.logits[real], logits[real], "logits")
    _close(record.logits[:, -1], logits[:, -1], "logits[:, -1]")  # every row's last real token
    for name in record.activations:
        got, want = cache[name], ref[name]
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            got, want = got.transpose(1, 2)[real], want.transpose(1, 2)[real]  # real query rows (n, H, K)
            assert torch.equal(torch.isinf(want), torch.isinf(got)), name  # TL's IGNORE where TL has it
            got, want = got.masked_fill(torch.isinf(got), 0), want.masked_fill(torch.isinf(want), 0)
        else:
            assert torch.equal(got[~real], torch.zeros_like(got[~real])), f"{name}: padding not 0"
            got, want = got[real], want[real]
        _close(got, want, name)
    # The ActivationCache tools, at the last position (the logit lens of the issue).
    _close(cache.accumulated_resid(pos_slice=-1), ref.accumulated_resid(pos_slice=-1), "accumulated_resid")
    answer = tokens[:, -1]
    _close(
        cache.logit_attrs(cache.decompose_resid(pos_slice=-1), tokens=answer, pos_slice=-1),
        ref.logit_attrs(ref.decompose_resid(pos_slice=-1), tokens=answer, pos_slice=-1),
        "logit_attrs",
    )


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("steps", [None, [5, 1, 3]], ids=["uncached", "chunked"])
def test_capture_ragged_equals_run_with_cache(name, steps):
    model = zoo.load(name, dtype=torch.float64)
    tokens, mask = _ragged(model.cfg.d_vocab)
    record = interpkv.capture(model, tokens, attention_mask=mask, steps=steps)
    assert record.layout == "tokens"
    assert record.positions.tolist()[2] == [-1] * 7 + [0, 1]
    _check_like_run_with_cache(model, record, tokens, mask)


@pytest.mark.parametrize("name", MODELS)
def test_generation_record_lines_up_with_generation_tokens(name):
    model = zoo.load(name, dtype=torch.float64)
    tokens, mask = _ragged(model.cfg.d_vocab)
    out = interpkv.generate(model, tokens, attention_mask=mask, max_new_tokens=4, capture=lambda hook: True)
    assert out.record.logits.shape[1] == out.tokens.shape[1]
    _check_like_run_with_cache(model, out.record, out.tokens, out.attention_mask)


def test_absolute_layout_is_explicit_and_named():
    model = zoo.load("gpt2", dtype=torch.float64)
    tokens, mask = _ragged(model.cfg.d_vocab)
    by_tokens = interpkv.capture(model, tokens, attention_mask=mask)
    absolute = interpkv.capture(model, tokens, attention_mask=mask, layout="absolute")
    assert absolute.layout == "absolute" and absolute.positions is None
    assert absolute.n_positions == 9 and absolute.valid.sum(1).tolist() == [9, 5, 2]
    converted = by_tokens.absolute()
    assert converted.layout == "absolute"
    for name in absolute.activations:
        assert torch.equal(converted[name], absolute[name]), name
    assert torch.equal(converted.logits, absolute.logits)
    # Row 2 alone, in the absolute layout, is its first two positions.
    alone = interpkv.capture(model, tokens[2:, 7:])
    _close(absolute["resid_post", 1][2, :2], alone["resid_post", 1][0], "absolute row")
    # diff matches by absolute position whatever the layouts.
    assert interpkv.diff(by_tokens, absolute).ok(atol=TOL, rtol=TOL)
    chunked = interpkv.capture(model, tokens, attention_mask=mask, steps=[3, 6])
    assert interpkv.diff(chunked, by_tokens).ok(atol=TOL, rtol=TOL)
    with pytest.raises(ValueError, match="'tokens'"):
        interpkv.capture(model, tokens, layout="left")


def test_rectangular_batch_is_not_copied():
    model = zoo.load("gpt2")
    record = interpkv.capture(model, torch.arange(1, 7)[None].repeat(2, 1))
    assert record.layout == "tokens" and not record.padding.any()
    assert record.absolute().activations["blocks.0.hook_resid_pre"] is record.activations["blocks.0.hook_resid_pre"]


def test_capture_continuing_a_ragged_cache_puts_history_first():
    """History columns come first, left-padded: the last columns are the tokens just run."""
    model = zoo.load("llama", dtype=torch.float64)
    tokens, mask = _ragged(model.cfg.d_vocab)
    cache = interpkv.KVCache.for_model(model, 3)
    interpkv.forward(model, tokens[:, :6], cache=cache, attention_mask=mask[:, :6])
    record = interpkv.capture(model, tokens[:, 6:], cache=cache, attention_mask=mask[:, 6:])
    # history: 6, 2, 0 positions; widths 6 + 3 columns.
    assert record.positions.shape == (3, 9)
    assert record.positions[1].tolist() == [-1, -1, -1, -1, 0, 1, 2, 3, 4]
    assert not record.valid[:, :6].any() and torch.equal(record.valid[:, 6:], mask[:, 6:].bool())
    _forget_alibi(model)
    logits, ref = model.run_with_cache(tokens, attention_mask=mask)
    real = mask[:, 6:].bool()
    _close(record["resid_post", 1][:, 6:][real], ref["resid_post", 1][:, 6:][real], "resid_post")
    _close(record.logits[:, -1], logits[:, -1], "last logits")
