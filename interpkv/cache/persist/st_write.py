"""Writing a safetensors file by hand, hashing each tensor while its bytes go to disk.

The layout is the one :mod:`~interpkv.cache.persist.st_format` reads (and safetensors
writes): an 8-byte little-endian header length, the JSON header padded with
spaces to a multiple of 8 bytes, then each tensor's bytes, little-endian and
C-contiguous. Tensors are laid out by decreasing element size, then name, so
every tensor starts at a multiple of its element size (as in safetensors).

One pass over the bytes: the header needs every tensor's checksum
(:mod:`~interpkv.cache.persist.checksums`), which is only known once the bytes have
been written. So :func:`write_file` reserves the header's space (its length
does not depend on the digests: each has a fixed number of hex digits), writes the tensors straight from their memory (a strided
``[:, :, :seq_len]`` view is written run by run, never copied), and hashes each
run in worker threads while it is written (``hashlib``, ``xxhash`` and
``os.write`` all release the GIL on large buffers), and asks the kernel to start
writing each step to disk as soon as it is written
(:func:`~interpkv.cache.persist.atomic.start_writeback`), so that the final ``fsync``
finds most of the file already on its way. The real header is then
written over the reserved space.
"""

import itertools
import json
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, Optional

import torch

from interpkv.cache.persist.atomic import start_writeback
from interpkv.cache.persist.checksums import WRITTEN, Checksum
from interpkv.cache.persist.st_format import DTYPES  # the one table of safetensors dtype names

__all__ = ["write_file", "runs", "CHUNK_BYTES", "HASH_WORKERS"]

#: Bytes written (and hashed) per step; the hash of one step overlaps the write of the next.
CHUNK_BYTES = 8 * 2**20
#: Threads hashing while the main thread writes (tensor ``i`` goes to worker ``i % HASH_WORKERS``).
#: XXH3-128 (~26 GB/s a core here) keeps far ahead of the writer; SHA-256 (~1.6
#: GB/s, format 2) is slower than writing to the page cache and needs both.
HASH_WORKERS = 2


def runs(tensor: torch.Tensor) -> Iterator[memoryview]:
    """``tensor``'s bytes in C order as contiguous runs of its own memory (no copy on CPU).

    The trailing dimensions that are contiguous in memory form one run; the
    leading ones are iterated. A ``[batch, kv_head, :seq_len, d_head]`` view of
    a larger buffer gives ``batch x kv_head`` runs of ``seq_len x d_head``.
    """
    t = tensor.detach()
    if t.device.type != "cpu" or (sys.byteorder == "big" and t.element_size() > 1):
        t = t.cpu().contiguous()
        if sys.byteorder == "big" and t.element_size() > 1:  # the format is little-endian
            t = torch.from_numpy(t.numpy().byteswap())
    if t.numel() == 0:
        return
    if t.ndim == 0:
        t = t.reshape(1)
    lead, expected = t.ndim, 1
    while lead > 0 and (t.shape[lead - 1] == 1 or t.stride(lead - 1) == expected):
        expected *= t.shape[lead - 1]
        lead -= 1
    if lead == t.ndim:  # the last dimension itself is strided
        t, lead = t.contiguous(), 0
    for index in itertools.product(*(range(n) for n in t.shape[:lead])):
        block = t[index] if index else t
        yield memoryview(block.reshape(-1).view(torch.uint8).numpy())


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _header_bytes(entries: dict, metadata: Dict[str, str], size: Optional[int] = None) -> bytes:
    """The JSON header, padded with spaces to a multiple of 8 (or exactly to ``size``)."""
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    target = -(-len(raw) // 8) * 8 if size is None else size
    if len(raw) > target:
        raise AssertionError(f"header grew from {target} to {len(raw)} bytes after hashing")
    return raw + b" " * (target - len(raw))


def _write_all(fd: int, views: List[memoryview]) -> None:
    """Write every view in order (``os.write`` may write less than asked; the next call raises)."""
    for view in views:
        while len(view):
            view = view[os.write(fd, view):]


def _steps(tensors: Dict[str, torch.Tensor], order: List[str]) -> Iterator[list]:
    """``(name, bytes)`` pairs of every tensor in file order, in steps of about :data:`CHUNK_BYTES`.

    A piece never splits an element (it holds a whole number of the tensor's elements).
    """
    step, size = [], 0
    for name in order:
        itemsize = tensors[name].element_size()
        chunk = max(itemsize, CHUNK_BYTES - CHUNK_BYTES % itemsize)
        for view in runs(tensors[name]):
            for start in range(0, len(view), chunk):
                piece = view[start:start + chunk]
                step.append((name, piece))
                size += len(piece)
                if size >= CHUNK_BYTES:
                    yield step
                    step, size = [], 0
    if step:
        yield step


def write_file(
    fd: int,
    tensors: Dict[str, torch.Tensor],
    metadata: Callable[[Optional[Dict[str, str]]], Dict[str, str]],
    checksum: Checksum = WRITTEN,
    inspect: Optional[Callable[[str, memoryview], None]] = None,
) -> None:
    """Write ``tensors`` and their metadata to ``fd`` (at offset 0) as one safetensors file.

    Args:
        fd: a file descriptor open for writing, on an empty file.
        tensors: name -> tensor (CPU or not, contiguous or not).
        metadata: ``metadata(None)`` gives the string metadata with
            ``checksum.placeholder`` for every digest it will hold;
            ``metadata(sums)`` gives the final one for ``sums`` (name -> hex
            ``checksum`` of each tensor's bytes). The final JSON may not be longer.
        checksum: the per-tensor checksum (the one format 3 records).
        inspect: called as ``inspect(name, piece)`` on each piece (whole
            elements, little-endian) right after it is hashed, on the hashing
            thread; what it raises stops the write and is raised here.

    Raises:
        OSError: from ``os.write`` (no space, file size limit, I/O error, ...).
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    entries, offset = {}, 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    reserved = _header_bytes(entries, metadata(None))
    _write_all(fd, [memoryview(struct.pack("<Q", len(reserved)) + reserved)])
    written = 8 + len(reserved)
    digests = {name: checksum.new() for name in order}
    worker = {name: i % HASH_WORKERS for i, name in enumerate(order)}  # a tensor's pieces: one worker, in order

    def consume(pieces: list) -> None:
        for name, piece in pieces:
            digests[name].update(piece)
            if inspect is not None:
                inspect(name, piece)

    # Threads pay off from two steps on (starting one costs ~0.1-5 ms on a busy machine).
    pools = [ThreadPoolExecutor(1, thread_name_prefix=f"interpkv-hash-{i}") for i in range(HASH_WORKERS)
             ] if offset > CHUNK_BYTES else []
    try:
        hashed = []
        for step in _steps(tensors, order):
            if not pools:
                consume(step)
            for i, pool in enumerate(pools):
                mine = [(name, piece) for name, piece in step if worker[name] == i]
                if mine:
                    hashed.append(pool.submit(consume, mine))  # hashed while this step is written
            while hashed and hashed[0].done():  # a failed check stops the write at once
                hashed.pop(0).result()
            _write_all(fd, [piece for _, piece in step])
            size = sum(len(piece) for _, piece in step)
            start_writeback(fd, written, size)  # the disk works while the next step is written
            written += size
        for future in hashed:
            future.result()
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
    sums = {name: digest.hexdigest() for name, digest in digests.items()}
    header = _header_bytes(entries, metadata(sums), size=len(reserved))
    os.lseek(fd, 8, os.SEEK_SET)  # over the reserved header
    _write_all(fd, [memoryview(header)])
