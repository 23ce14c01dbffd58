"""Saving and loading a :class:`~interpkv.cache.KVCache` as a safetensors file.

The file holds only the stored slots (never the zero-filled preallocated
capacity: the "saved prompt cache kept its zero padding" bug, mlx-examples
#977) and everything needed to continue exactly where the cache stopped:

- tensors ``layers.{i}.keys`` / ``layers.{i}.values``
  ``[batch, kv_head, kv_pos, d_head]`` (keys after rotary), ``positions``
  ``[batch, kv_pos]`` (int64, ``-1`` = padding) and ``next_positions`` ``[batch]``;
- string metadata: ``format`` / ``format_version``, ``model`` (the
  architecture fields of :func:`interpkv.cache.kvcache.model_signature`, JSON),
  ``weights_sha256`` (a hash of the model's parameters), ``dtype``,
  ``batch_size``, ``seq_len``, ``window`` and ``sinks``.

Writes are atomic: a temporary file in the same directory is written, flushed
with ``fsync`` and renamed over the target with ``os.replace``, so the target is
always either the old file or the complete new one (an interrupted save leaves
the old file and removes its temporary file).

Loading trusts nothing. The safetensors header (8-byte little-endian length,
then JSON) is parsed and checked here, before any byte reaches safetensors:
sizes, offsets, dtypes and shapes against the metadata and the model, then
the positions against ``next_positions`` (the container checks live in
:mod:`interpkv.cache.st_format`). Any problem raises
:class:`CacheFileError` (a ``ValueError``) and no cache is returned. Nothing
is ever unpickled.
"""

import hashlib
import json
import os
import struct
import tempfile
import weakref
from typing import Dict, Tuple, Union

import safetensors.torch
import torch

from interpkv.core import tl as _tl
from interpkv.cache.st_format import DTYPES as _DTYPES
from interpkv.cache.st_format import MAX_HEADER_BYTES as _MAX_HEADER_BYTES
from interpkv.cache.st_format import CacheFileError, decode, parse_header
from interpkv.cache.kvcache import KVCache, model_signature
from interpkv.cache.layer import LayerCache
from interpkv.core.schemes import scheme_for

__all__ = ["CacheFileError", "save_cache", "load_cache", "weights_fingerprint", "FORMAT", "FORMAT_VERSION"]

FORMAT = "interpkv.KVCache"
FORMAT_VERSION = 1

_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


# ---------------------------------------------------------------- fingerprint
_FINGERPRINTS: "weakref.WeakKeyDictionary[_tl.HookedTransformer, Tuple[tuple, str]]" = (
    weakref.WeakKeyDictionary()
)


def weights_fingerprint(model: "_tl.HookedTransformer") -> str:
    """SHA-256 of the model's parameters (names, dtypes, shapes and bytes).

    Memoized per model and recomputed when any parameter is replaced or
    modified in place (tracked by its storage pointer and version counter).
    """
    params = sorted(model.named_parameters(), key=lambda item: item[0])
    state = tuple((name, p.data_ptr(), p._version, p.dtype, tuple(p.shape)) for name, p in params)
    memo = _FINGERPRINTS.get(model)
    if memo is not None and memo[0] == state:
        return memo[1]
    digest = hashlib.sha256()
    for name, p in params:
        digest.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
        data = p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(data.numpy().tobytes())
    _FINGERPRINTS[model] = (state, digest.hexdigest())
    return digest.hexdigest()


# ----------------------------------------------------------------------- save
def save_cache(cache: KVCache, path: Union[str, "os.PathLike[str]"]) -> None:
    """Write ``cache`` to ``path`` atomically (see the module docstring)."""
    model = cache.model
    if model is None:
        raise ValueError("the model this cache was made for no longer exists; nothing to fingerprint")
    length = cache.seq_len
    tensors = {
        "positions": cache.positions.contiguous().cpu(),
        "next_positions": cache.next_positions.contiguous().cpu(),
    }
    for i, layer in enumerate(cache.layers):
        keys, values = layer.view(length)
        tensors[f"layers.{i}.keys"] = keys.contiguous().cpu()  # only stored slots
        tensors[f"layers.{i}.values"] = values.contiguous().cpu()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model": json.dumps(cache.signature, sort_keys=True),
        "weights_sha256": weights_fingerprint(model),
        "dtype": _DTYPE_NAMES[cache.dtype],
        "batch_size": str(cache.batch_size),
        "seq_len": str(length),
        "window": "none" if cache.window is None else str(cache.window),
        "sinks": str(cache.sinks),
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.close(fd)
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # The directory is not fsynced: after a power loss the rename may be lost and
    # the previous file (complete, loadable) be back, but never a partial one.


# ----------------------------------------------------------------------- load
def load_cache(path: Union[str, "os.PathLike[str]"], model: "_tl.HookedTransformer") -> KVCache:
    """Read and fully validate a cache file for ``model`` (see the module docstring)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) == 8:
            prefix += f.read(min(struct.unpack("<Q", prefix)[0], _MAX_HEADER_BYTES))
        header = parse_header(prefix, size, path)
        metadata = _check_metadata(header, model, path)
        expected = _check_tensors(header, metadata, model, path)
        body = bytearray(size - len(prefix))
        if f.readinto(body) != len(body) or f.read(1):
            raise CacheFileError(f"{path} changed size while it was being loaded; load it again")
    tensors = decode(body, header, expected)
    device = next(iter(model.parameters())).device
    positions = tensors["positions"].to(device)
    next_positions = tensors["next_positions"].to(device)
    _check_positions(positions, next_positions, metadata, model, path)
    layers = [
        LayerCache.from_tensors(
            tensors[f"layers.{i}.keys"].to(device), tensors[f"layers.{i}.values"].to(device)
        )
        for i in range(model.cfg.n_layers)
    ]
    cache = KVCache.for_model(
        model, metadata["batch_size"], window=metadata["window"], sinks=metadata["sinks"], capacity=1
    )
    cache._install(layers, positions, next_positions)
    return cache


def _check_metadata(header: dict, model, path: str) -> dict:
    """Parsed metadata, after checking format, model, weights and dtype."""
    raw = header.get("__metadata__")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CacheFileError(
            f"{path} is a safetensors file but not an interpkv cache (metadata "
            f"format={None if not isinstance(raw, dict) else raw.get('format')!r}, expected "
            f"{FORMAT!r}); write caches with cache.save(path)"
        )
    if not all(isinstance(v, str) for v in raw.values()):
        raise CacheFileError(f"{path}: corrupted header: metadata values must be strings")
    missing = {"format_version", "model", "weights_sha256", "dtype", "batch_size", "seq_len",
               "window", "sinks"} - set(raw)
    if missing:
        raise CacheFileError(f"{path}: cache metadata lacks {sorted(missing)}; corrupted header")
    if raw["format_version"] != str(FORMAT_VERSION):
        raise CacheFileError(
            f"{path}: cache format version {raw['format_version']!r}; this interpkv reads "
            f"version {FORMAT_VERSION}"
        )
    try:
        saved_sig = json.loads(raw["model"])
    except json.JSONDecodeError:
        raise CacheFileError(f"{path}: corrupted model fingerprint in the metadata") from None
    sig = model_signature(model)
    if saved_sig != sig:
        differ = sorted(k for k in set(sig) | set(saved_sig) if sig.get(k) != saved_sig.get(k))
        detail = ", ".join(f"{k}: file {saved_sig.get(k)!r} vs model {sig.get(k)!r}" for k in differ)
        raise CacheFileError(
            f"{path} was saved from another model architecture ({detail}); load it with the "
            "model that made it"
        )
    model_dtype = _DTYPE_NAMES.get(model.cfg.dtype, str(model.cfg.dtype))
    if raw["dtype"] != model_dtype:
        raise CacheFileError(
            f"{path} holds a {raw['dtype']} cache but the model runs in {model_dtype}; "
            "load it into the model in the dtype it was saved from"
        )
    if raw["weights_sha256"] != weights_fingerprint(model):
        raise CacheFileError(
            f"{path} was saved from a model with the same architecture but different weights "
            f"(weights sha256 {raw['weights_sha256'][:12]}... vs "
            f"{weights_fingerprint(model)[:12]}...); its keys mean nothing to this model"
        )
    try:
        batch, length, sinks = int(raw["batch_size"]), int(raw["seq_len"]), int(raw["sinks"])
        window = None if raw["window"] == "none" else int(raw["window"])
    except ValueError:
        raise CacheFileError(f"{path}: corrupted cache metadata {raw!r}") from None
    if batch < 1 or length < 0 or sinks < 0 or (window is not None and window < 1) or (
        sinks and window is None
    ):
        raise CacheFileError(
            f"{path}: impossible cache metadata (batch_size={batch}, seq_len={length}, "
            f"window={window}, sinks={sinks})"
        )
    return {"batch_size": batch, "seq_len": length, "window": window, "sinks": sinks,
            "dtype": model.cfg.dtype}


def _check_tensors(header: dict, metadata: dict, model, path: str) -> Dict[str, tuple]:
    """Each expected tensor is present, with the dtype and shape the metadata implies.

    Returns:
        ``{name: (safetensors dtype, shape)}`` of the expected tensors.
    """
    cfg = model.cfg
    batch, length = metadata["batch_size"], metadata["seq_len"]
    kv_shape = [batch, _tl.kv_head_count(cfg), length, int(cfg.d_head)]
    float_name = {v: k for k, v in _DTYPES.items()}[metadata["dtype"]]
    expected = {"positions": ("I64", [batch, length]), "next_positions": ("I64", [batch])}
    for i in range(cfg.n_layers):
        expected[f"layers.{i}.keys"] = (float_name, kv_shape)
        expected[f"layers.{i}.values"] = (float_name, kv_shape)
    names = set(header) - {"__metadata__"}
    if names != set(expected):
        raise CacheFileError(
            f"{path}: tensors {sorted(names ^ set(expected))[:6]} are missing or unexpected "
            f"for a {cfg.n_layers}-layer cache; corrupted file"
        )
    for name, (dtype, shape) in expected.items():
        entry = header[name]
        if entry["dtype"] != dtype or entry["shape"] != shape:
            raise CacheFileError(
                f"{path}: tensor {name!r} is {entry['dtype']} {entry['shape']} but the metadata "
                f"(batch_size={batch}, seq_len={length}, dtype {metadata['dtype']}) and the model "
                f"imply {dtype} {shape}"
            )
    return expected


def _check_positions(positions, next_positions, metadata: dict, model, path: str) -> None:
    """Positions must be exactly what a cache that saw ``next_positions`` tokens holds."""
    window, sinks = metadata["window"], metadata["sinks"]
    if bool((positions < -1).any()) or bool((next_positions < 0).any()):
        raise CacheFileError(f"{path}: negative positions other than the -1 padding marker")
    limit = scheme_for(model).max_positions()
    if limit is not None and bool((next_positions > limit).any()):
        raise CacheFileError(
            f"{path}: next_positions {next_positions.tolist()} pass the model's n_ctx={limit}"
        )
    for row in range(positions.shape[0]):
        real = positions[row][positions[row] >= 0]
        m = int(next_positions[row])
        holds = torch.zeros(m, dtype=torch.bool)
        p = torch.arange(m)
        wanted = p >= 0 if window is None else (p < sinks) | (p >= m - window)
        ok = bool((real < m).all()) and (real.numel() < 2 or bool((real[1:] > real[:-1]).all()))
        if ok:
            holds[real.cpu()] = True
            ok = bool((holds == wanted).all())
        if not ok:
            raise CacheFileError(
                f"{path}: row {row} stores positions {real.tolist()[:8]}"
                f"{'...' if real.numel() > 8 else ''} but next_positions says it has seen {m} "
                f"tokens (window={window}, sinks={sinks}); positions and next_positions disagree"
            )
