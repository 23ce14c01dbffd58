"""Reading the safetensors container format by hand, checking every number first.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``) and the
tensor bytes, little-endian and C-contiguous, at ``data_offsets`` within the
body. :func:`parse_header` checks the header against the file size (truncation,
trailing bytes, overlaps, alignment, dtype x shape = size) before any byte of
the body is touched; :func:`decode` then views the tensors in one buffer.
Nothing here unpickles anything.
"""

import json
import math
import os
import stat
import struct
import sys
from typing import BinaryIO, Dict, List, Tuple

import torch

from interpkv.errors import CacheFileError

__all__ = ["CacheFileError", "DTYPES", "MAX_HEADER_BYTES", "open_regular", "parse_header", "decode",
           "tensor_bytes"]

# A cache header lists 2 tensors per layer plus 2; even 1,000 layers fit in far less.
MAX_HEADER_BYTES = 16 * 1024 * 1024


DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "U8": torch.uint8,  # not in a cache, but parsed so that such files get a clear error
}

def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: str) -> BinaryIO:
    """``path`` opened for binary reading, after checking it is a regular file.

    A FIFO or a device would block forever or never end (``/dev/zero``). The
    type is checked before opening (``os.stat``) and again on the open file
    (``fstat``, which a swap between the two cannot fool); the open itself is
    non-blocking, so opening a FIFO cannot hang either.

    Raises:
        CacheFileError: ``path`` is a directory, FIFO, device or socket.
        FileNotFoundError: nothing is at ``path``.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CacheFileError(f"{path} is {_kind(os.stat(path).st_mode)}, not a regular file; "
                             "a cache is read from a file written by cache.save(path)")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CacheFileError(f"{path} is {_kind(mode)}, not a regular file; "
                                 "a cache is read from a file written by cache.save(path)")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes safetensors stores for ``tensor`` (little-endian, C order), CPU only."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    if sys.byteorder == "big" and tensor.element_size() > 1:
        data = tensor.detach().contiguous().numpy().byteswap().view("uint8").reshape(-1)
    return memoryview(data)


def parse_header(prefix: bytes, size: int, path: str) -> dict:
    """The safetensors JSON header, after checking it against the file's ``size``.

    Args:
        prefix: the file's first bytes: the 8-byte length and (up to) that many more.
        size: the file's size in bytes.
    """
    data = prefix
    # A safetensors header is JSON right after the 8-byte length, so byte 8 is
    # "{". Only then may byte 0 be anything (it is the length's low byte, 0x80
    # for one header length in 256): sniff pickles and zips only otherwise.
    looks_safetensors = data[8:9] == b"{"
    if not looks_safetensors and (data[:1] == b"\x80" or data[:4] == b"PK\x03\x04"):
        kind = "a zip archive (torch.save)" if data[:2] == b"PK" else "a Python pickle"
        raise CacheFileError(
            f"{path} looks like {kind}, not safetensors; interpkv never unpickles files. "
            "Save caches with cache.save(path)."
        )
    if size < 8 or len(data) < 8:  # len(data) < size: the file shrank while it was read
        raise CacheFileError(
            f"{path} is {min(size, len(data))} bytes: too short for a safetensors header (truncated?)"
        )
    (n_header,) = struct.unpack("<Q", data[:8])
    if n_header > size - 8 or n_header > MAX_HEADER_BYTES or len(data) < 8 + n_header:
        raise CacheFileError(
            f"{path}: the header length prefix says {n_header} bytes but the file has only "
            f"{size - 8} after it; the file is truncated or not safetensors"
        )
    try:
        header = json.loads(data[8 : 8 + n_header].decode("utf-8"))
    except RecursionError:
        raise CacheFileError(f"{path}: corrupted safetensors header (JSON nested too deeply)") from None
    except ValueError as error:  # not UTF-8, not JSON, an integer of > 4300 digits
        raise CacheFileError(f"{path}: corrupted safetensors header ({str(error)[:200]})") from None
    if not isinstance(header, dict):
        raise CacheFileError(f"{path}: corrupted safetensors header (JSON {type(header).__name__}, not an object)")
    body = size - 8 - n_header
    spans: List[Tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        spans.append((*entry_span(name, entry, path), name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise CacheFileError(
                f"{path}: tensor {name!r} starts at byte {begin} of the data but the previous "
                f"one ends at {cursor}; corrupted header (tensors must be contiguous)"
            )
        cursor = end
    if cursor > body:
        raise CacheFileError(
            f"{path}: the header describes {cursor} bytes of tensor data but the file holds "
            f"only {body}; the file is truncated"
        )
    if cursor < body:
        raise CacheFileError(
            f"{path}: the file holds {body - cursor} bytes more than its header describes "
            f"({body} instead of {cursor}); refusing a file with unaccounted data"
        )
    return header


def _short(value) -> str:
    """``repr(value)`` cut to 120 characters; a value nested too deeply to repr is named so."""
    try:
        return repr(value)[:120]
    except RecursionError:
        return "<nested too deeply>"


def entry_span(name: str, entry, path: str) -> Tuple[int, int]:
    """``(begin, end)`` of one tensor's bytes, after checking dtype, shape and size agree."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CacheFileError(
            f"{path}: corrupted header entry for tensor {name!r}: {_short(entry)}"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CacheFileError(
            f"{path}: tensor {name!r} has dtype {_short(dtype)}; a cache holds only "
            f"{sorted(DTYPES)}"
        )
    ints = lambda xs: isinstance(xs, list) and all(  # noqa: E731
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs
    )
    if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CacheFileError(
            f"{path}: corrupted header entry for tensor {name!r}: shape {_short(shape)}, "
            f"data_offsets {_short(offsets)}"
        )
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise CacheFileError(
            f"{path}: tensor {name!r} ({dtype} {shape}) needs {expected} bytes but its "
            f"data_offsets span {offsets[1] - offsets[0]}; corrupted header"
        )
    if offsets[0] % DTYPES[dtype].itemsize:
        raise CacheFileError(
            f"{path}: tensor {name!r} starts at byte {offsets[0]} of the data, not a multiple "
            f"of its {DTYPES[dtype].itemsize}-byte {dtype} elements; corrupted header"
        )
    return offsets[0], offsets[1]


def decode(body, header: dict, expected: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    """Tensors viewing ``body`` (the bytes after the header, a writable buffer), by the validated header.

    safetensors stores each tensor little-endian, C-contiguous, at ``data_offsets``
    within the body; every one of those numbers has been checked against the
    file size, dtype and shape before this runs. The tensors are writable views
    of one buffer the cache owns (safetensors' own readers either map the file,
    tying the cache to it, or return read-only tensors that need a second copy).
    """
    tensors = {}
    for name, (dtype_name, shape) in expected.items():
        dtype = DTYPES[dtype_name]
        begin, end = header[name]["data_offsets"]
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(body, dtype=torch.uint8, count=end - begin, offset=begin)
        tensor = flat.view(dtype).reshape(shape)
        if sys.byteorder == "big":  # the format is little-endian
            tensor = torch.from_numpy(tensor.numpy().byteswap(inplace=False))
        tensors[name] = tensor
    return tensors
