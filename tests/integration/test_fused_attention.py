"""The fused attention path (no hook on scores or pattern) equals the explicit one.

With nothing hooked on ``hook_attn_scores`` / ``hook_pattern`` attention runs
through ``F.scaled_dot_product_attention``; a hook on either brings back the
explicit scores and pattern. Both must compute the same function (float64,
1e-10), with padding queries giving 0 (as TransformerLens) rather than NaN,
and the hooks must fire with TransformerLens's shapes on both routes.
"""

import pytest
import torch

import interpkv
from interpkv import zoo

F64 = torch.float64
TOL = 1e-10  # float64; the two routes sum in different orders (~1e-15 relative per op)


def _inputs(m):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.cfg.d_vocab, (3, 9), generator=gen)
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0  # left padding, ragged rows
    mask[2, :1] = 0
    return tokens, mask


def _run(m, tokens, mask, steps, hooks):
    """Logits and every layer's hook_z, through a cache chunked by ``steps``."""
    zs = []

    def keep_z(z, hook):
        zs.append(z.clone())

    fwd_hooks = [(lambda n: n.endswith("hook_z"), keep_z)] + hooks
    cache = interpkv.KVCache.for_model(m, tokens.shape[0], window=None)
    parts, start = [], 0
    for n in steps:
        parts.append(
            interpkv.forward(
                m, tokens[:, start : start + n], cache=cache,
                attention_mask=mask[:, start : start + n], fwd_hooks=fwd_hooks,
            )
        )
        start += n
    return torch.cat(parts, 1), zs


@pytest.mark.parametrize("name", zoo.names())
@pytest.mark.parametrize("steps", [[9], [5, 1, 3]], ids=["one_pass", "chunked"])
def test_fused_equals_explicit(name, steps):
    m = zoo.load(name, dtype=F64)
    tokens, mask = _inputs(m)
    shapes = []

    def watch_pattern(pattern, hook):
        shapes.append(tuple(pattern.shape))

    explicit = [(lambda n: n.endswith("hook_pattern"), watch_pattern)]
    logits_f, z_f = _run(m, tokens, mask, steps, [])
    logits_e, z_e = _run(m, tokens, mask, steps, explicit)
    assert len(shapes) == m.cfg.n_layers * len(steps)
    assert shapes[0] == (3, m.cfg.n_heads, steps[0], steps[0])  # [batch, head_index, pos, kv_pos]
    real = mask.bool()
    assert (logits_f - logits_e)[real].abs().max() < TOL
    for a, b in zip(z_f, z_e):
        assert not torch.isnan(a).any()
        assert (a - b).abs().max() < TOL
    # Padding queries (row 0, the first 4 columns) attend nothing: z is exactly 0.
    assert bool((z_f[0][0, :4] == 0).all())


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_scores_hook_alone_selects_the_explicit_route(name):
    m = zoo.load(name, dtype=F64)
    tokens, mask = _inputs(m)
    seen = []

    def watch(scores, hook):
        seen.append(hook.name)

    out = interpkv.forward(m, tokens, attention_mask=mask, fwd_hooks=[("blocks.0.attn.hook_attn_scores", watch)])
    ref = interpkv.forward(m, tokens, attention_mask=mask)
    assert seen == ["blocks.0.attn.hook_attn_scores"]
    assert (out - ref)[mask.bool()].abs().max() < TOL
