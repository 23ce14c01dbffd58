"""The persistence candidate: the ``safetensors`` library as the container, interpkv's checks kept.

What replacing the hand-written reader and writer (``cache/persist/st_read.py``,
``st_write.py``, ``st_format.py``) would look like, so ``bench_persist.py
--candidate`` can measure it against today's engine (issue 23). Same file
format (format 3: the same metadata fields, XXH3-128 of every tensor, the
header digest, the weights fingerprint), same semantic checks
(:mod:`interpkv.cache.persist.file_checks`); only the container differs:

- save: checksums and finiteness over each tensor, then
  ``safetensors.torch.save_file(tensors, tmp, metadata)``, ``fsync`` and an
  atomic ``os.replace`` (the library builds the file; no threads, no
  ``sync_file_range``);
- load: ``safe_open`` parses and validates the container (offsets, overlap,
  dtypes, sizes); every tensor is ``get_tensor`` + ``clone`` (an owned copy),
  then hashed and checked for non-finite values, then the positions.

Files written here load with :meth:`KVCache.load` and the other way round.
"""

import json
import os
import struct

import safetensors
import safetensors.torch
import torch

from interpkv.cache.fingerprint import weights_fingerprint
from interpkv.cache.persist.cachefile import encode_user_metadata
from interpkv.cache.persist.checksums import SHA256, WRITTEN, header_digest
from interpkv.cache.persist.file_checks import (
    DTYPE_NAMES,
    FORMAT,
    FORMAT_VERSION,
    all_finite,
    check_checksums,
    check_finite,
    check_metadata,
    check_positions,
    check_tensors,
    check_weights,
    model_fingerprint,
    row_state_names,
)
from interpkv.cache.persist.st_format import tensor_bytes

__all__ = ["save", "load"]


def save(cache, path: str, metadata=None) -> None:
    """``cache.save(path, metadata)`` with the safetensors library writing the file."""
    user = encode_user_metadata(metadata)
    model = cache.model
    tensors = {"positions": cache.positions, "next_positions": cache.next_positions}
    tensors.update(cache.row_state)
    for i, layer in enumerate(cache.layers):
        keys, values = layer.view(cache.seq_len)
        tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = keys, values
    tensors = {name: t.contiguous() for name, t in tensors.items()}  # the library refuses strided views
    sums = {}
    for name, tensor in tensors.items():
        if not all_finite(tensor):
            raise ValueError(f"refusing to save: {name} holds NaN or infinite values")
        sums[name] = WRITTEN.new(tensor_bytes(tensor)).hexdigest()
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model": json.dumps(cache.signature, sort_keys=True),
        "weights_fingerprint": weights_fingerprint(model),
        "dtype": DTYPE_NAMES[cache.dtype],
        "batch_size": str(cache.batch_size),
        "seq_len": str(cache.seq_len),
        "window": "none" if cache.window is None else str(cache.window),
        "sinks": str(cache.sinks),
        WRITTEN.key: json.dumps(dict(sorted(sums.items())), sort_keys=True),
    }
    if user is not None:
        header["user_metadata"] = user
    header["header_sha256"] = SHA256.placeholder
    header["header_sha256"] = header_digest(header)
    tmp = f"{path}.candidate.tmp"
    safetensors.torch.save_file(tensors, tmp, metadata=header)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _offsets(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = json.loads(f.read(n))
    return {name: entry["data_offsets"] for name, entry in raw.items() if name != "__metadata__"}


def load(path: str, model, cache_type):
    """``KVCache.load(path, model)`` with the safetensors library reading the file."""
    with safetensors.safe_open(path, framework="pt") as f:  # the library parses and validates the container
        header = {"__metadata__": f.metadata()}
        offsets = _offsets(path)  # only for error messages naming a tensor's bytes
        for name in f.keys():
            piece = f.get_slice(name)
            header[name] = {"dtype": piece.get_dtype(), "shape": list(piece.get_shape()),
                            "data_offsets": offsets[name]}
        metadata = check_metadata(header, model, path, weights=False)
        expected = check_tensors(header, metadata, model, path)
        tensors = {name: f.get_tensor(name).clone() for name in expected}  # owned: the cache writes into them
    digests = {name: metadata["checksum"].new(tensor_bytes(t)).hexdigest() for name, t in tensors.items()}
    check_weights(header, metadata, model_fingerprint(metadata["version"], model), path)
    check_checksums(digests, header, metadata, path)
    check_finite(tensors, path)
    check_positions(tensors["positions"], tensors["next_positions"], metadata, model, path)
    n_layers = model.cfg.n_layers
    cache = cache_type.from_state(
        model,
        [tensors[f"layers.{i}.keys"] for i in range(n_layers)],
        [tensors[f"layers.{i}.values"] for i in range(n_layers)],
        tensors["positions"], tensors["next_positions"],
        window=metadata["window"], sinks=metadata["sinks"], copy=False,
    )
    cache.metadata = metadata["user"]
    cache.row_state = {name: tensors[name] for name in row_state_names(tensors)}
    return cache


if __name__ == "__main__":  # round trip against today's engine, both ways
    import tempfile

    import interpkv

    model = interpkv.zoo.load("llama", dtype=torch.float64)
    cache = interpkv.KVCache.for_model(model, 2)
    interpkv.forward(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)
    folder = tempfile.mkdtemp()
    a, b = os.path.join(folder, "a.safetensors"), os.path.join(folder, "b.safetensors")
    save(cache, a, metadata={"x": 1})
    cache.save(b, metadata={"x": 1})
    for loaded in (interpkv.KVCache.load(a, model), load(b, model, interpkv.KVCache), load(a, model, interpkv.KVCache)):
        assert torch.equal(loaded.positions, cache.positions) and loaded.metadata == {"x": 1}
        assert all(torch.equal(x.view(3)[0], y.view(3)[0]) for x, y in zip(loaded.layers, cache.layers))
    print("round trips ok")
