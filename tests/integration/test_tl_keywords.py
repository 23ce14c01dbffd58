"""TransformerLens's forward keywords on interpkv.forward / capture.

Each keeps TransformerLens's meaning, or is refused in one line naming the interpkv form.
"""

import pytest
import torch

import interpkv

TOL = 1e-10  # float64: summation-order noise only


@pytest.fixture(scope="module")
def llama():
    return interpkv.zoo.load("llama", dtype=torch.float64)


@torch.no_grad()
@pytest.mark.parametrize("name", ["llama", "gpt2", "shortformer"])
def test_stop_and_start_at_layer_equal_transformer_lens(name):
    model = interpkv.zoo.load(name, dtype=torch.float64)
    tokens = torch.arange(1, 11)[None]
    for stop in (0, 1, -1, model.cfg.n_layers):
        want = model(tokens, stop_at_layer=stop)
        got = interpkv.forward(model, tokens, stop_at_layer=stop)
        assert got.shape == want.shape and (got - want).abs().max() < TOL, stop
    resid = model(tokens, stop_at_layer=1)
    shortformer_pos = None
    if model.cfg.positional_embedding_type == "shortformer":  # TransformerLens needs it passed in
        shortformer_pos = model.pos_embed(tokens)
    want = model(resid, start_at_layer=1, shortformer_pos_embed=shortformer_pos)
    got = interpkv.forward(model, resid, start_at_layer=1)
    assert (got - want).abs().max() < TOL


@torch.no_grad()
def test_layers_through_a_frozen_cache(llama):
    tokens = torch.arange(1, 11)[None]
    cache = interpkv.KVCache.for_model(llama)
    interpkv.forward(llama, tokens[:, :7], cache=cache)
    want = llama(tokens, stop_at_layer=1)[:, 7:]
    with cache.freeze():
        got = interpkv.forward(llama, tokens[:, 7:], cache=cache, stop_at_layer=1)
        later = interpkv.forward(llama, want, cache=cache, start_at_layer=1)
    assert (got - want).abs().max() < TOL
    assert (later - llama(tokens)[:, 7:]).abs().max() < TOL
    assert cache.seq_len == 7
    with pytest.raises(ValueError, match="cache.freeze"):
        interpkv.forward(llama, tokens[:, 7:], cache=cache, stop_at_layer=1)


@pytest.mark.parametrize(
    "keyword, value, says",
    [
        ("past_kv_cache", None, "cache=interpkv.KVCache"),
        ("bwd_hooks", [], "model.hooks(bwd_hooks"),
        ("prepend_bos", True, "model.to_tokens"),
        ("padding_side", "left", "attention_mask="),
        ("remove_batch_dim", True, "[0]"),
        ("frobnicate", 1, "unexpected keyword argument 'frobnicate'"),
    ],
)
def test_other_keywords_name_the_interpkv_form(llama, keyword, value, says):
    with pytest.raises(TypeError, match="transformerlens|unexpected|" + keyword) as caught:
        interpkv.forward(llama, torch.arange(1, 5)[None], **{keyword: value})
    assert says in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("keyword", ["remove_batch_dim", "stop_at_layer", "return_type", "past_kv_cache"])
def test_capture_refuses_run_with_cache_keywords_in_one_line(llama, keyword):
    with pytest.raises(TypeError, match=f"TransformerLens's {keyword}=") as caught:
        interpkv.capture(llama, torch.arange(1, 5)[None], **{keyword: 1})
    assert "\n" not in str(caught.value)


def test_sampling_without_a_seed_follows_torch_global_generator(llama):
    tokens = torch.arange(1, 6)[None]
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(interpkv.generate(llama, tokens, max_new_tokens=8, do_sample=True, temperature=2.0).tokens)
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(1)
    other = interpkv.generate(llama, tokens, max_new_tokens=8, do_sample=True, temperature=2.0).tokens
    assert not torch.equal(runs[0], other)  # 8 draws at T=2: the seed matters
    state = torch.get_rng_state()
    interpkv.generate(llama, tokens, max_new_tokens=3)  # greedy draws nothing
    interpkv.generate(llama, tokens, max_new_tokens=3, do_sample=True, seed=5)  # a seed: global RNG untouched
    assert torch.equal(torch.get_rng_state(), state)
