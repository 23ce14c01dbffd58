"""Hot-path options of ``interpkv.forward``: ``logits="last"`` and per-call hooks."""

import pytest
import torch

import interpkv
from interpkv import zoo

F64 = torch.float64
TOL = 1e-10  # float64: a 1-row and a 7-row product may use different BLAS kernels


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
def test_last_logits_equal_the_last_column_of_all(name):
    m = zoo.load(name, dtype=F64)
    tokens = torch.randint(0, m.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    full = interpkv.forward(m, tokens)
    last = interpkv.forward(m, tokens, logits="last")
    assert last.shape == (2, 1, m.cfg.d_vocab_out)
    assert (last - full[:, -1:]).abs().max() < TOL
    seen = []
    hooks = [("unembed.hook_out", lambda act, hook: seen.append(act.shape))]
    hooked = interpkv.forward(m, tokens, logits="last", fwd_hooks=hooks)
    assert seen == [(2, 7, m.cfg.d_vocab_out)]  # a hook on the logits sees every position
    assert (hooked - last).abs().max() < TOL
    with pytest.raises(ValueError, match='"all" or "last"'):
        interpkv.forward(m, tokens, logits="first")


def test_call_hooks_are_removed_and_outer_hooks_kept():
    m = zoo.load("gpt2", dtype=F64)
    tokens = torch.tensor([[1, 2, 3]])
    calls = []

    def outer(act, hook):
        calls.append("outer")

    def inner(act, hook):
        calls.append("inner")

    def permanent(act, hook):
        calls.append("permanent")

    m.blocks[0].hook_resid_post.add_perma_hook(permanent)
    try:
        with m.hooks(fwd_hooks=[("blocks.0.hook_resid_post", outer)]):
            interpkv.forward(m, tokens, fwd_hooks=[(lambda n: n == "blocks.0.hook_resid_post", inner)])
            assert sorted(calls) == ["inner", "outer", "permanent"]
            calls.clear()
            interpkv.forward(m, tokens)
            assert sorted(calls) == ["outer", "permanent"]  # the call's own hook is gone
        calls.clear()
        interpkv.forward(m, tokens)
        assert calls == ["permanent"]
    finally:
        m.reset_hooks(including_permanent=True)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_norm_hooks_fire_as_in_transformer_lens(name):
    # Idle norms run fused; a hook on hook_scale / hook_normalized brings back
    # TransformerLens's own forward, with its calls (one per q/k/v input) and values.
    m = zoo.load(name, dtype=F64)
    tokens = torch.randint(0, m.cfg.d_vocab, (1, 6), generator=torch.Generator().manual_seed(4))
    names = ["blocks.0.ln1.hook_scale", "blocks.1.ln2.hook_normalized", "ln_final.hook_scale"]

    def run(fn):
        acts = []
        hooks = [(n, lambda act, hook: acts.append((hook.name, act.clone()))) for n in names]
        return fn(hooks), acts

    ours_logits, ours = run(lambda hooks: interpkv.forward(m, tokens, fwd_hooks=hooks))
    theirs_logits, theirs = run(lambda hooks: m.run_with_hooks(tokens, fwd_hooks=hooks))
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        assert a.shape == b.shape and (a - b).abs().max() < TOL
    assert (ours_logits - theirs_logits).abs().max() < TOL
