"""The test run checks the jaxtyping shapes of the public entry points at run time
(pyproject.toml addopts: ``--jaxtyping-packages=interpkv.core.forward,...,beartype.beartype``),
so an annotation that lies about a shape fails the suite instead of only misleading a reader."""

import pytest
import torch
from jaxtyping import TypeCheckError

import interpkv
from interpkv import zoo


def test_the_import_hook_checks_the_package():
    # Each function of the package is wrapped by jaxtyping's checker when the hook is on.
    assert hasattr(interpkv.forward, "__wrapped__"), "run pytest with pyproject.toml's --jaxtyping-packages"


def test_a_mask_of_another_batch_size_is_caught_at_the_call():
    model = zoo.load("gpt2")
    tokens = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(TypeCheckError, match="attention_mask"):
        interpkv.forward(model, tokens, attention_mask=torch.ones(3, 5, dtype=torch.long))


def test_a_cache_state_with_the_wrong_rank_is_caught():
    model = zoo.load("gpt2")
    cache = interpkv.KVCache.for_model(model, batch_size=2)
    with torch.no_grad():
        interpkv.forward(model, torch.ones(2, 4, dtype=torch.long), cache=cache)
    keys, values = zip(*(layer.view(cache.seq_len) for layer in cache.layers))
    with pytest.raises(TypeCheckError, match="next_positions"):
        interpkv.KVCache.from_state(model, keys, values, cache.positions, cache.next_positions[:, None])
