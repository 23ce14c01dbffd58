"""File safety of save and load: no link followed, no leak at any instant, load as strict as safetensors.

- a directory swapped for a symlink during a save does not redirect it, and
  the clean-up finds the temporary file where it is;
- an interrupt at any line of the atomic write (sys.settrace) leaves the
  previous file intact, no temporary file and no open descriptor;
- load refuses a duplicate ``__metadata__`` (safetensors refuses duplicate
  keys) and user metadata larger than save would write;
- ``KVCache.load(path, None)`` names the model argument, not file corruption.
"""

import gc
import os
import struct
import sys

import pytest
import torch

import interpkv
from interpkv.cache.persist import atomic
from interpkv.cache.persist import cachefile as persist
from interpkv.errors import CacheFileError


@pytest.fixture
def filled():
    model = interpkv.zoo.load("gpt2")
    cache = interpkv.KVCache.for_model(model)
    interpkv.forward(model, torch.tensor([[1, 2, 3, 4]]), cache=cache)
    return model, cache


def _open_fds():
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


def test_a_directory_swapped_for_a_symlink_mid_save_does_not_redirect_it(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()

    def write(fd):
        os.write(fd, b"new")
        os.rename(work, tmp_path / "moved")  # the directory goes, a link to elsewhere takes its path
        os.symlink(elsewhere, work)

    atomic.atomic_write(work / "c.bin", write)
    assert os.listdir(elsewhere) == []  # nothing written through the link
    assert os.listdir(tmp_path / "moved") == ["c.bin"] and (tmp_path / "moved" / "c.bin").read_bytes() == b"new"


def test_a_failed_save_in_a_swapped_directory_removes_its_temp_where_it_is(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()

    def write(fd):
        os.rename(work, tmp_path / "moved")
        os.symlink(elsewhere, work)
        raise OSError(28, "No space left on device")

    with pytest.raises(interpkv.errors.CacheSaveError, match="no temporary file is left") as err:
        atomic.atomic_write(work / "c.bin", write)
    assert err.value.leftover is None
    assert os.listdir(tmp_path / "moved") == [] and os.listdir(elsewhere) == []


PACKAGE = os.path.dirname(interpkv.__file__) + os.sep


@pytest.mark.parametrize(
    "stride", [pytest.param(5, id="every-5th-line"), pytest.param(1, id="every-line", marks=pytest.mark.slow)]
)
def test_an_interrupt_at_any_line_of_a_save_leaks_nothing(filled, tmp_path, stride):
    model, cache = filled
    target = tmp_path / "c.safetensors"
    interpkv.KVCache.for_model(model).save(target)
    seen = {"lines": 0, "at": None}

    def local(frame, event, arg):
        if event == "line" and frame.f_code.co_filename == atomic.__file__:
            seen["lines"] += 1
            if seen["lines"] == seen["at"]:
                raise KeyboardInterrupt(f"injected at atomic.py:{frame.f_lineno}")
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename.startswith(PACKAGE) else None

    def save():
        sys.settrace(tracer)
        try:
            cache.save(target)
        finally:
            sys.settrace(None)

    save()
    total = seen["lines"]
    assert total > 20
    interpkv.KVCache.for_model(model).save(target)  # back to the empty cache's file
    fds = _open_fds()
    for at in range(1, total + 1, stride):
        seen.update(lines=0, at=at)
        try:
            save()
        except KeyboardInterrupt:
            gc.collect()
            assert os.listdir(tmp_path) == ["c.safetensors"], f"a temporary file was left (line {at})"
            leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in _open_fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")}
            assert not leaked, f"descriptors leaked at line {at}: {leaked}"
            loaded = interpkv.KVCache.load(target, model)  # the old file or the new one, complete
            assert loaded.seq_len in (0, cache.seq_len)
            if loaded.seq_len:
                interpkv.KVCache.for_model(model).save(target)


def _rewrite_header(path, edit):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = edit(data[8 : 8 + n].decode("utf-8"))
    raw = header.encode("utf-8")
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_load_refuses_a_duplicate_metadata_key(filled, tmp_path):
    model, cache = filled
    path = tmp_path / "c.safetensors"
    cache.save(path)
    _rewrite_header(path, lambda text: '{"__metadata__":{"format":"x"},' + text[1:])
    with pytest.raises(CacheFileError, match=r"key '__metadata__' appears twice"):
        interpkv.KVCache.load(path, model)


def test_load_caps_user_metadata_as_save_does(filled, tmp_path, monkeypatch):
    model, cache = filled
    path = tmp_path / "c.safetensors"
    big = {"blob": "x" * (persist.MAX_USER_METADATA_BYTES + 10)}
    with pytest.raises(ValueError, match="at most 1,048,576"):
        cache.save(path, metadata=big)
    monkeypatch.setattr(persist, "MAX_USER_METADATA_BYTES", 10 * persist.MAX_USER_METADATA_BYTES)
    cache.save(path, metadata=big)  # a writer without the cap (not KVCache.save)
    with pytest.raises(CacheFileError, match=r"user metadata is 1,048,5\d\d bytes.*at most 1,048,576"):
        interpkv.KVCache.load(path, model)


@pytest.mark.unchecked_shapes  # malformed arguments: interpkv's own error is the point
def test_load_without_a_model_names_the_model_argument(filled, tmp_path):
    _, cache = filled
    cache.save(tmp_path / "c.safetensors")
    with pytest.raises(TypeError, match=r"needs the HookedTransformer the cache was saved from, got NoneType"):
        interpkv.KVCache.load(tmp_path / "c.safetensors", None)
