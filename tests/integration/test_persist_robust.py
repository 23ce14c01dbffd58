"""Persistence robustness: killed saves, modes, symlinks, special files, hostile headers, metadata.

Each test here failed before the fix it names (see the commit history).
"""

import ast
import errno
import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
import xxhash

import interpkv
from interpkv.cache import fingerprint
from interpkv.cache.persist import atomic, checksums, file_checks

from .lifecycle_helpers import padded_batch, tiny_model
from .test_persist import REPO, rewrite, rewrite_header

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


@pytest.fixture
def filled():
    model = tiny_model("neox")
    cache = interpkv.KVCache.for_model(model, 2)
    tokens, mask = padded_batch([[1, 2, 3, 4], [5, 6]], [0, 2])
    interpkv.forward(model, tokens, cache=cache, attention_mask=mask)
    return model, cache


@pytest.fixture
def alarm():
    """Fail instead of hanging: SIGALRM after 20 s."""
    if not hasattr(signal, "setitimer"):
        pytest.skip("needs SIGALRM")

    def fire(signum, frame):
        raise TimeoutError("load hung")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, 20)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------- atomic
KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch, interpkv
    from interpkv.cache.persist import cachefile as persist
    from tests.integration.lifecycle_helpers import tiny_model
    model = tiny_model("neox")
    cache = interpkv.KVCache.for_model(model)
    interpkv.forward(model, torch.tensor([[1, 2, 3]]), cache=cache)
    def killed(fd, tensors, metadata, checksum, inspect):
        os.write(fd, b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    persist.write_file = killed
    cache.save(sys.argv[1])
""")


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and stale-temp cleanup are POSIX-only")
def test_temp_file_of_a_killed_save_is_removed_by_the_next_save(filled, tmp_path):
    model, cache = filled
    path = tmp_path / "cache.safetensors"
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], env=ENV, cwd=REPO, timeout=300)
    assert done.returncode == -signal.SIGKILL
    (leftover,) = os.listdir(tmp_path)
    assert atomic.TEMP_PATTERN.match(leftover), leftover  # recognisably ours
    live = tmp_path / f".other.interpkv-{atomic._host_tag()}-{os.getppid()}-0000abcd.tmp"
    live.write_bytes(b"a save in progress in a live process")
    unrelated = tmp_path / ".cache.safetensors.abc123.tmp"
    unrelated.write_bytes(b"not ours")
    cache.save(path)
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, live.name, unrelated.name])
    assert interpkv.KVCache.load(path, model).seq_len == cache.seq_len


def test_stale_temp_newer_than_the_save_start_is_kept(tmp_path):
    dead = tmp_path / f".x.interpkv-{atomic._host_tag()}-999999999-0000abcd.tmp"
    dead.write_bytes(b"")
    assert atomic.remove_stale_temps(str(tmp_path), before=os.stat(dead).st_mtime - 1) == []
    assert atomic.remove_stale_temps(str(tmp_path), before=os.stat(dead).st_mtime + 1) == [str(dead)]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o664])
def test_save_over_a_file_keeps_its_mode(filled, tmp_path, mode):
    _, cache = filled
    path = tmp_path / "cache.safetensors"
    path.write_bytes(b"old")
    os.chmod(path, mode)
    cache.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_file_gets_the_umask_default(filled, tmp_path, umask):
    _, cache = filled
    previous = os.umask(umask)
    try:
        cache.save(tmp_path / "new.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o666 & ~umask


def test_save_never_writes_through_a_symlink(filled, tmp_path):
    """A link at the target is refused (another user's link in /tmp would redirect the save)."""
    model, cache = filled
    (tmp_path / "store").mkdir()
    real = tmp_path / "store" / "real.safetensors"
    interpkv.KVCache.for_model(model, 2).save(real)
    before = real.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(os.path.relpath(real, tmp_path))
    with pytest.raises(interpkv.errors.CacheSaveError, match=r"symbolic link.*os.path.realpath") as err:
        cache.save(link)
    assert err.value.errno == errno.ELOOP and err.value.leftover is None
    assert link.is_symlink() and real.read_bytes() == before  # neither the link nor its target changed
    assert os.listdir(tmp_path / "store") == ["real.safetensors"] and sorted(os.listdir(tmp_path)) == [
        "link.safetensors", "store"]
    cache.save(os.path.realpath(link))  # the explicit way, when the file is yours
    assert interpkv.KVCache.load(real, model).seq_len == cache.seq_len


# ---------------------------------------------------------- special files
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_loading_a_fifo_refuses_instead_of_hanging(filled, tmp_path, alarm):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(interpkv.CacheFileError, match=r"is a FIFO \(named pipe\), not a regular file"):
        interpkv.KVCache.load(tmp_path / "pipe", filled[0])


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_loading_a_device_or_directory_refuses(filled, tmp_path, alarm):
    with pytest.raises(interpkv.CacheFileError, match="is a character device, not a regular file"):
        interpkv.KVCache.load("/dev/null", filled[0])
    with pytest.raises(interpkv.CacheFileError, match="is a directory, not a regular file"):
        interpkv.KVCache.load(tmp_path, filled[0])


# ---------------------------------------------------------- hostile headers
def _deep_shape(h):
    h["positions"]["shape"] = "DEEP"


HOSTILE = {
    "deep-json-in-header": (
        lambda p: p.write_bytes(
            (lambda raw: struct.pack("<Q", len(raw)) + raw)(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}")),
        r"corrupted safetensors header \(JSON nested too deeply\)"),
    "deep-json-in-model-field": (
        lambda p: rewrite(p, metadata={"model": "[" * 100000 + "]" * 100000}),
        r"corrupted model fingerprint in the metadata \(JSON nested too deeply\)"),
    "model-field-is-an-int": (lambda p: rewrite(p, metadata={"model": "5"}), "corrupted model fingerprint"),
    "model-field-is-a-list": (lambda p: rewrite(p, metadata={"model": "[1, 2]"}), "corrupted model fingerprint"),
    "model-field-is-a-string": (lambda p: rewrite(p, metadata={"model": '"gpt"'}), "corrupted model fingerprint"),
    "huge-integer-in-header": (
        lambda p: rewrite_header(p, lambda h: h["__metadata__"].update(seq_len="9" * 5000)),
        "corrupted cache metadata|does not match its checksum"),
    "checksums-not-an-object": (
        lambda p: rewrite(p, metadata={checksums.WRITTEN.key: "[1]"}), r"corrupted tensor checksums"),
    "user-metadata-not-an-object": (
        lambda p: rewrite(p, metadata={"user_metadata": "[1]"}), r"corrupted user metadata \(JSON list"),
    "huge-next-positions": (
        lambda p: rewrite(p, tensors={"next_positions": torch.tensor([2**62, 2])}),
        r"row 0 stores positions \[0, 1, 2, 3\] but next_positions says it has seen 4611686018427387904"),
    "nan-key": (
        lambda p: rewrite(p, tensors={"layers.0.keys": torch.full((2, 4, 4, 8), float("nan"), dtype=torch.float64)}),
        r"tensor 'layers.0.keys' holds NaN or infinite values"),
    "inf-value": (
        lambda p: rewrite(p, tensors={"layers.1.values": torch.full((2, 4, 4, 8), float("inf"), dtype=torch.float64)}),
        r"tensor 'layers.1.values' holds NaN or infinite values"),
    "swapped-same-shape-offsets": (
        lambda p: rewrite_header(p, lambda h: h.update({
            "layers.0.keys": dict(h["layers.0.keys"], data_offsets=h["layers.1.keys"]["data_offsets"]),
            "layers.1.keys": dict(h["layers.1.keys"], data_offsets=h["layers.0.keys"]["data_offsets"])})),
        r"tensor 'layers.0.keys' does not match its XXH3-128 checksum"),
    "flipped-byte-in-values": (
        lambda p: p.write_bytes((lambda d: d[:-100] + bytes([d[-100] ^ 1]) + d[-99:])(p.read_bytes())),
        r"does not match its XXH3-128 checksum"),
    "edited-metadata-without-checksum": (
        lambda p: rewrite_header(p, lambda h: h["__metadata__"].update(sinks="0 ")),
        r"the header's metadata does not match its checksum"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_files_end_in_cache_file_error(filled, tmp_path, case, alarm):
    model, cache = filled
    path = tmp_path / "c.safetensors"
    cache.save(path)
    make, message = HOSTILE[case]
    make(path)
    with pytest.raises(interpkv.CacheFileError, match=message):
        interpkv.KVCache.load(path, model)


def test_nonfinite_cache_is_refused_at_save(filled, tmp_path):
    _, cache = filled
    cache.layers[0].keys[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.0.keys holds NaN or infinite values"):
        cache.save(tmp_path / "c.safetensors")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------- metadata
def test_metadata_round_trips_and_forks_carry_it(filled, tmp_path):
    model, cache = filled
    meta = {"prompt": "Once upon a time", "ids": [1, 2, 3], "nested": {"ok": True, "x": None, "f": 0.5}}
    cache.save(tmp_path / "c.safetensors", metadata=meta)
    loaded = interpkv.KVCache.load(tmp_path / "c.safetensors", model)
    assert loaded.metadata == meta
    fork = loaded.fork()
    fork.metadata["prompt"] = "changed"
    assert loaded.metadata["prompt"] == "Once upon a time"
    cache.save(tmp_path / "none.safetensors")
    assert interpkv.KVCache.load(tmp_path / "none.safetensors", model).metadata is None
    assert cache.metadata is None


@pytest.mark.parametrize("bad,error,message", [
    ([1, 2], TypeError, "metadata must be a dict of JSON values, got a list"),
    ({"x": object()}, TypeError, "metadata must be JSON-serialisable"),
    ({"x": {1, 2}}, TypeError, "metadata must be JSON-serialisable"),
    ({"x": (1, 2)}, TypeError, "tuples become lists"),
    ({1: "a"}, TypeError, "non-string keys become strings"),
    ({"x": float("nan")}, ValueError, "cannot be stored as JSON"),
    ({"x": "a" * (1024 * 1024)}, ValueError, r"metadata is 1,048,585 bytes as JSON; at most 1,048,576"),
], ids=["list", "object", "set", "tuple", "int-key", "nan", "too-big"])
@pytest.mark.unchecked_shapes  # checks interpkv's own error for a wrong argument
def test_bad_metadata_is_refused_before_writing(filled, tmp_path, bad, error, message):
    _, cache = filled
    with pytest.raises(error, match=message):
        cache.save(tmp_path / "c.safetensors", metadata=bad)
    assert os.listdir(tmp_path) == []


def test_format_1_file_without_metadata_still_loads(filled, tmp_path):
    """A file as the previous release wrote it: version 1, full weights SHA-256, no checksums."""
    model, cache = filled
    tensors = {"positions": cache.positions.contiguous(), "next_positions": cache.next_positions}
    for i, layer in enumerate(cache.layers):
        k, v = layer.view(cache.seq_len)
        tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = k.contiguous(), v.contiguous()
    meta = {"format": "interpkv.KVCache", "format_version": "1", "model": json.dumps(cache.signature, sort_keys=True),
            "weights_sha256": fingerprint.legacy_sha256(model), "dtype": "float64", "batch_size": "2",
            "seq_len": str(cache.seq_len), "window": "none", "sinks": "0"}
    safetensors.torch.save_file(tensors, tmp_path / "v1.safetensors", metadata=meta)
    loaded = interpkv.KVCache.load(tmp_path / "v1.safetensors", model)
    assert loaded.metadata is None and torch.equal(loaded.positions, cache.positions)


def test_format_2_file_written_by_safetensors_still_loads(filled, tmp_path):
    """A version-2 file as the previous release wrote it: ``safetensors.torch.save_file``'s layout."""
    model, cache = filled
    cache.metadata = None
    tensors = {"positions": cache.positions.contiguous(), "next_positions": cache.next_positions}
    for i, layer in enumerate(cache.layers):
        k, v = layer.view(cache.seq_len)
        tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = k.contiguous(), v.contiguous()
    tensors = {n: t.detach() for n, t in tensors.items()}
    sums = {n: hashlib.sha256(t.numpy().tobytes()).hexdigest() for n, t in tensors.items()}
    meta = {"format": "interpkv.KVCache", "format_version": "2", "model": json.dumps(cache.signature, sort_keys=True),
            "weights_fingerprint": fingerprint.weights_fingerprint(model), "dtype": "float64", "batch_size": "2",
            "seq_len": str(cache.seq_len), "window": "none", "sinks": "0",
            "tensor_sha256": json.dumps(sums, sort_keys=True), "user_metadata": json.dumps({"v": 2})}
    meta["header_sha256"] = file_checks.header_digest(meta)
    safetensors.torch.save_file(tensors, tmp_path / "v2.safetensors", metadata=meta)
    loaded = interpkv.KVCache.load(tmp_path / "v2.safetensors", model)
    assert loaded.metadata == {"v": 2} and torch.equal(loaded.positions, cache.positions)
    for a, b in zip(loaded.layers, cache.layers):
        assert all(torch.equal(x, y) for x, y in zip(a.view(loaded.seq_len), b.view(cache.seq_len)))
    data = (tmp_path / "v2.safetensors").read_bytes()  # and its checksums are still checked
    (tmp_path / "v2.safetensors").write_bytes(data[:-20] + bytes([data[-20] ^ 1]) + data[-19:])
    with pytest.raises(interpkv.CacheFileError, match="does not match its SHA-256 checksum"):
        interpkv.KVCache.load(tmp_path / "v2.safetensors", model)


def test_saves_write_format_3_with_an_xxh3_128_checksum_per_tensor(filled, tmp_path):
    """Format 3 records XXH3-128 (``tensor_xxh3_128``), not SHA-256, for every tensor's bytes."""
    _, cache = filled
    cache.save(tmp_path / "c.safetensors")
    with safetensors.safe_open(tmp_path / "c.safetensors", framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert meta["format_version"] == "3" and "tensor_sha256" not in meta
    sums = json.loads(meta["tensor_xxh3_128"])
    assert sums == {n: xxhash.xxh3_128(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                    for n, t in tensors.items()}
    assert meta["header_sha256"] == file_checks.header_digest(meta)


# ------------------------------------------------------- public state only
def test_from_state_rebuilds_a_cache_that_continues_identically(filled):
    model, cache = filled
    views = [layer.view(cache.seq_len) for layer in cache.layers]
    rebuilt = interpkv.KVCache.from_state(model, [k for k, _ in views], [v for _, v in views],
                                          cache.positions, cache.next_positions)
    nxt = torch.tensor([[9], [10]])
    assert torch.equal(interpkv.forward(model, nxt, cache=rebuilt), interpkv.forward(model, nxt, cache=cache.fork()))
    assert rebuilt.layers[0].keys.data_ptr() != cache.layers[0].keys.data_ptr()  # copied by default


@pytest.mark.unchecked_shapes  # checks interpkv's own error for a wrong argument
def test_from_state_names_the_wrong_shape(filled):
    model, cache = filled
    keys = [layer.view(cache.seq_len)[0] for layer in cache.layers]
    with pytest.raises(interpkv.CacheMismatchError,
                       match=r"layer 0 keys are torch.float64 \[2, 4, 3, 8\] .* need torch.float64 \[2, 4, 4, 8\]"):
        interpkv.KVCache.from_state(model, [k[:, :, :3] for k in keys], keys, cache.positions, cache.next_positions)
    with pytest.raises(interpkv.CacheMismatchError, match=r"1 key and 2 value tensors for a 2-layer model"):
        interpkv.KVCache.from_state(model, keys[:1], keys, cache.positions, cache.next_positions)


def test_persist_uses_only_public_state_and_never_imports_kvcache():
    folder = os.path.join(REPO, "interpkv", "cache", "persist")
    for module in sorted(os.listdir(folder)):
        if not module.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, module)).read())
        for node in ast.walk(tree):  # imports inside functions too: kvcache imports persist
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                assert "kvcache" not in ast.dump(node), f"{module}: {ast.unparse(node)}"
    tree = ast.parse(open(os.path.join(folder, "cachefile.py")).read())  # the one that reads a cache
    private = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
               and not n.attr.startswith("__")}
    assert not private, f"persist reaches into private attributes {private}"
    for order in ("import interpkv.cache.persist, interpkv.cache.kvcache",
                  "import interpkv.cache.kvcache, interpkv.cache.persist"):
        subprocess.run([sys.executable, "-c", order], check=True, env=ENV, cwd=REPO, timeout=120)
