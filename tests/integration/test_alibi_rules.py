"""Each ALiBi model is computed with the slopes it was defined with.

A model built from a ``HookedTransformerConfig(positional_embedding_type="alibi")``
is defined by TransformerLens's own forward (slopes ``2^(-8i/n)`` for every n);
one converted from Bloom is defined by HF Bloom (interleaved slopes when n is
not a power of two). interpkv reads which from ``cfg.original_architecture``.
"""

import pytest
import torch
from transformer_lens import patching as TL_PATCHING  # the reference implementation

import interpkv
from interpkv.core.schemes import alibi_rule, alibi_slopes, scheme_for
from interpkv.core.tl import HookedTransformer, HookedTransformerConfig
from interpkv.patching import patch

from ._parity import HF_TOL, batch, hf_model, hf_reference, max_err, model
from ._upstream import tl_alibi_slopes_differ_from_bloom

TOL_F64 = 1e-10  # float64: summation-order noise only (measured <= 1.5e-14)


def _tl_alibi(n_heads: int) -> HookedTransformer:
    d_head = 8 if n_heads == 12 else 16
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=n_heads * d_head,
        d_head=d_head,
        n_heads=n_heads,
        d_mlp=128,
        n_ctx=64,
        d_vocab=53,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="alibi",
        initializer_range=0.2,
        dtype=torch.float64,
        default_prepend_bos=False,
        seed=0,
    )
    return HookedTransformer(cfg, move_to_device=False).eval()


@pytest.mark.parametrize("n_heads", [4, 6, 12])
def test_transformer_lens_alibi_model_equals_its_own_forward(n_heads):
    m = _tl_alibi(n_heads)
    assert alibi_rule(m.cfg) == "transformer_lens"
    assert "TransformerLens slopes" in scheme_for(m).describe()
    tokens, mask = batch("b1", m.cfg.d_vocab, length=20)
    with torch.no_grad():
        ref = m(tokens)
        assert max_err(interpkv.forward(m, tokens), ref, mask) < TOL_F64
        # cached, token by token
        cache = interpkv.KVCache.for_model(m)
        steps = [interpkv.forward(m, tokens[:, i : i + 1], cache=cache) for i in range(20)]
    assert max_err(torch.cat(steps, dim=1), ref, mask) < TOL_F64


@pytest.mark.parametrize("n_heads", [6, 12])
def test_patching_on_transformer_lens_alibi_model_equals_transformer_lens(n_heads):
    m = _tl_alibi(n_heads)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, m.cfg.d_vocab, (2, 7), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 4] = (clean[:, 4] + 1) % m.cfg.d_vocab

    def metric(logits):
        return (logits[:, -1, 1] - logits[:, -1, 2]).mean()

    _, clean_cache = m.run_with_cache(clean)
    ref = TL_PATCHING.get_act_patch_resid_pre(m, corrupt, clean_cache, metric)
    got = patch(m, clean, corrupt, hook="resid_pre", metric=metric, progress=False)
    # TransformerLens's patching stores its results in a float32 tensor, even for
    # a float64 model: agreement is float32 rounding of values up to ~2 (~1e-7).
    assert (got - ref.double()).abs().max() < 1e-6


def test_bloom6_still_uses_bloom_slopes_and_matches_hf():
    # float32: HF Bloom in float64 returns NaN on left-padded rows (see test_parity).
    m, hf = model("bloom6", torch.float32), hf_model("bloom6", torch.float32)
    assert alibi_rule(m.cfg) == "bloom"
    assert "Bloom slopes" in scheme_for(m).describe()
    tokens, mask = batch("b3", m.cfg.d_vocab)
    got = interpkv.forward(m, tokens, attention_mask=mask)
    assert max_err(got, hf_reference(hf, tokens, mask), mask) < HF_TOL[torch.float32]


def test_rules_agree_on_powers_of_two_and_follow_transformer_lens_otherwise():
    for n in (1, 2, 4, 8, 16):
        assert torch.allclose(alibi_slopes(n).float(), alibi_slopes(n, rule="transformer_lens"), rtol=1e-6)
    for n in (3, 6, 12):  # the "transformer_lens" rule is whatever the installed TransformerLens computes
        differ = not torch.allclose(alibi_slopes(n).float(), alibi_slopes(n, rule="transformer_lens"), rtol=1e-6)
        assert differ == tl_alibi_slopes_differ_from_bloom(n)
    with pytest.raises(ValueError, match="unknown ALiBi slope rule"):
        alibi_slopes(4, rule="press")
