"""Saving and loading a :class:`~interpkv.cache.KVCache` as a safetensors file.

Works from a cache's public state only (``cache.layers[i].view(cache.seq_len)``,
``positions``, ``next_positions``, ``window``, ``sinks``, ``signature``) and
builds loaded caches with the ``from_state`` of the class the caller passes
(:meth:`KVCache.load` passes its own); it never imports
:mod:`interpkv.cache.kvcache`, which imports it.

The file holds only the stored slots (never the zero-filled preallocated
capacity: the "saved prompt cache kept its zero padding" bug, mlx-examples
#977) and everything needed to continue exactly where the cache stopped:

- tensors ``layers.{i}.keys`` / ``layers.{i}.values``
  ``[batch, kv_head, kv_pos, d_head]`` (keys after rotary), ``positions``
  ``[batch, kv_pos]`` (int64, ``-1`` = padding) and ``next_positions`` ``[batch]``;
  optionally the cache's per-row state (:attr:`KVCache.row_state`: int64
  ``[batch]`` tensors under lowercase names, e.g. generation's held-back
  ``next_tokens`` / ``next_tokens_at``), carried without being interpreted;
- string metadata: ``format`` / ``format_version`` (3), ``model`` (the
  architecture fields of :func:`interpkv.cache.signature.model_signature`,
  JSON), ``weights_fingerprint`` (:mod:`interpkv.cache.fingerprint`),
  ``dtype``, ``batch_size``, ``seq_len``, ``window``, ``sinks``,
  ``tensor_xxh3_128`` (JSON ``{name: XXH3-128 of the tensor's bytes}``,
  :mod:`interpkv.cache.persist.checksums`),
  optionally ``user_metadata`` (the caller's JSON), and ``header_sha256`` (of
  all the other metadata entries).

Writes are atomic (:mod:`interpkv.cache.persist.atomic`): a temporary file next to the
target, ``fsync``, ``os.replace``; symlinks are written through and the
target's permissions kept. The file is written by
:mod:`interpkv.cache.persist.st_write` in one pass, each tensor hashed while it is
written and the weights fingerprint computed meanwhile. Any disk error raises
:class:`~interpkv.errors.CacheSaveError` (an ``OSError``) naming the path and
the cause; the previous file is then unchanged and no temporary file is left.

Loading trusts nothing: only regular files are opened (a FIFO or device would
hang), the safetensors header is parsed and checked here before any byte
reaches a tensor (:mod:`interpkv.cache.persist.st_format`), then metadata, shapes,
checksums, finiteness and positions (:mod:`interpkv.cache.persist.file_checks`). The
body is read once through the same file descriptor and hashed while it is read
(:mod:`interpkv.cache.persist.st_read`); a file changed underneath is detected. Any
problem raises :class:`CacheFileError` (a ``ValueError``; an ``OSError`` too
when the file cannot be read) and no cache is returned. Nothing is ever unpickled. Format-2 files (SHA-256
tensor checksums) and format-1 files (no checksums, full weights hash) still load.
"""

import contextlib
import errno
import json
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, Optional, Union

import torch

from interpkv.cache import provenance
from interpkv.cache.fingerprint import weights_fingerprint
from interpkv.cache.persist import st_format
from interpkv.cache.persist.atomic import atomic_write
from interpkv.cache.persist.checksums import SHA256, WRITTEN, header_digest
from interpkv.cache.persist.file_checks import (
    DTYPE_NAMES,
    FORMAT,
    FORMAT_VERSION,
    ROW_STATE_NAME,
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
from interpkv.cache.persist.st_format import DTYPES, MAX_HEADER_BYTES, CacheFileError, decode, open_regular, parse_header
from interpkv.cache.persist.st_read import check_unchanged, read_body, read_exactly
from interpkv.cache.persist.st_write import write_file
from interpkv.core import tl as _tl
from interpkv.errors import CacheFileNotFoundError, CacheReadError

__all__ = ["CacheFileError", "save_cache", "load_cache", "read_header", "read_provenance", "weights_fingerprint", "FORMAT",
           "FORMAT_VERSION", "MAX_USER_METADATA_BYTES"]

#: Largest caller metadata accepted by ``save`` (UTF-8 JSON bytes).
MAX_USER_METADATA_BYTES = st_format.MAX_USER_METADATA_BYTES  # load refuses more, too


def encode_user_metadata(metadata: Optional[dict]) -> Optional[str]:
    """``metadata`` as JSON, after checking it round-trips unchanged and is small.

    Raises:
        TypeError: not a dict, not JSON-serialisable, or changed by a JSON
            round trip (tuples, non-string keys).
        ValueError: NaN/infinity, nested too deeply, or over 1 MiB.
    """
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise TypeError(
            f"metadata must be a dict of JSON values, got a {type(metadata).__name__}; "
            "wrap it, e.g. metadata={'value': ...}"
        )
    try:
        text = json.dumps(metadata, allow_nan=False, ensure_ascii=False)
    except TypeError as error:
        raise TypeError(f"metadata must be JSON-serialisable: {error}; convert it to "
                        "dicts, lists, strings, numbers, booleans and None") from None
    except RecursionError:
        raise ValueError("metadata is nested too deeply to store as JSON") from None
    except ValueError as error:  # NaN / infinity, circular reference
        raise ValueError(f"metadata cannot be stored as JSON: {error}") from None
    size = len(text.encode("utf-8"))
    if size > MAX_USER_METADATA_BYTES:
        raise ValueError(
            f"metadata is {size:,} bytes as JSON; at most {MAX_USER_METADATA_BYTES:,} "
            "(1 MiB) fit in a cache header: store large data in a file of its own"
        )
    if json.loads(text) != metadata:
        raise TypeError(
            "metadata changes in a JSON round trip (tuples become lists, non-string keys "
            "become strings); use lists and string keys so that load returns what you saved"
        )
    return text


# ------------------------------------------------------- background work
#: From this size on, the weights fingerprint is computed in a thread while the
#: file is written or read (a thread costs ~0.1-5 ms to start on a busy machine).
_BACKGROUND_BYTES = 4 * 2**20


class _Done:
    """A finished computation, with the ``result()`` of a ``Future``."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


@contextlib.contextmanager
def _background(worth_it: bool) -> Iterator[Optional[ThreadPoolExecutor]]:
    """One worker thread if ``worth_it``, else None (work then runs at once)."""
    if not worth_it:
        yield None
        return
    with ThreadPoolExecutor(1, thread_name_prefix="interpkv-fingerprint") as pool:
        yield pool


def _submit(pool: Optional[ThreadPoolExecutor], fn, *args):
    return _Done(fn(*args)) if pool is None else pool.submit(fn, *args)


def _nonfinite_finder(dtypes: Dict[str, torch.dtype], found: Callable[[str], None]):
    """``inspect(name, piece)``, which calls ``found(name)`` on a piece of a float tensor with a NaN or infinity.

    The threads that hash (save) or read (load) the bytes call it on each piece
    while the piece is in the CPU cache: a pass of its own over a 1 GiB cache
    cost ~0.08 s of a ~0.4 s load. Pieces are little-endian, so on a big-endian
    host there is none (None): whole tensors are checked instead.
    """
    if sys.byteorder == "big":
        return None
    floats = {name: dtype for name, dtype in dtypes.items() if dtype.is_floating_point}

    def inspect(name: str, piece: memoryview) -> None:
        dtype = floats.get(name)
        if dtype is not None and not all_finite(torch.frombuffer(piece, dtype=torch.uint8).view(dtype)):
            found(name)

    return inspect


# ----------------------------------------------------------------------- save
#: Stands for the weights fingerprint in the reserved header (at least as long as one).
_FINGERPRINT_PLACEHOLDER = "0" * 160


def save_cache(
    cache: Any, path: Union[str, "os.PathLike[str]"], metadata: Optional[dict] = None
) -> None:
    """Write ``cache`` (and the caller's ``metadata``) to ``path`` atomically.

    See the module docstring for the format. Errors in the arguments are raised
    before the file system is touched; a disk error raises
    :class:`~interpkv.errors.CacheSaveError` and leaves the previous file.
    """
    user = encode_user_metadata(metadata)
    model = cache.model
    if model is None:
        raise ValueError("the model this cache was made for no longer exists; nothing to fingerprint")
    length = cache.seq_len
    tensors = {"positions": cache.positions, "next_positions": cache.next_positions}
    for name, tensor in cache.row_state.items():  # per-row state attached above the cache (generation's)
        if name in tensors or not ROW_STATE_NAME.fullmatch(name):
            raise ValueError(f"cannot save row state {name!r}: the name is not a lowercase identifier or "
                             "is one of the cache's own tensors")
        if tensor.dtype != torch.long or tuple(tensor.shape) != (cache.batch_size,):
            raise ValueError(f"cannot save row state {name!r}: it is {tensor.dtype} {list(tensor.shape)}, "
                             f"row state is int64 [{cache.batch_size}] (one value per row)")
        tensors[name] = tensor
    for i, layer in enumerate(cache.layers):
        tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = layer.view(length)  # stored slots
    with _background(cache.nbytes > _BACKGROUND_BYTES) as pool:
        fingerprint = _submit(pool, weights_fingerprint, model)  # overlaps the checks and the writing

        def refuse(name: str):
            raise ValueError(
                f"refusing to save: {name} holds NaN or infinite values, which load would "
                "reject as corruption; find where the forward pass overflowed (e.g. float16)"
            )

        inspect = _nonfinite_finder({name: t.dtype for name, t in tensors.items()}, refuse)
        if inspect is None:  # no check while hashing (big-endian): whole tensors, before writing
            for name, tensor in tensors.items():
                if not all_finite(tensor):
                    refuse(name)
        header = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "model": json.dumps(cache.signature, sort_keys=True),
            "weights_fingerprint": _FINGERPRINT_PLACEHOLDER,
            "dtype": DTYPE_NAMES[cache.dtype],
            "batch_size": str(cache.batch_size),
            "seq_len": str(length),
            "window": "none" if cache.window is None else str(cache.window),
            "sinks": str(cache.sinks),
            provenance.HEADER_KEY: provenance.describe(cache).to_json(),  # read back without the tensors
        }

        def complete(sums: Optional[Dict[str, str]]) -> Dict[str, str]:
            """The metadata for the tensors' checksums ``sums`` (None: placeholders of equal length)."""
            final = dict(header)
            if sums is not None:
                final["weights_fingerprint"] = fingerprint.result()
            final[WRITTEN.key] = json.dumps(
                {name: WRITTEN.placeholder if sums is None else sums[name] for name in sorted(tensors)},
                sort_keys=True,
            )
            if user is not None:
                final["user_metadata"] = user
            final["header_sha256"] = SHA256.placeholder if sums is None else header_digest(final)
            return final

        atomic_write(path, lambda fd: write_file(fd, tensors, complete, WRITTEN, inspect))


# ----------------------------------------------------------------------- load
def load_cache(path: Union[str, "os.PathLike[str]"], model: "_tl.HookedTransformer", cache_type: type) -> Any:
    """Read and fully validate a cache file for ``model`` (see the module docstring).

    Args:
        path: a file written by :meth:`KVCache.save`.
        model: the model it was saved from (or an identical one).
        cache_type: the class to build (:class:`KVCache`; anything with its ``from_state``).

    Raises:
        CacheFileError: for every reason the file cannot become a cache:
            :class:`~interpkv.errors.CacheFileNotFoundError` (also a
            ``FileNotFoundError``) when nothing is there,
            :class:`~interpkv.errors.CacheReadError` (also an ``OSError``) when
            it cannot be read, plain ``CacheFileError`` when its contents are
            wrong or changed while it was read. Only ``MemoryError`` passes as is.
    """
    path = os.fspath(path)
    try:
        cache = _load(path, model, cache_type)
    except (CacheFileError, MemoryError):
        raise
    except FileNotFoundError as error:
        raise CacheFileNotFoundError(path, errno.ENOENT) from error
    except OSError as error:
        raise CacheReadError(path, error.errno if error.errno is not None else errno.EIO) from error
    except Exception as error:  # a file changing underneath can break any step (struct.error, ...)
        raise CacheFileError(
            f"{path}: could not be loaded ({type(error).__name__}: {str(error)[:200]}); the file is "
            "corrupted or was changed while it was read: load it again"
        ) from error
    provenance.check_loaded(model, cache, path)  # a ProvenanceWarning, not a file error
    return cache


def _load(path: str, model: "_tl.HookedTransformer", cache_type) -> Any:
    with open_regular(path) as f:
        before = os.fstat(f.fileno())
        prefix = read_exactly(f, 8)
        if len(prefix) == 8:
            prefix += read_exactly(f, min(struct.unpack("<Q", prefix)[0], MAX_HEADER_BYTES))
        header = parse_header(prefix, before.st_size, path)
        metadata = check_metadata(header, model, path, weights=False)
        expected = check_tensors(header, metadata, model, path)
        with _background(before.st_size > _BACKGROUND_BYTES) as pool:
            mine = _submit(pool, model_fingerprint, metadata["version"], model)  # overlaps the read
            suspects: set = set()
            inspect = _nonfinite_finder({name: DTYPES[dtype] for name, (dtype, _) in expected.items()},
                                        suspects.add)
            body, digests = read_body(f, before.st_size - len(prefix), header, path, metadata["checksum"],
                                      inspect)
            check_unchanged(f, before, path)
            check_weights(header, metadata, mine.result(), path)
    check_checksums(digests, header, metadata, path)
    tensors = decode(body, header, expected)
    check_finite(tensors if inspect is None else {name: tensors[name] for name in suspects}, path)
    device = next(iter(model.parameters())).device
    tensors = {name: t.to(device) for name, t in tensors.items()}
    check_positions(tensors["positions"], tensors["next_positions"], metadata, model, path)
    n_layers = model.cfg.n_layers
    cache = cache_type.from_state(
        model,
        [tensors[f"layers.{i}.keys"] for i in range(n_layers)],
        [tensors[f"layers.{i}.values"] for i in range(n_layers)],
        tensors["positions"],
        tensors["next_positions"],
        window=metadata["window"],
        sinks=metadata["sinks"],
        copy=False,  # the tensors view a buffer nothing else holds
    )
    cache.metadata = metadata["user"]
    cache.row_state = {name: tensors[name] for name in row_state_names(tensors)}
    provenance.adopt(cache, provenance.from_header(header["__metadata__"], path))
    return cache


def read_header(path: Union[str, "os.PathLike[str]"]) -> Dict[str, str]:
    """A cache file's string metadata (``dtype``, ``seq_len``, ``provenance``, ...), from its header only.

    No tensor is read and no model is needed; nothing is checked beyond the
    header's structure (:meth:`KVCache.load` checks the rest).

    Raises:
        CacheFileError: not a safetensors file, or a corrupted header.
    """
    path = os.fspath(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = read_exactly(f, 8)
        if len(prefix) == 8:
            prefix += read_exactly(f, min(struct.unpack("<Q", prefix)[0], MAX_HEADER_BYTES))
        header = parse_header(prefix, size, path)
    return dict(header.get("__metadata__") or {})


def read_provenance(path: Union[str, "os.PathLike[str]"]) -> Optional["provenance.Provenance"]:
    """The provenance saved in a cache file, read from its header only (no tensor is read, no model needed).

    Returns:
        A :class:`~interpkv.cache.provenance.Provenance` (``weights``: the file's
        weights fingerprint), or None for a file saved without one (by an
        interpkv before provenance).

    Raises:
        CacheFileError: not a cache file, or a corrupted header.
    """
    path = os.fspath(path)
    return provenance.from_header(read_header(path), path)
