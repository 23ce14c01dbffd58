"""ALiBi slopes and the attention mask rule."""

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from interpkv.core.attention import allowed_keys
from interpkv.core.schemes import alibi_slopes


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32])
def test_alibi_slopes_match_bloom(n_heads):
    # HF Bloom's build_alibi_tensor(mask, n, dtype)[h, 0, 1] = slope[h] * position 1.
    mask = torch.ones(1, 2, dtype=torch.long)
    hf = build_alibi_tensor(mask, n_heads, torch.float32)[:, 0, 1].double()
    assert torch.allclose(alibi_slopes(n_heads), hf, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n_heads", [3, 6, 12, 24])
def test_alibi_slopes_differ_from_transformer_lens_rule_when_not_power_of_two(n_heads):
    # TransformerLens 3.x uses 2^(-8/n) * i for every n; Bloom does not.
    start = 2 ** (-8 / n_heads)
    tl = torch.tensor([start ** (i + 1) for i in range(n_heads)], dtype=torch.float64)
    assert not torch.allclose(alibi_slopes(n_heads), tl)


def test_alibi_slopes_reject_zero_heads():
    with pytest.raises(ValueError, match="n_heads must be positive"):
        alibi_slopes(0)


MASK_CASES = [
    # name, q_pos, k_pos, kwargs, expected allowed row(s)
    ("causal", [[1]], [[0, 1, 2]], {}, [[True, True, False]]),
    ("padding key", [[1]], [[-1, 0, 1]], {}, [[False, True, True]]),
    ("padding query sees nothing", [[-1]], [[0, 1]], {}, [[False, False]]),
    ("local window 2", [[3]], [[0, 1, 2, 3]], {"local_window": 2}, [[False, False, True, True]]),
    (
        "cache window 2 with 1 sink",
        [[4]],
        [[0, 1, 2, 3, 4]],
        {"cache_window": 2, "sinks": 1},
        [[True, False, False, True, True]],
    ),
]


@pytest.mark.parametrize(
    "q,k,kwargs,expected", [c[1:] for c in MASK_CASES], ids=[c[0] for c in MASK_CASES]
)
def test_allowed_keys(q, k, kwargs, expected):
    got = allowed_keys(torch.tensor(q), torch.tensor(k), **kwargs)
    assert got.shape == (1, 1, len(q[0]), len(k[0]))
    assert got[0, 0].tolist() == expected


UNSUPPORTED_CASES = [
    # (config overrides, words the message must contain)
    ({"use_attention_sinks": True}, ["attention-sink", "model(tokens)"]),
    ({"clip_qkv": 8.0}, ["clipping", "cfg.clip_qkv=8.0", "transformers"]),
    ({"attention_dir": "bidirectional"}, ["causal models only", "model(tokens)"]),
    ({"original_architecture": "Olmo2ForCausalLM"}, ["full-width Q/K norms", "model(tokens)"]),
    ({"positional_embedding_type": "relative_positional_bias"}, ["not supported", "model(tokens)"]),
]


@pytest.mark.parametrize("overrides,words", UNSUPPORTED_CASES, ids=[c[1][0] for c in UNSUPPORTED_CASES])
def test_unsupported_features_name_the_way_out(overrides, words):
    from types import SimpleNamespace

    from interpkv.core.schemes import UnsupportedModelError, scheme_for

    cfg = dict(
        use_attention_sinks=False, clip_qkv=None, use_logn_attn=False, use_dynamic_ntk_rope=False,
        attention_dir="causal", original_architecture="LlamaForCausalLM",
        positional_embedding_type="standard", n_ctx=16,
    )  # fmt: skip
    cfg.update(overrides)

    class Model:  # scheme_for only reads .cfg (and memoizes per object)
        pass

    model = Model()
    model.cfg = SimpleNamespace(**cfg)
    with pytest.raises(UnsupportedModelError) as info:
        scheme_for(model)
    for word in words:
        assert word in str(info.value)
