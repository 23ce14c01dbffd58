"""Per-row state rides on a KVCache without the cache reading it; generation's held-back token is one.

``KVCache.row_state`` holds int64 ``[batch]`` tensors that code above the
cache attaches (generation keeps its held-back token there, under the names
cache files have always used, ``next_tokens`` / ``next_tokens_at``). The
cache keeps their rows aligned with its own and persistence carries them;
generation validates them when it continues from them.
"""

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.generation.resume import held_tokens


@pytest.fixture(scope="module")
def model():
    return zoo.load("llama", dtype=torch.float64)


def _filled(model, batch=3):
    cache = interpkv.KVCache.for_model(model, batch)
    interpkv.forward(model, torch.arange(4 * batch).view(batch, 4), cache=cache)
    return cache


def test_row_state_follows_the_rows_through_fork_select_repeat_and_files(model, tmp_path):
    cache = _filled(model)
    cache.row_state["label"] = torch.tensor([10, 11, 12])
    assert cache.fork().row_state["label"].tolist() == [10, 11, 12]
    assert cache.select([2, 0]).row_state["label"].tolist() == [12, 10]
    assert cache.repeat(2).row_state["label"].tolist() == [10, 10, 11, 11, 12, 12]
    fork = cache.fork()
    fork.row_state["label"][0] = 99  # a fork's state is its own
    assert cache.row_state["label"][0] == 10
    cache.save(tmp_path / "c.safetensors")
    loaded = interpkv.KVCache.load(tmp_path / "c.safetensors", model)
    assert loaded.row_state.keys() == {"label"} and loaded.row_state["label"].tolist() == [10, 11, 12]
    assert interpkv.KVCache.for_model(model).row_state == {}


def test_row_state_that_is_not_one_int64_per_row_is_refused_before_writing(model, tmp_path):
    cache = _filled(model)
    cache.row_state["label"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"row state 'label': it is torch.float32 \[3\], row state is int64 \[3\]"):
        cache.save(tmp_path / "c.safetensors")
    cache.row_state = {"positions": torch.zeros(3, dtype=torch.long)}
    with pytest.raises(ValueError, match="one of the cache's own tensors"):
        cache.save(tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_the_held_back_token_is_generation_state_and_survives_a_file(model, tmp_path):
    cache = interpkv.KVCache.for_model(model, 2)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    first = interpkv.generate(model, prompt, cache=cache, max_new_tokens=3)
    ids, due = held_tokens(cache)
    assert ids.tolist() == first.tokens[:, -1].tolist() and due.tolist() == cache.next_positions.tolist()
    assert not hasattr(cache, "next_tokens")  # the cache itself has no generation attribute
    cache.save(tmp_path / "c.safetensors")
    loaded = interpkv.KVCache.load(tmp_path / "c.safetensors", model)
    more = interpkv.generate(model, cache=loaded, max_new_tokens=2)
    whole = interpkv.generate(model, prompt, max_new_tokens=5)
    assert more.tokens[:, -2:].tolist() == whole.tokens[:, -2:].tolist()


def test_a_corrupted_held_back_token_is_refused_when_generation_uses_it(model):
    cache = interpkv.KVCache.for_model(model, 2)
    interpkv.generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache, max_new_tokens=1)
    cache.row_state["next_tokens"] = torch.tensor([model.cfg.d_vocab, 0])
    with pytest.raises(ValueError, match=r"held-back tokens \[\d+, 0\] of this cache are not ids in \[0, d_vocab="):
        interpkv.generate(model, cache=cache, max_new_tokens=1)
    del cache.row_state["next_tokens_at"]
    with pytest.raises(ValueError, match="not both 'next_tokens' and 'next_tokens_at'"):
        interpkv.generate(model, cache=cache, max_new_tokens=1)
