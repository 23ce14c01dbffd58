"""Reading a cache file's body once, hashing each tensor while the next bytes are read.

:func:`read_body` reads the bytes after the header into one buffer that the
loaded cache's tensors then view, in steps of :data:`CHUNK_BYTES`; a worker
thread hashes step ``k`` (SHA-256 per tensor) while step ``k + 1`` is read
(``readinto`` and ``hashlib`` both release the GIL), so the checksums cost no
second pass over memory.

Everything goes through the one open file descriptor, and
:func:`check_unchanged` compares its ``fstat`` before and after: a file that
another program rewrites in place while it is being read (truncate, then
write) ends in :class:`CacheFileError`, never in a half-old, half-new cache
(and for format 2 the checksums would refuse such a mix anyway).
"""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Dict, Optional, Tuple

import torch

from interpkv.cache.st_format import hash_pieces
from interpkv.errors import CacheFileError

__all__ = ["read_exactly", "read_body", "check_unchanged", "CHUNK_BYTES"]

#: Bytes read (and hashed) per step.
CHUNK_BYTES = 8 * 2**20


def read_exactly(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes from ``f``: fewer only at the end of the file."""
    parts, remaining = [], n
    while remaining > 0:
        part = f.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _changed(path: str, detail: str) -> CacheFileError:
    return CacheFileError(
        f"{path} changed while it was being loaded ({detail}): another program is writing it; "
        "load it again once it is complete (cache.save replaces files atomically)"
    )


def read_body(
    f: BinaryIO, size: int, header: dict, path: str, hashing: bool = True
) -> Tuple["numpy.ndarray", Optional[Dict[str, str]]]:
    """The ``size`` bytes after the header (a uint8 array), and each tensor's SHA-256 (hex) if ``hashing``.

    Args:
        f: the open file, positioned right after the header.
        size: the body's size by the header (already checked against ``fstat``).
        header: the parsed, validated header (contiguous ``data_offsets``).

    Raises:
        CacheFileError: the file ended early or went on past ``size`` (it changed).
    """
    body = torch.empty(size, dtype=torch.uint8).numpy()  # not zero-filled (bytearray(n) memsets n bytes)
    view = memoryview(body)
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name)
                   for name, e in header.items() if name != "__metadata__")
    digests = {name: hashlib.sha256() for _, _, name in spans} if hashing else None
    # A thread pays off from two steps on (starting one costs ~0.1-5 ms on a busy machine).
    pool = ThreadPoolExecutor(1, thread_name_prefix="interpkv-hash") if hashing and size > CHUNK_BYTES else None
    try:
        hashed, position, first = [], 0, 0
        while position < size:
            n = f.readinto(view[position:position + CHUNK_BYTES])
            if not n:
                raise _changed(path, f"it ended after {position} of {size} bytes of tensor data")
            if hashing:
                end = position + n
                while first < len(spans) and spans[first][1] <= position:
                    first += 1
                pieces, i = [], first
                while i < len(spans) and spans[i][0] < end:
                    begin, stop, name = spans[i]
                    pieces.append((digests[name], view[max(begin, position):min(stop, end)]))
                    i += 1
                if pool is None:
                    hash_pieces(pieces)
                else:
                    hashed.append(pool.submit(hash_pieces, pieces))  # while the next step is read
            position += n
        if f.read(1):
            raise _changed(path, f"it holds more than the {size} bytes of tensor data its header describes")
        for future in hashed:
            future.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return body, None if digests is None else {name: d.hexdigest() for name, d in digests.items()}


def check_unchanged(f: BinaryIO, before: os.stat_result, path: str) -> None:
    """The open file's size and modification time are still those of ``before``."""
    after = os.fstat(f.fileno())
    if after.st_size != before.st_size:
        raise _changed(path, f"its size went from {before.st_size} to {after.st_size} bytes")
    if after.st_mtime_ns != before.st_mtime_ns:
        raise _changed(path, "it was modified")
