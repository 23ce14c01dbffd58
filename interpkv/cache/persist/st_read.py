"""Reading a cache file's body once, on two threads, hashing each piece right after it is read.

:func:`read_body` reads the bytes after the header into one buffer that the
loaded cache's tensors then view. The tensors are shared between
:data:`READ_WORKERS` threads (balanced by size); each reads its tensors with
positional reads (``os.preadv``, which releases the GIL) in pieces of
:data:`CHUNK_BYTES` and feeds each piece to the tensor's checksum
(:mod:`~interpkv.cache.persist.checksums`), and to an optional ``inspect`` (the load's
finiteness check), while it is still in the CPU cache: one pass over memory, and the kernel's copies out of the page
cache run on both cores (one reader copies at about half the speed of a parallel ``clone``).

Everything goes through the one open file descriptor, and
:func:`check_unchanged` compares its ``fstat`` before and after: a file that
another program rewrites in place while it is being read (truncate, then
write) ends in :class:`CacheFileError`, never in a half-old, half-new cache
(and the checksums would refuse such a mix anyway).
"""

import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

import numpy
import torch

from interpkv.cache.persist.checksums import Checksum
from interpkv.errors import CacheFileError

__all__ = ["read_exactly", "read_body", "check_unchanged", "CHUNK_BYTES", "READ_WORKERS"]

#: Bytes read (and hashed) per step; a multiple of 8, so that every piece of a
#: tensor holds whole elements (pieces start at multiples of it from the tensor's start).
CHUNK_BYTES = 8 * 2**20
#: Threads reading a body of more than one step.
READ_WORKERS = 2
#: From this size on, the body goes in memory advised to use transparent huge pages.
HUGE_PAGES_FROM = 4 * 2**20


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


def _buffer(size: int) -> "numpy.ndarray":
    """``size`` writable bytes for a body (a uint8 array), in huge pages where the system has them.

    The first write to each 4 KiB page of fresh memory is a page fault: for a
    1 GiB body, 262,144 faults took ~170 ms of a 240 ms read here and freeing
    the pages another ~90 ms. Anonymous memory advised ``MADV_HUGEPAGE`` faults
    in 2 MiB pages (the same read: ~70 ms, freed in ~3 ms). Where there is no
    such advice (macOS, Windows, a kernel without transparent huge pages),
    ordinary memory. Never zero-filled by us (``bytearray(n)`` memsets n bytes).
    """
    if size >= HUGE_PAGES_FROM and hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS"):
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # no transparent huge pages in this kernel: ordinary pages
            pass
        return numpy.frombuffer(memory, dtype=numpy.uint8)  # the array keeps the mapping alive
    return torch.empty(size, dtype=torch.uint8).numpy()


def _share(spans: List[Tuple[int, int, str]], n: int) -> List[List[Tuple[int, int, str]]]:
    """``spans`` dealt to ``n`` workers, largest first to the least loaded (each list in file order)."""
    loads = [0] * n
    shares: List[list] = [[] for _ in range(n)]
    for span in sorted(spans, key=lambda s: s[0] - s[1]):
        i = loads.index(min(loads))
        shares[i].append(span)
        loads[i] += span[1] - span[0]
    return [sorted(share) for share in shares if share]


_SEEK = threading.Lock()  # only where there is no os.preadv: seek + readinto must not interleave


def _read_at(f: BinaryIO, view: memoryview, offset: int) -> int:
    """Read into ``view`` from byte ``offset`` of ``f`` (fewer bytes only at the end of the file)."""
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [view], offset)
    with _SEEK:
        f.seek(offset)
        return f.readinto(view)


def read_body(
    f: BinaryIO, size: int, header: dict, path: str, checksum: Optional[Checksum] = None,
    inspect: Optional[Callable[[str, memoryview], None]] = None,
) -> Tuple["numpy.ndarray", Optional[Dict[str, str]]]:
    """The ``size`` bytes after the header (a writable uint8 array), and each tensor's ``checksum`` (hex) if given.

    Args:
        f: the open file, positioned right after the header.
        size: the body's size by the header (already checked against ``fstat``).
        header: the parsed, validated header (contiguous ``data_offsets``).
        checksum: the checksum to compute per tensor (None: read only).
        inspect: called as ``inspect(name, piece)`` on each (non-empty) piece of
            each tensor right after it is read, on the reading thread.

    Raises:
        CacheFileError: the file ended early or went on past ``size`` (it changed).
    """
    body = _buffer(size)
    view, start = memoryview(body), f.tell()
    spans = [(e["data_offsets"][0], e["data_offsets"][1], name)
             for name, e in header.items() if name != "__metadata__"]
    digests = None if checksum is None else {name: checksum.new() for _, _, name in spans}

    def read(share: List[Tuple[int, int, str]]) -> None:
        for begin, end, name in share:
            for position in range(begin, end, CHUNK_BYTES):
                piece = view[position:min(position + CHUNK_BYTES, end)]
                done = 0
                while done < len(piece):
                    n = _read_at(f, piece[done:], start + position + done)
                    if not n:
                        raise _changed(path, f"it ended after {position + done} of {size} bytes of tensor data")
                    done += n
                if digests is not None:
                    digests[name].update(piece)
                if inspect is not None:
                    inspect(name, piece)

    # Threads pay off from two steps on (starting one costs ~0.1-5 ms on a busy machine).
    shares = _share(spans, READ_WORKERS if size > CHUNK_BYTES else 1)
    if len(shares) <= 1:
        for share in shares:
            read(share)
    else:
        with ThreadPoolExecutor(len(shares), thread_name_prefix="interpkv-read") as pool:
            for future in [pool.submit(read, share) for share in shares]:
                future.result()
    if _read_at(f, memoryview(bytearray(1)), start + size):
        raise _changed(path, f"it holds more than the {size} bytes of tensor data its header describes")
    return body, None if digests is None else {name: d.hexdigest() for name, d in digests.items()}


def check_unchanged(f: BinaryIO, before: os.stat_result, path: str) -> None:
    """The open file's size and modification time are still those of ``before``."""
    after = os.fstat(f.fileno())
    if after.st_size != before.st_size:
        raise _changed(path, f"its size went from {before.st_size} to {after.st_size} bytes")
    if after.st_mtime_ns != before.st_mtime_ns:
        raise _changed(path, "it was modified")
