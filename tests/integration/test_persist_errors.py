"""Disk errors on save and every way a load can fail: one clear error each, nothing left behind.

Save: every ``OSError`` (no space, file size limit, read-only file system, no
permission, missing directory, I/O error) is one ``CacheSaveError`` naming the
path and the cause; the previous file is unchanged and no temporary file is
left. Causes are simulated for real where this machine allows (a missing
directory, ``RLIMIT_FSIZE`` in a subprocess, tiny or read-only tmpfs mounts when
``mount`` works) and by making the system call fail otherwise (tests run as
root, and root ignores permissions).

Load: every failure is a ``CacheFileError`` naming the path, including a file
that another program rewrites in place while it is being read.
"""

import collections
import contextlib
import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import interpkv
from interpkv.cache.persist import cachefile as persist
from interpkv.errors import CacheFileNotFoundError, CacheReadError, CacheSaveError

from .lifecycle_helpers import padded_batch, tiny_model
from .test_persist import REPO

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def _cache(model, n_tokens: int, seed: int = 0):
    cache = interpkv.KVCache.for_model(model, 2)
    gen = torch.Generator().manual_seed(seed)
    tokens, mask = padded_batch([torch.randint(0, 50, (n,), generator=gen).tolist() for n in (n_tokens, 2)],
                                [0, n_tokens - 2])
    with torch.no_grad():
        interpkv.forward(model, tokens, cache=cache, attention_mask=mask)
    return cache


@pytest.fixture(scope="module")
def model():
    return tiny_model("neox")


def _assert_clean_failure(error: CacheSaveError, path, code, old: bytes = None):
    assert isinstance(error, OSError) and error.errno == code and error.path == str(path)
    message = str(error)
    assert str(path) in message and errno.errorcode[code] in message, message
    assert ("the previous file is unchanged" if old is not None else "no file was created") in message
    assert "no temporary file is left" in message
    if old is not None:
        assert path.read_bytes() == old
    assert os.listdir(path.parent) == ([path.name] if old is not None else [])


# ------------------------------------------------------------ save, for real
def test_missing_directory(model, tmp_path):
    path = tmp_path / "no-such-dir" / "c.safetensors"
    with pytest.raises(CacheSaveError) as info:
        _cache(model, 4).save(path)
    assert "no such file or directory (ENOENT); the directory does not exist" in str(info.value)
    assert info.value.errno == errno.ENOENT and os.listdir(tmp_path) == []


FSIZE_SAVE = textwrap.dedent("""
    import json, os, resource, signal, sys, torch, interpkv
    from tests.integration.lifecycle_helpers import tiny_model
    from tests.integration.test_persist_errors import _cache
    model = tiny_model("neox")
    path = sys.argv[1]
    _cache(model, 4).save(path)
    old = open(path, "rb").read()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(old) + 4096, resource.RLIM_INFINITY))
    try:
        _cache(model, 60).save(path)
        print(json.dumps({"raised": None}))
    except Exception as error:
        print(json.dumps({"raised": type(error).__name__, "errno": getattr(error, "errno", None),
                          "message": str(error), "old_kept": open(path, "rb").read() == old,
                          "files": os.listdir(os.path.dirname(path))}))
""")


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXFSZ"), reason="needs RLIMIT_FSIZE / SIGXFSZ")
def test_file_size_limit_in_a_subprocess(tmp_path):
    path = tmp_path / "c.safetensors"
    done = subprocess.run([sys.executable, "-c", FSIZE_SAVE, str(path)], env=ENV, cwd=REPO, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["raised"] == "CacheSaveError" and result["errno"] == errno.EFBIG, result
    assert f"could not save cache to {path}: file too large (EFBIG)" in result["message"]
    assert "RLIMIT_FSIZE" in result["message"] and result["old_kept"] and result["files"] == [path.name]


@contextlib.contextmanager
def _tmpfs(where, options):
    """A tmpfs mounted at ``where`` (skips the test when this machine does not allow it)."""
    where.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_no_space_left_on_a_tiny_tmpfs(model, tmp_path):
    with _tmpfs(tmp_path / "small", "size=64k") as small:
        path = small / "c.safetensors"
        _cache(model, 4).save(path)
        old = path.read_bytes()
        with pytest.raises(CacheSaveError) as info:
            _cache(model, 60).save(path)  # ~120 KB of keys and values
        _assert_clean_failure(info.value, path, errno.ENOSPC, old)
        assert "no space left on device (ENOSPC); free space" in str(info.value)


def test_read_only_file_system(model, tmp_path):
    with _tmpfs(tmp_path / "ro", "size=64k") as ro:
        path = ro / "c.safetensors"
        _cache(model, 4).save(path)
        old = path.read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with pytest.raises(CacheSaveError) as info:
            _cache(model, 6).save(path)
        _assert_clean_failure(info.value, path, errno.EROFS, old)
        assert "read-only file system (EROFS); the file system is mounted read-only" in str(info.value)


# ------------------------------------------------- save, failing system calls
def _failing(real, code, when):
    def call(*args, **kwargs):
        if when(*args):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)
    return call


def _is_temp(path, *rest):
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(".tmp")


CALLS = {  # name: (function of os, errno, when it fails)
    "open-EACCES": ("open", errno.EACCES, _is_temp),
    "open-EROFS": ("open", errno.EROFS, _is_temp),
    "write-ENOSPC": ("write", errno.ENOSPC, lambda fd, data: True),
    "write-EFBIG": ("write", errno.EFBIG, lambda fd, data: True),
    "write-EDQUOT": ("write", errno.EDQUOT, lambda fd, data: True),
    "fsync-EIO": ("fsync", errno.EIO, lambda fd: True),
    "replace-EACCES": ("replace", errno.EACCES, lambda a, b: True),
}


@pytest.mark.parametrize("case", list(CALLS), ids=list(CALLS))
@pytest.mark.parametrize("existing", [True, False], ids=["over-a-file", "new-file"])
def test_every_disk_error_is_one_cache_save_error(model, tmp_path, monkeypatch, case, existing):
    name, code, when = CALLS[case]
    path = tmp_path / "c.safetensors"
    old = None
    if existing:
        _cache(model, 4).save(path)
        old = path.read_bytes()
    cache = _cache(model, 6)
    monkeypatch.setattr(os, name, _failing(getattr(os, name), code, when))
    with pytest.raises(CacheSaveError) as info:
        cache.save(path)
    monkeypatch.undo()
    _assert_clean_failure(info.value, path, code, old)
    assert isinstance(info.value.__cause__, OSError)  # the original error is chained


def test_a_write_that_stops_half_way_leaves_the_old_file(model, tmp_path, monkeypatch):
    """``os.write`` writes part of a buffer, then the disk is full (what the kernel does)."""
    path = tmp_path / "c.safetensors"
    _cache(model, 4).save(path)
    old, real, calls = path.read_bytes(), os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, memoryview(data)[: max(1, len(data) // 2)])

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(CacheSaveError) as info:
        _cache(model, 6).save(path)
    monkeypatch.undo()
    _assert_clean_failure(info.value, path, errno.ENOSPC, old)


def test_cache_save_error_pickles_and_is_caught_as_oserror():
    import pickle

    error = CacheSaveError("/x/c.safetensors", errno.ENOSPC, previous=True)
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.errno == errno.ENOSPC and again.filename == "/x/c.safetensors"
    with pytest.raises(OSError):
        raise error


# ------------------------------------------------------------------ load
def test_missing_file_is_a_cache_file_error_and_a_file_not_found_error(model, tmp_path):
    with pytest.raises(CacheFileNotFoundError) as info:
        interpkv.KVCache.load(tmp_path / "none.safetensors", model)
    assert isinstance(info.value, interpkv.CacheFileError) and isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "none.safetensors") in str(info.value) and info.value.errno == errno.ENOENT


def test_an_io_error_while_reading_is_a_cache_read_error(model, tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    _cache(model, 4).save(path)

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(persist, "read_body", fail)
    with pytest.raises(CacheReadError, match=r"c.safetensors: could not read the cache file: input/output error \(EIO\)"):
        interpkv.KVCache.load(path, model)


CHANGES = {  # what another program does to the file right after the load's fstat
    "shrinks-below-8-bytes": lambda path, data: path.write_bytes(data[:4]),
    "shrinks-in-the-body": lambda path, data: path.write_bytes(data[: len(data) - 100]),
    "grows": lambda path, data: path.write_bytes(data + b"\0" * 64),
    "same-size-other-bytes": lambda path, data: path.write_bytes(data[:-64] + bytes(64)),
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_file_changed_right_after_fstat(model, tmp_path, monkeypatch, change):
    """The load's own ``fstat`` sees the full file; then it changes (observed: raw struct.error)."""
    path = tmp_path / "c.safetensors"
    _cache(model, 4).save(path)
    data, real, calls = path.read_bytes(), os.fstat, []

    def fstat(fd):
        result = real(fd)
        calls.append(fd)
        if len(calls) == 2:  # open_regular's check, then the load's size
            CHANGES[change](path, data)
        return result

    monkeypatch.setattr(os, "fstat", fstat)
    with pytest.raises(interpkv.CacheFileError, match=str(path)):
        interpkv.KVCache.load(path, model)


def test_loads_during_non_atomic_rewrites_are_a_valid_version_or_cache_file_error(model, tmp_path):
    """Another program rewrites the file in place (truncate + write) while we load it, ~1.5 s."""
    path = tmp_path / "c.safetensors"
    versions = [_cache(model, 6, seed) for seed in (1, 2)] + [_cache(model, 9, 3)]  # two sizes
    blobs = []
    for i, cache in enumerate(versions):
        cache.save(tmp_path / f"v{i}.safetensors")
        blobs.append((tmp_path / f"v{i}.safetensors").read_bytes())
    assert len(blobs[0]) == len(blobs[1]) != len(blobs[2])
    path.write_bytes(blobs[0])
    stop = threading.Event()

    def rewrite():
        i = 0
        with open(path, "r+b", buffering=0) as f:
            while not stop.is_set():
                blob = blobs[i % 3]
                f.seek(0)
                f.truncate()
                for start in range(0, len(blob), 1000):  # several writes: readers see partial files
                    f.write(blob[start:start + 1000])
                i += 1
                stop.wait(0.004 * (i % 4))  # sometimes the complete file stays a little while

    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    loaded, failed, deadline = 0, collections.Counter(), time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            try:
                cache = interpkv.KVCache.load(path, model)
            except interpkv.CacheFileError as error:
                failed[str(error).replace(str(path), "")[:60]] += 1  # the message without the path
                continue
            loaded += 1
            assert any(cache.seq_len == v.seq_len and torch.equal(cache.positions, v.positions) and all(
                torch.equal(a.view(cache.seq_len)[0], b.view(v.seq_len)[0]) and
                torch.equal(a.view(cache.seq_len)[1], b.view(v.seq_len)[1])
                for a, b in zip(cache.layers, v.layers)) for v in versions), "a mix of versions loaded"
    finally:
        stop.set()
        writer.join(10)
    assert loaded + sum(failed.values()) >= 10, "the load loop hardly ran"
    print(f"{loaded} loads succeeded; failures: {dict(failed)}")
