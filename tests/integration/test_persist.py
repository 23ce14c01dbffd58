"""Saving and loading caches: exact resume in a fresh process, atomic writes, refusals.

Every malformed file must raise ``interpkv.CacheFileError`` (a ValueError) with a
message naming the problem, before anything is unpickled or any cache returned.
"""

import functools
import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import interpkv
from interpkv.cache.persist import cachefile as persist
from interpkv.cache.persist import checksums, file_checks

from .lifecycle_helpers import D_VOCAB, SCHEMES, padded_batch, reference
from .lifecycle_helpers import tiny_model as build_model

HELPERS = os.path.join(os.path.dirname(__file__), "lifecycle_helpers.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# float64 agrees with uncached TransformerLens to ~1e-14 (1e-10 = summation order
# only); float32 accumulates ~1e-6 rounding over two layers, hence 1e-5.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
tiny_model = functools.lru_cache(maxsize=None)(build_model)


# ---------------------------------------------------------------- exact resume
def test_resume_in_a_fresh_process_equals_one_uncached_forward(tmp_path):
    """Prefill A (left padded, ragged), save, load in a subprocess, feed B == uncached A+B."""
    gen = torch.Generator().manual_seed(0)
    jobs, expected = [], []
    for scheme in SCHEMES:
        for dtype in ("float64", "float32"):
            for window, sinks in ((None, 0), (4, 1)):
                model = tiny_model(scheme, getattr(torch, dtype))
                part_a = [torch.randint(0, D_VOCAB, (n,), generator=gen).tolist() for n in (6, 3)]
                part_b = torch.randint(0, D_VOCAB, (2, 4), generator=gen).tolist()
                tokens, mask = padded_batch(part_a, [0, 3])
                cache = interpkv.KVCache.for_model(model, 2, window=window, sinks=sinks)
                interpkv.forward(model, tokens, cache=cache, attention_mask=mask)
                name = f"{scheme}-{dtype}-{window}"
                cache.save(tmp_path / f"{name}.safetensors")
                jobs.append(dict(scheme=scheme, dtype=dtype, part_b=part_b,
                                 cache=str(tmp_path / f"{name}.safetensors"),
                                 out=str(tmp_path / f"{name}.out.safetensors")))
                want = [reference(model, a + b, window, sinks)[-4:] for a, b in zip(part_a, part_b)]
                expected.append((name, dtype, torch.stack(want), [len(a) + 4 for a in part_a]))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, HELPERS, "resume", str(tmp_path / "jobs.json")],
                   check=True, env=env, timeout=300)
    for job, (name, dtype, want, lengths) in zip(jobs, expected):
        got = safetensors.torch.load_file(job["out"])
        err = (got["logits"] - want).abs().max().item()
        assert err < TOLERANCE[dtype], f"{name}: resumed logits differ from uncached by {err}"
        assert got["next_positions"].tolist() == lengths


def test_file_holds_only_stored_slots(tmp_path):
    """A 3-token prompt in a 64-slot buffer writes 3 slots, not 64 (mlx-examples #977)."""
    model = tiny_model("llama")
    cache = interpkv.KVCache.for_model(model, 2, capacity=64)
    interpkv.forward(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)
    path = tmp_path / "c.safetensors"
    cache.save(path)
    data = path.read_bytes()
    (n_header,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n_header])
    assert header["layers.0.keys"]["shape"] == [2, 2, 3, 8]  # [batch, kv_head (GQA), slots, d_head]
    assert len(data) == 8 + n_header + cache.nbytes + 8 * cache.batch_size  # + next_positions
    loaded = interpkv.KVCache.load(path, model)
    assert torch.equal(loaded.positions, cache.positions) and loaded.nbytes == cache.nbytes


# ------------------------------------------------------------------- atomicity
@pytest.fixture
def saved(tmp_path):
    model = tiny_model("neox")
    cache = interpkv.KVCache.for_model(model, 2)
    tokens, mask = padded_batch([[1, 2, 3, 4], [5, 6]], [0, 2])
    interpkv.forward(model, tokens, cache=cache, attention_mask=mask)
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    return model, cache, path


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_interrupted_save_keeps_the_old_file_and_leaves_no_temp(saved, monkeypatch, where):
    model, cache, path = saved
    old = path.read_bytes()
    interpkv.forward(model, torch.tensor([[7], [8]]), cache=cache)

    def interrupted(*args, **kwargs):
        if where == "write":  # half a file reaches the disk, then the process is interrupted
            os.write(args[0], safetensors.torch.save({"x": torch.zeros(10)})[:40])
        raise KeyboardInterrupt

    target = {"write": (persist, "write_file"), "fsync": (persist.os, "fsync"),
              "replace": (persist.os, "replace")}[where]
    monkeypatch.setattr(*target, interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert os.listdir(path.parent) == [path.name]
    assert interpkv.KVCache.load(path, model).seq_len == 4


def test_every_truncation_of_a_file_refuses_to_load(saved):
    model, _, path = saved
    data = path.read_bytes()
    (n_header,) = struct.unpack("<Q", data[:8])
    cuts = sorted({0, 4, 7, 8, 9, 8 + n_header // 2, 8 + n_header, 8 + n_header + 1,
                   (len(data) + n_header) // 2, len(data) - 8, len(data) - 1})
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(interpkv.CacheFileError):
            interpkv.KVCache.load(path, model)


# ------------------------------------------------------------ malformed inputs
def rewrite(path, *, tensors=None, metadata=None):
    """Re-serialize a cache file with some tensors or metadata replaced.

    Checksums are recomputed, as a self-consistent but buggy writer would: the
    semantic checks behind them must still catch the problem.
    """
    data = path.read_bytes()
    (n_header,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n_header])["__metadata__"]
    current = safetensors.torch.load(data)
    current.update(tensors or {})
    meta[checksums.WRITTEN.key] = json.dumps(
        {n: checksums.WRITTEN.new(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
         for n, t in current.items()})
    meta.update(metadata or {})
    meta["header_sha256"] = file_checks.header_digest(meta)
    path.write_bytes(safetensors.torch.save(current, metadata=meta))


def rewrite_header(path, change):
    """Edit the raw JSON header (keeping the tensor bytes) with ``change(header)``."""
    data = path.read_bytes()
    (n_header,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n_header])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n_header :])


class Evil:
    """Unpickling this creates a marker file: loading must never unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _misalign(path):
    """Shift every tensor by one byte (one pad byte first): offsets stay consistent, alignment breaks."""

    def shift(header):
        for name, entry in header.items():
            if name != "__metadata__":
                entry["data_offsets"] = [o + 1 for o in entry["data_offsets"]]
        header["pad"] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}

    data = path.read_bytes()
    (n_header,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n_header])
    shift(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" + data[8 + n_header :])


def _corrupt_json(path, model):
    data = bytearray(path.read_bytes())
    data[8] = ord("x")  # the header's opening brace
    path.write_bytes(bytes(data))


def _rename_metadata_key(path, model):
    data = bytearray(path.read_bytes())
    data[10:14] = b"}}{{"  # '{"__metadata__"' becomes '{"}}{{tadata__"': valid JSON, bad entry
    path.write_bytes(bytes(data))


def _invalid_utf8(path, model):
    data = bytearray(path.read_bytes())
    data[12] = 0xFF
    path.write_bytes(bytes(data))


MALFORMED = {
    # name: (make the bad file from a valid one, or return another model to load it
    # into; the expected message)
    "another-architecture": (
        lambda p, m: tiny_model("gptj"),
        r"saved from another model architecture \(positional: file 'rotary \(rotate-half, "
        r"rotary_dim 4\)' vs model 'rotary \(adjacent pairs, rotary_dim 4\)'\)",
    ),
    "other-weights": (
        lambda p, m: build_model("neox", seed=1),
        "same architecture but different weights",
    ),
    "wrong-dtype": (
        lambda p, m: tiny_model("neox", torch.float32),
        "holds a float64 cache but the model runs in float32",
    ),
    "empty-file": (lambda p, m: p.write_bytes(b""), "is 0 bytes: too short for a safetensors header"),
    "truncated": (
        lambda p, m: p.write_bytes(p.read_bytes()[:-10]),
        "the header describes 8272 bytes of tensor data but the file holds only 8262; the file is truncated",
    ),
    "longer-than-header": (
        lambda p, m: p.write_bytes(p.read_bytes() + b"\0" * 16),
        r"holds 16 bytes more than its header describes \(8288 instead of 8272\)",
    ),
    "corrupted-header": (_corrupt_json, r"corrupted safetensors header \(Expecting value: line 1"),
    "header-not-utf8": (_invalid_utf8, r"corrupted safetensors header \('utf-8' codec can't decode"),
    "renamed-header-key": (_rename_metadata_key, "corrupted header entry for tensor '}}{{tadata__'"),
    "header-length-garbage": (
        lambda p, m: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]),
        "the header length prefix says 18446744073709551615 bytes",
    ),
    "header-not-object": (
        lambda p, m: p.write_bytes(struct.pack("<Q", 2) + b"[]"),
        r"corrupted safetensors header \(JSON list, not an object\)",
    ),
    "torch-save-renamed": (
        lambda p, m: torch.save({"k": torch.zeros(3)}, p),
        r"looks like a zip archive \(torch.save\), not safetensors; interpkv never unpickles",
    ),
    "pickle-renamed": (
        lambda p, m: p.write_bytes(pickle.dumps(Evil(str(p) + ".pwned"))),
        "looks like a Python pickle, not safetensors; interpkv never unpickles",
    ),
    "plain-safetensors": (
        lambda p, m: safetensors.torch.save_file({"x": torch.zeros(2)}, p),
        "is a safetensors file but not an interpkv cache",
    ),
    "format-version": (
        lambda p, m: rewrite(p, metadata={"format_version": "99"}),
        "cache format version '99'; this interpkv reads versions 1, 2",
    ),
    "shape-vs-metadata": (
        lambda p, m: rewrite(p, metadata={"seq_len": "5"}),
        r"tensor 'positions' is I64 \[2, 4\] but the metadata \(batch_size=2, "
        r"seq_len=5, dtype torch.float64\) and the model imply I64 \[2, 5\]",
    ),
    "batch-vs-metadata": (
        lambda p, m: rewrite(p, metadata={"batch_size": "3"}),
        r"tensor 'positions' is I64 \[2, 4\] .*batch_size=3.* imply I64 \[3, 4\]",
    ),
    "tensor-dtype-vs-metadata": (
        lambda p, m: rewrite(p, tensors={"layers.1.values": torch.zeros(2, 4, 4, 8, dtype=torch.float32)}),
        r"tensor 'layers.1.values' is F32 \[2, 4, 4, 8\] but the metadata",
    ),
    "missing-tensor": (
        lambda p, m: rewrite_header(p, lambda h: h.update(
            {"layers.9.keys": h.pop("layers.1.keys")})),
        r"tensors \['layers.1.keys', 'layers.9.keys'\] are missing or unexpected",
    ),
    "size-vs-dtype": (
        lambda p, m: rewrite_header(p, lambda h: h["positions"].update(shape=[2, 3])),
        r"tensor 'positions' \(I64 \[2, 3\]\) needs 48 bytes but its data_offsets span 64",
    ),
    "overlapping-offsets": (
        lambda p, m: rewrite_header(p, lambda h: h["positions"].update(
            data_offsets=[h["positions"]["data_offsets"][0] + 8, h["positions"]["data_offsets"][1] + 8])),
        "tensors must be contiguous",
    ),
    "misaligned-offsets": (
        lambda p, m: _misalign(p),
        r"tensor '[^']+' starts at byte 1 of the data, not a multiple of its 8-byte (I64|F64)",
    ),
    "unknown-dtype": (
        lambda p, m: rewrite_header(p, lambda h: h["positions"].update(dtype="X9")),
        "tensor 'positions' has dtype 'X9'; a cache holds only",
    ),
    "next-positions-ahead": (
        lambda p, m: rewrite(p, tensors={"next_positions": torch.tensor([5, 2])}),
        r"row 0 stores positions \[0, 1, 2, 3\] but next_positions says it has seen 5 tokens",
    ),
    "positions-out-of-order": (
        lambda p, m: rewrite(p, tensors={"positions": torch.tensor([[1, 0, 2, 3], [-1, -1, 0, 1]])}),
        r"row 0 stores positions \[1, 0, 2, 3\].*positions and next_positions disagree",
    ),
    "negative-position": (
        lambda p, m: rewrite(p, tensors={"positions": torch.tensor([[0, 1, 2, 3], [-2, -1, 0, 1]])}),
        "negative positions other than the -1 padding marker",
    ),
    "window-without-eviction": (
        lambda p, m: rewrite(p, metadata={"window": "2"}),
        r"row 0 stores positions \[0, 1, 2, 3\] but next_positions says it has seen 4 tokens "
        r"\(window=2, sinks=0\)",
    ),
    "impossible-metadata": (
        lambda p, m: rewrite(p, metadata={"window": "0"}),
        r"impossible cache metadata \(batch_size=2, seq_len=4, window=0, sinks=0\)",
    ),
    "non-string-metadata": (
        lambda p, m: rewrite_header(p, lambda h: h["__metadata__"].update(seq_len=[4])),
        "metadata values must be strings",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
@pytest.mark.unchecked_shapes  # checks interpkv's own error for a wrong argument
def test_malformed_files_are_refused(case, saved, monkeypatch):
    model, _, path = saved
    make, message = MALFORMED[case]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("load must never unpickle")

    other_model = make(path, model)
    if not isinstance(other_model, torch.nn.Module):  # most cases return write_bytes' byte count: no model
        other_model = None
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(interpkv.CacheFileError, match=message):
        interpkv.KVCache.load(path, model if other_model is None else other_model)
    assert not os.path.exists(str(path) + ".pwned")


def test_cache_file_error_is_a_value_error():
    assert issubclass(interpkv.CacheFileError, ValueError)


def test_weights_fingerprint_follows_in_place_edits():
    model = build_model("gpt2")
    before = persist.weights_fingerprint(model)
    assert persist.weights_fingerprint(model) == before
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, 0, 0] += 1.0
    assert persist.weights_fingerprint(model) != before

