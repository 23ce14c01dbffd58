"""Gradients through a cache: they reach the whole cached history; nothing is kept under no_grad.

Regressions: a backward pass from a decode step into the prompt (and through a
windowed forward that evicted) failed with "modified by an inplace operation";
a rotary table built under ``torch.inference_mode()`` broke later backward
passes; a decode loop without ``torch.no_grad()`` silently kept the graph of
every step in the cache (+654 MB over 400 steps on a tiny model).
"""

import warnings

import pytest
import torch

import interpkv
from interpkv import zoo

F64_TOL = 1e-10  # float64: summation-order noise only


def _embeddings(model, tokens):
    with torch.no_grad():
        return model.embed(tokens).detach().requires_grad_(True)  # (B, T, d_model)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_backward_from_a_decode_step_reaches_the_prompt(name):
    model = zoo.load(name, dtype=torch.float64)
    tokens = torch.tensor([[5, 9, 2, 7, 3, 8]])
    emb = _embeddings(model, tokens)
    cache = interpkv.KVCache.for_model(model, keep_graph=True)
    interpkv.forward(model, emb[:, :4], cache=cache)
    interpkv.forward(model, emb[:, 4:5], cache=cache)
    step = interpkv.forward(model, emb[:, 5:], cache=cache)
    step[0, -1, 7].backward()
    cached_grad = emb.grad.clone()

    emb.grad = None
    full = interpkv.forward(model, emb)  # uncached reference
    full[0, -1, 7].backward()
    assert cached_grad[:, :4].abs().sum() > 0  # the prompt gets gradient
    torch.testing.assert_close(cached_grad, emb.grad, atol=F64_TOL, rtol=F64_TOL)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_backward_through_a_windowed_cache_that_evicted(name):
    model = zoo.load(name, dtype=torch.float64)
    tokens = torch.arange(3, 13)[None]
    emb = _embeddings(model, tokens)
    stepped = interpkv.KVCache.for_model(model, window=4, sinks=1, keep_graph=True)
    for t in range(10):
        logits = interpkv.forward(model, emb[:, t : t + 1], cache=stepped)
    assert stepped.seq_len < 10  # it evicted
    logits[0, -1, 3].backward()
    stepped_grad = emb.grad.clone()

    emb.grad = None
    one_call = interpkv.KVCache.for_model(model, window=4, sinks=1)
    interpkv.forward(model, emb, cache=one_call)[0, -1, 3].backward()
    torch.testing.assert_close(stepped_grad, emb.grad, atol=F64_TOL, rtol=F64_TOL)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom"])
def test_backward_after_a_call_under_inference_mode(name):
    model = zoo.load(name)
    model.requires_grad_(False)
    model.blocks[0].attn.W_Q.requires_grad_(True)  # gradient through a memoized layout's input
    with torch.inference_mode():
        interpkv.forward(model, torch.tensor([[1, 2, 3]]))
    interpkv.forward(model, torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.blocks[0].attn.W_Q.grad is not None


def test_no_graph_is_kept_under_no_grad():
    model = zoo.load("llama")
    cache = interpkv.KVCache.for_model(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", interpkv.CacheGraphWarning)
        for t in range(3):
            interpkv.forward(model, torch.tensor([[t + 1]]), cache=cache)
    assert not any(layer.keys.requires_grad or layer.values.requires_grad for layer in cache.layers)


def test_a_decode_loop_without_no_grad_warns_once_and_names_the_fix():
    model = zoo.load("llama")
    cache = interpkv.KVCache.for_model(model)
    with pytest.warns(interpkv.CacheGraphWarning, match="torch.no_grad") as record:
        for t in range(4):
            interpkv.forward(model, torch.tensor([[t + 1]]), cache=cache)
    assert len([w for w in record if issubclass(w.category, interpkv.CacheGraphWarning)]) == 1


def test_keep_graph_silences_the_warning_and_one_call_never_warns():
    model = zoo.load("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", interpkv.CacheGraphWarning)
        kept = interpkv.KVCache.for_model(model, keep_graph=True)
        for t in range(3):
            interpkv.forward(model, torch.tensor([[t + 1]]), cache=kept)
        interpkv.forward(model, torch.tensor([[1, 2, 3]]), cache=interpkv.KVCache.for_model(model))
