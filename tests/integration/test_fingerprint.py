"""The weights fingerprint: reproducible across processes, sensitive to used weights, proportionate."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import interpkv
from interpkv.cache import fingerprint

from .lifecycle_helpers import tiny_model
from .test_persist import REPO

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))

# A fresh process builds the Bloom model, fills the never-read pos_embed.W_pos with
# garbage (as from_pretrained leaves it: uninitialised), then saves or loads a cache.
PROCESS = textwrap.dedent("""
    import sys, torch, interpkv
    from interpkv.cache.fingerprint import weights_fingerprint
    from tests.integration.lifecycle_helpers import tiny_model
    action, path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = tiny_model("bloom")
    with torch.no_grad():
        model.pos_embed.W_pos.copy_(torch.randn(model.pos_embed.W_pos.shape, generator=torch.Generator().manual_seed(seed)))
    if action == "save":
        cache = interpkv.KVCache.for_model(model)
        interpkv.forward(model, torch.tensor([[1, 2, 3]]), cache=cache)
        cache.save(path)
    else:
        print(interpkv.KVCache.load(path, model).seq_len)
    print(weights_fingerprint(model))
""")


def test_bloom_cache_saved_in_one_process_loads_in_another(tmp_path):
    path = str(tmp_path / "bloom.safetensors")
    run = lambda *args: subprocess.run([sys.executable, "-c", PROCESS, *args], env=ENV, cwd=REPO,  # noqa: E731
                                       check=True, capture_output=True, text=True, timeout=300).stdout.split()
    saved_fp = run("save", path, "1")[-1]
    seq_len, loaded_fp = run("load", path, "2")
    assert seq_len == "3" and loaded_fp == saved_fp


@pytest.mark.parametrize("scheme", ["gpt2", "shortformer", "neox", "bloom"])
def test_fingerprint_follows_used_weights_only(scheme):
    model = tiny_model(scheme)
    before = fingerprint.weights_fingerprint(model)
    with torch.no_grad():
        if hasattr(model, "pos_embed"):
            model.pos_embed.W_pos.add_(1.0)
    after_pos = fingerprint.weights_fingerprint(model)
    assert (after_pos != before) == (scheme in ("gpt2", "shortformer"))  # W_pos read only there
    with torch.no_grad():
        model.blocks[1].mlp.W_out[3, 5] += 1e-3
    assert fingerprint.weights_fingerprint(model) != after_pos


def test_sample_covers_every_row_and_column_of_large_parameters():
    for shape in [(4096, 4096), (4096, 11008), (11008, 4096), (32000, 4096), (32, 4096, 128), (300, 300)]:
        n = torch.Size(shape).numel()
        index = fingerprint.sample_elements(torch.arange(n, dtype=torch.int64).reshape(shape))
        cols = shape[-1]
        assert index.numel() <= max(fingerprint.FULL_HASH_ELEMENTS, 2 * (n // cols), 2 * cols) + 1, shape
        assert torch.unique(index // cols).numel() == n // cols, f"{shape}: a row is never sampled"
        assert torch.unique(index % cols).numel() == cols, f"{shape}: a column is never sampled"
        assert int(index[0]) == 0 and int(index[-1]) == n - 1


def test_edit_of_a_row_column_or_end_changes_the_fingerprint_of_a_large_parameter():
    weight = torch.randn(1000, 700, generator=torch.Generator().manual_seed(0))
    base = fingerprint.parameters_fingerprint([("w", weight)])
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        r, c = int(torch.randint(1000, (), generator=gen)), int(torch.randint(700, (), generator=gen))
        for index in [(r, slice(None)), (slice(None), c), (0, 0), (-1, -1)]:
            edited = weight.clone()
            edited[index] += 0.5
            assert fingerprint.parameters_fingerprint([("w", edited)]) != base, index
    # The documented trade-off: one unsampled element of a large parameter can change unnoticed.
    sampled = set(fingerprint.sample_elements(torch.arange(weight.numel()).reshape(weight.shape)).tolist())
    hidden = next(i for i in range(weight.numel()) if i not in sampled)
    edited = weight.clone()
    edited.view(-1)[hidden] += 0.5
    assert fingerprint.parameters_fingerprint([("w", edited)]) == base


def test_a_cache_saved_before_an_ablation_through_data_is_refused_after_it(tmp_path):
    """Regression: the fingerprint was memoized on _version/data_ptr, which .data writes keep."""
    model = interpkv.zoo.load("llama")
    cache = interpkv.KVCache.for_model(model)
    with torch.no_grad():
        interpkv.forward(model, torch.tensor([[3, 1, 4, 1, 5]]), cache=cache)
    path = tmp_path / "c.safetensors"
    cache.save(path)
    interpkv.KVCache.load(path, model)  # same weights: fine
    model.blocks[0].attn.W_Q.data[0] = 0.0  # the notebook ablation idiom
    with pytest.raises(interpkv.CacheFileError):
        interpkv.KVCache.load(path, model)
