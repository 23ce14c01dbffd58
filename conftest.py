"""Doctest namespace: every ``>>>`` example in the package runs in the test suite.

Examples may use ``interpkv``, ``torch``, a zoo ``model`` (a tiny float64 Llama:
rotary, grouped-query attention), ``tokens`` (a ``[1, 12]`` prompt) and a
``cache`` already holding it, without defining them, as a reader of the API
reference would assume. Each example gets fresh objects and runs in its own
temporary directory, which holds ``prompt.safetensors`` (``cache`` saved with
``metadata={"prompt": "Once upon a time"}``, for ``KVCache.load``), under
``torch.no_grad()`` as inference code runs.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _doctest_namespace(request):
    if not isinstance(request.node, pytest.DoctestItem):
        yield
        return
    import torch

    import interpkv

    torch.set_num_threads(1)
    request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
    with torch.no_grad():
        model = interpkv.zoo.load("llama", dtype=torch.float64)
        tokens = torch.arange(1, 13)[None]
        cache = interpkv.KVCache.for_model(model)
        interpkv.forward(model, tokens, cache=cache)
        cache.save("prompt.safetensors", metadata={"prompt": "Once upon a time"})
        namespace = request.getfixturevalue("doctest_namespace")
        namespace.update(interpkv=interpkv, torch=torch, model=model, tokens=tokens, cache=cache)
        yield
