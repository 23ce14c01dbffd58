"""Format 3's fast paths: threaded reads and hashing, checks fused into them, huge pages, early writeback.

Small caches take the one-thread path; these tests shrink the step size (and
the huge-page threshold) so that a tiny cache goes through the same threaded,
fused code as a 1 GiB one, and check that nothing it promises changes: the
bytes, the checksums, every refusal, the old file on a failed save.
"""

import json
import mmap
import os
import struct
import sys

import pytest
import torch

import interpkv
from interpkv.cache.persist import atomic, checksums, st_read, st_write

from .lifecycle_helpers import padded_batch, tiny_model


@pytest.fixture
def threaded(monkeypatch):
    """Steps of 64 bytes: every tensor of a tiny cache is read and hashed in several steps, on threads."""
    monkeypatch.setattr(st_write, "CHUNK_BYTES", 64)
    monkeypatch.setattr(st_read, "CHUNK_BYTES", 64)
    monkeypatch.setattr(st_read, "HUGE_PAGES_FROM", 0)  # the body in an mmap advised for huge pages


@pytest.fixture
def filled():
    model = tiny_model("neox")
    cache = interpkv.KVCache.for_model(model, 2)
    tokens, mask = padded_batch([[1, 2, 3, 4, 5, 6, 7], [5, 6, 7]], [0, 4])
    interpkv.forward(model, tokens, cache=cache, attention_mask=mask)
    return model, cache


def _body(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), 8 + n, data


def test_threaded_save_and_load_continue_exactly(filled, threaded, tmp_path):
    model, cache = filled
    path = tmp_path / "c.safetensors"
    cache.save(path)
    header, start, data = _body(path)
    sums = json.loads(header["__metadata__"][checksums.WRITTEN.key])
    for name, entry in header.items():
        if name != "__metadata__":
            begin, end = entry["data_offsets"]
            assert sums[name] == checksums.WRITTEN.new(data[start + begin:start + end]).hexdigest(), name
    loaded = interpkv.KVCache.load(path, model)
    path.unlink()  # the loaded cache owns its memory: the file may go
    step = torch.tensor([[9], [10]])
    with torch.no_grad():
        assert torch.equal(interpkv.forward(model, step, cache=loaded), interpkv.forward(model, step, cache=cache))
    assert torch.equal(loaded.positions, cache.positions)


def test_a_corrupted_byte_in_any_step_is_found_by_the_threaded_read(filled, threaded, tmp_path):
    model, cache = filled
    path = tmp_path / "c.safetensors"
    cache.save(path)
    header, start, data = _body(path)
    for name in ("layers.0.keys", "layers.1.values"):
        begin, end = header[name]["data_offsets"]
        for offset in (begin, (begin + end) // 2, end - 1):  # first, middle and last step of the tensor
            corrupt = bytearray(data)
            corrupt[start + offset] ^= 0x10
            path.write_bytes(bytes(corrupt))
            with pytest.raises(interpkv.CacheFileError, match=f"{name}' does not match its XXH3-128 checksum"):
                interpkv.KVCache.load(path, model)


def test_nan_in_a_late_step_is_refused_at_save_and_leaves_the_old_file(filled, threaded, tmp_path):
    model, cache = filled
    path = tmp_path / "c.safetensors"
    cache.save(path)
    old = path.read_bytes()
    cache.layers[1].values[1, 0, 6, -1] = float("nan")  # in one of the last steps
    with pytest.raises(ValueError, match="refusing to save: layers.1.values holds NaN or infinite values"):
        cache.save(path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == [path.name]
    assert interpkv.KVCache.load(path, model).seq_len == cache.seq_len


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_bytes_are_refused_by_the_threaded_load(filled, threaded, tmp_path, bad):
    """A writer that stored an infinity with a consistent checksum: the fused check still finds it."""
    model, cache = filled
    path = tmp_path / "c.safetensors"
    cache.save(path)
    header, start, data = _body(path)
    begin, end = header["layers.1.keys"]["data_offsets"]
    at = start + end - 8  # the last float64 of the tensor
    data = data[:at] + struct.pack("<d", bad) + data[at + 8:]
    meta = header["__metadata__"]
    sums = json.loads(meta[checksums.WRITTEN.key])
    sums["layers.1.keys"] = checksums.WRITTEN.new(data[start + begin:start + end]).hexdigest()
    meta[checksums.WRITTEN.key] = json.dumps(sums)
    meta["header_sha256"] = checksums.header_digest(meta)
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(start - 8)
    assert len(raw) == start - 8
    path.write_bytes(data[:8] + raw + data[start:])
    with pytest.raises(interpkv.CacheFileError, match=r"tensor 'layers.1.keys' holds NaN or infinite values"):
        interpkv.KVCache.load(path, model)


def test_write_file_asks_for_writeback_of_exactly_the_bytes_it_wrote(filled, threaded, tmp_path, monkeypatch):
    _, cache = filled
    asked = []
    monkeypatch.setattr(st_write, "start_writeback", lambda fd, offset, length: asked.append((offset, length)))
    path = tmp_path / "c.safetensors"
    cache.save(path)
    _, start, data = _body(path)
    assert asked[0][0] == start and all(a + n == b for (a, n), (b, _) in zip(asked, asked[1:]))
    assert asked[-1][0] + asked[-1][1] == len(data)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_reaches_the_kernel_and_ignores_what_it_cannot_do(tmp_path):
    assert atomic._sync_file_range() is not None
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 10_000)
        atomic.start_writeback(fd, 0, 10_000)
    finally:
        os.close(fd)
    fd = os.open(tmp_path / "f", os.O_RDONLY)  # EBADF-like misuse: still nothing raised
    os.close(fd)
    atomic.start_writeback(fd, 0, 10)


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no transparent huge pages here")
def test_large_bodies_go_in_anonymous_memory_advised_for_huge_pages(monkeypatch):
    monkeypatch.setattr(st_read, "HUGE_PAGES_FROM", 4096)
    small, large = st_read._buffer(4095), st_read._buffer(4096)
    def owner(array):
        return getattr(array.base, "obj", array.base)  # numpy wraps the buffer in a memoryview

    assert not isinstance(owner(small), mmap.mmap) and isinstance(owner(large), mmap.mmap)
    large[:] = 7  # writable, private
    assert large.flags.writeable and int(large.sum()) == 7 * 4096


def test_a_17_mib_cache_round_trips_through_the_default_threaded_path(tmp_path):
    """No monkeypatching: big enough for two readers, several 8 MiB steps and a huge-page body."""
    model = tiny_model("neox", n_ctx=8192)
    gen = torch.Generator().manual_seed(0)
    shape = (2, model.cfg.n_heads, 8192, model.cfg.d_head)
    keys = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(model.cfg.n_layers)]
    values = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(model.cfg.n_layers)]
    positions = torch.arange(8192).repeat(2, 1)
    cache = interpkv.KVCache.from_state(model, keys, values, positions, torch.full((2,), 8192), copy=False)
    assert cache.nbytes > 2 * st_read.CHUNK_BYTES and cache.nbytes > st_read.HUGE_PAGES_FROM
    path = tmp_path / "big.safetensors"
    cache.save(path)
    loaded = interpkv.KVCache.load(path, model)
    for a, b in zip(loaded.layers, cache.layers):
        assert all(torch.equal(x, y) for x, y in zip(a.view(loaded.seq_len), b.view(cache.seq_len)))
    step = torch.tensor([[3], [4]])
    with torch.no_grad():
        assert torch.equal(interpkv.forward(model, step, cache=loaded), interpkv.forward(model, step, cache=cache))
    data = bytearray(path.read_bytes())
    data[-5000] ^= 1  # in `positions`, the last tensor of the file
    path.write_bytes(bytes(data))
    with pytest.raises(interpkv.CacheFileError, match="does not match its XXH3-128 checksum"):
        interpkv.KVCache.load(path, model)
