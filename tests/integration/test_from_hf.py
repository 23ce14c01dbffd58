"""``zoo.from_hf`` never returns a model that silently computes something else.

TransformerLens 3.9's converter drops Qwen2's sliding window and Llama's
attention biases; ``from_hf`` repairs both, and refuses (UnsupportedModelError
naming the feature and the measured gap) what it cannot repair.
"""

import pytest
import torch
import transformers

import interpkv
from interpkv import zoo
from interpkv.diagnostics.hf_reference import hf_logits
from interpkv.errors import UnsupportedModelError
from interpkv.zoo import _fidelity

from ._parity import HF_TOL, batch, max_err

SIZES = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.2,
    tie_word_embeddings=False,
)


def _hf(config_class: str, **kwargs):
    """A tiny random HF model whose biases and norm weights are not 0 / 1.

    HF initialises every bias to zero and every norm weight to one, so a
    converter dropping them would go unnoticed: perturb every 1-D parameter.
    """
    config = getattr(transformers, config_class)(**{**SIZES, **kwargs})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
    return hf.eval()


def _gap(tl, hf, length=24):
    tokens, mask = batch("b3", tl.cfg.d_vocab, length=length)
    got = interpkv.forward(tl, tokens, attention_mask=mask)
    # hf_logits runs alone any row HF float64 turns into NaN under left padding.
    return max_err(got, hf_logits(hf, tokens, mask), mask)


def test_qwen2_sliding_window_is_converted():
    hf = _hf("Qwen2Config", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert hf.config.layer_types == ["full_attention", "sliding_attention"]
    tl = zoo.from_hf(hf, label="qwen2-window")
    assert tl.cfg.attn_types == ["global", "local"] and tl.cfg.window_size == 8
    assert _gap(tl, hf) < HF_TOL[torch.float32]  # measured 7e-6; TL alone: 2.1


def test_llama_attention_bias_is_converted():
    hf = _hf("LlamaConfig", attention_bias=True)
    tl = zoo.from_hf(hf, label="llama-bias")
    assert tl.blocks[0].attn.b_Q.abs().max() > 0
    assert _gap(tl, hf) < HF_TOL[torch.float32]  # measured 8e-6; TL alone: 4.1


def test_llama_attention_bias_float64():
    hf = _hf("LlamaConfig", attention_bias=True).double()
    tl = zoo.from_hf(hf, label="llama-bias")
    assert tl.cfg.dtype == torch.float64
    assert _gap(tl, hf) < HF_TOL[torch.float64]


def test_llama_mlp_bias_is_refused_with_the_feature_and_the_gap():
    hf = _hf("LlamaConfig", mlp_bias=True)
    with pytest.raises(UnsupportedModelError, match=r"mlp_bias=True.*gate_proj") as info:
        zoo.from_hf(hf, label="llama-mlp-bias")
    assert "max |logit gap|" in str(info.value) and "run this model with transformers" in str(info.value)


def _dropping_biases(state_dict, hf, cfg):
    """A converter that replaces the attention biases by zeros (TransformerLens 3.9's does)."""
    return {k: torch.zeros_like(v) if k.split(".")[-1].lstrip("_") in ("b_Q", "b_K", "b_V", "b_O") else v
            for k, v in state_dict.items()}


def test_unrepaired_conversion_is_refused(monkeypatch):
    """With the biases dropped and not repaired, the check itself catches it.

    The drop is simulated, not left to the installed TransformerLens, so the
    check is tested whether or not its converter still drops them.
    """
    monkeypatch.setattr(_fidelity, "fix_state_dict", _dropping_biases)
    hf = _hf("LlamaConfig", attention_bias=True)
    with pytest.raises(UnsupportedModelError, match=r"logit gap\| \d+\.\d+ .*attention_bias=True"):
        zoo.from_hf(hf, label="llama-bias")


def test_unrepaired_window_is_refused(monkeypatch):
    def dropping_window(cfg, config):  # every layer global, as TransformerLens 3.9's converter leaves it
        cfg.use_local_attn, cfg.attn_types = False, None

    monkeypatch.setattr(_fidelity, "fix_config", dropping_window)
    hf = _hf("Qwen2Config", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(UnsupportedModelError, match=r"sliding-window attention \(sliding_window=8\)"):
        zoo.from_hf(hf, label="qwen2-window")
