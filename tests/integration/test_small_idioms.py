"""Smaller idioms of issue 29: capture without logits, from_hf on a bare GPT2Config, Bloom to SAELens
after a forward, and HF's StaticCache refusal in one line."""

import pytest
import torch
import transformers

import interpkv
from interpkv import zoo


def test_capture_and_generation_can_leave_the_logits_out():
    model = zoo.load("gpt2", dtype=torch.float64)
    tokens = torch.tensor([[0, 5, 6, 7], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    full = interpkv.capture(model, tokens, attention_mask=mask, steps=[2, 2])
    lean = interpkv.capture(model, tokens, attention_mask=mask, steps=[2, 2], logits=False)
    assert lean.logits.shape == (2, 4, 0) and full.logits.shape[-1] == model.cfg.d_vocab
    for name in full.activations:
        assert torch.equal(full[name], lean[name]), name
    with_logits = interpkv.generate(model, tokens, attention_mask=mask, max_new_tokens=4, capture="resid_post")
    without = interpkv.generate(
        model, tokens, attention_mask=mask, max_new_tokens=4, capture="resid_post", capture_logits=False
    )
    assert torch.equal(with_logits.tokens, without.tokens)
    assert without.record.logits.numel() == 0 and with_logits.record.logits.numel() > 0
    assert torch.equal(with_logits.record["resid_post", 1], without.record["resid_post", 1])
    assert without.records[1].logits.numel() == 0


@torch.no_grad()
def test_from_hf_and_load_hf_dir_repair_a_bare_gpt2_config(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=64)
    assert not hasattr(config, "n_ctx")  # transformers 5 no longer stores it (TL 3.9 reads it)
    hf = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.arange(12)[None]
    model = zoo.from_hf(hf)
    assert model.cfg.n_ctx == 64
    assert (model(tokens) - hf(tokens).logits).abs().max() < 1e-4  # float32 conversion
    hf.save_pretrained(tmp_path)
    loaded = zoo.load_hf_dir(tmp_path)
    assert (loaded(tokens) - hf(tokens).logits).abs().max() < 1e-4


def test_bloom_converts_to_sae_lens_after_a_longer_forward():
    pytest.importorskip("sae_lens")
    model = zoo.load("bloom")
    with torch.no_grad():
        model(torch.arange(40)[None] % model.cfg.d_vocab)  # TransformerLens memoizes a 40-long ALiBi matrix
    converted = zoo.as_sae_transformer(model)
    probe = torch.arange(6)[None]
    with torch.no_grad():
        assert (converted(probe) - model(probe)).abs().max() < 1e-5


def test_static_cache_on_hf_bloom_is_refused_in_one_line():
    _, hf = zoo.load_pair("bloom")
    cache = transformers.StaticCache(config=hf.config, max_cache_len=16)
    with pytest.raises(ValueError, match="does not run with a StaticCache") as caught:
        interpkv.compare(hf, torch.arange(1, 9)[None], steps=[4, 4], engine="hf", cache=cache)
    assert "\n" not in str(caught.value) and "cache=None" in str(caught.value)
