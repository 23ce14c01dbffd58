"""Header sniffing: a valid header whose length byte happens to look like a pickle."""

import json
import struct

import pytest

from interpkv.cache.persist.st_format import CacheFileError, parse_header


def _file_with_header_length(n: int) -> bytes:
    header = {"__metadata__": {"pad": ""}}
    raw = json.dumps(header).encode()
    header["__metadata__"]["pad"] = " " * (n - len(raw))
    raw = json.dumps(header).encode()
    assert len(raw) == n
    return struct.pack("<Q", n) + raw


@pytest.mark.parametrize("n", [0x380, 0x480, 0x4B50], ids=["low-byte-0x80", "another-0x80", "looks-like-PK"])
def test_valid_header_is_not_mistaken_for_pickle_or_zip(n):
    # Regression: any header length whose low byte was 0x80 (1 file in 256; a
    # llama float64 cache of 32 tokens hit it) was refused as "a Python pickle".
    data = _file_with_header_length(n)
    assert parse_header(data, len(data), "x.safetensors") == json.loads(data[8:])


@pytest.mark.parametrize(
    "data,kind",
    [(b"\x80\x04\x95" + b"\x00" * 20, "a Python pickle"), (b"PK\x03\x04" + b"\x00" * 20, "a zip archive")],
    ids=["pickle", "zip"],
)
def test_pickles_and_zips_are_named(data, kind):
    with pytest.raises(CacheFileError, match=f"looks like {kind}"):
        parse_header(data, len(data), "x.safetensors")


# ------------------------------------------------------- writing by hand
import hashlib  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

import safetensors  # noqa: E402
import torch  # noqa: E402
import xxhash  # noqa: E402

from interpkv.cache.persist import checksums, st_read, st_write  # noqa: E402
from interpkv.cache.persist.file_checks import all_finite  # noqa: E402


def _views():
    base = torch.arange(2 * 3 * 10 * 4, dtype=torch.float64).reshape(2, 3, 10, 4)
    return {
        "cache-prefix": base[:, :, :7],  # what layer.view(seq_len) gives: 6 runs of 7 x 4
        "contiguous": base,
        "transposed": base.transpose(2, 3),  # last dimension strided: copied
        "row": base[1, 2, :, 0],
        "empty": base[:, :, :0],
        "scalar": torch.tensor(5, dtype=torch.int64),
        "bf16": torch.randn(3, 5).to(torch.bfloat16)[:, 1:4],
    }


@pytest.mark.parametrize("name", list(_views()), ids=list(_views()))
def test_runs_are_the_tensors_bytes_in_c_order(name):
    t = _views()[name]
    got = b"".join(bytes(run) for run in st_write.runs(t))
    assert got == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_prefix_view_is_written_without_a_copy():
    base = torch.zeros(2, 3, 10, 4)
    runs = list(st_write.runs(base[:, :, :7]))
    assert len(runs) == 6 and all(len(r) == 7 * 4 * 4 for r in runs)
    base[0, 0, 0, 0] = 1.0  # the runs view the tensor's own memory
    assert bytes(runs[0][:4]) == torch.tensor([1.0]).numpy().tobytes()


@pytest.mark.parametrize("checksum", [checksums.XXH3_128, checksums.SHA256], ids=["xxh3-128", "sha256"])
@pytest.mark.parametrize("chunk", [8, 100, 2**20], ids=["tiny-steps", "odd-steps", "one-step"])
def test_write_file_is_safetensors_with_the_checksum_of_each_tensor(chunk, checksum, monkeypatch):
    monkeypatch.setattr(st_write, "CHUNK_BYTES", chunk)
    tensors = {k: v for k, v in _views().items() if k != "scalar"}
    seen = []

    def metadata(sums):
        seen.append(sums)
        return {"sums": json.dumps(sums if sums else {k: checksum.placeholder for k in tensors})}

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        try:
            st_write.write_file(fd, tensors, metadata, checksum)
        finally:
            os.close(fd)
        data = open(path, "rb").read()
        with safetensors.safe_open(path, framework="pt") as f:  # safetensors' own reader agrees
            for name, t in tensors.items():
                assert torch.equal(f.get_tensor(name), t.contiguous()), name
            assert json.loads(f.metadata()["sums"]) == seen[-1]
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0  # padded, as safetensors pads: every tensor starts aligned
    header = parse_header(data[: 8 + n], len(data), "t")
    reference = hashlib.sha256 if checksum is checksums.SHA256 else xxhash.xxh3_128  # the libraries themselves
    for name, t in tensors.items():
        begin, end = header[name]["data_offsets"]
        assert begin % t.element_size() == 0
        assert seen[-1][name] == reference(data[8 + n + begin: 8 + n + end]).hexdigest()
        assert checksum.is_digest(seen[-1][name])


def test_a_final_header_longer_than_the_reserved_one_is_refused():
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        with pytest.raises(AssertionError, match="header grew"):
            st_write.write_file(fd, {"x": torch.zeros(2)}, lambda sums: {"m": "a" if sums is None else "a" * 99})
    finally:
        os.close(fd)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("chunk", [8, 24, 2**20], ids=["tiny-steps", "odd-steps", "one-step"])
def test_read_body_hashes_what_it_reads(chunk, workers, monkeypatch, tmp_path):
    monkeypatch.setattr(st_read, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(st_read, "READ_WORKERS", workers)
    prefix, body = b"H" * 13, bytes(range(256)) * 3  # the body starts where the file is positioned
    header = {"__metadata__": {}, "a": {"data_offsets": [0, 100]}, "e": {"data_offsets": [100, 100]},
              "b": {"data_offsets": [100, 700]}, "c": {"data_offsets": [700, 768]}}

    def read(data, checksum):
        (tmp_path / "f").write_bytes(prefix + data)
        with open(tmp_path / "f", "rb") as f:
            f.read(len(prefix))
            return st_read.read_body(f, len(body), header, "p", checksum)

    for checksum, reference in ((checksums.XXH3_128, xxhash.xxh3_128), (checksums.SHA256, hashlib.sha256)):
        got, sums = read(body, checksum)
        assert bytes(got) == body
        assert sums == {"a": reference(body[:100]).hexdigest(), "e": reference(b"").hexdigest(),
                        "b": reference(body[100:700]).hexdigest(), "c": reference(body[700:]).hexdigest()}
    got, sums = read(body, None)
    assert bytes(got) == body and sums is None
    with pytest.raises(CacheFileError, match="it ended after 650 of 768 bytes"):
        read(body[:650], checksums.WRITTEN)
    with pytest.raises(CacheFileError, match="more than the 768 bytes"):
        read(body + b"x", checksums.WRITTEN)


def test_read_body_shares_tensors_between_workers_by_size():
    spans = [(0, 10, "a"), (10, 110, "b"), (110, 160, "c"), (160, 210, "d")]
    # largest first to the least loaded: b (100) | c (50), d (50) | then a to the first of two equals
    assert st_read._share(spans, 2) == [[(0, 10, "a"), (10, 110, "b")], [(110, 160, "c"), (160, 210, "d")]]
    assert st_read._share(spans, 1) == [sorted(spans)]
    assert st_read._share(spans[:1], 3) == [[(0, 10, "a")]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_all_finite_finds_one_bad_element_anywhere(dtype, bad):
    # Every position of every length up to 67 (vector lanes and tails), then a large tensor.
    for n in range(1, 68):
        for i in range(n):
            t = torch.randn(n).to(dtype)
            assert all_finite(t)
            t[i] = bad
            assert not all_finite(t), (n, i)
    big = torch.randn(1_000_003).to(dtype)
    for i in (0, 1, 4095, 500_000, 1_000_002):
        t = big.clone()
        t[i] = bad
        assert not all_finite(t) and not all_finite(t[i:i + 1]), i
    assert all_finite(big) and all_finite(torch.tensor([65504.0] * 9, dtype=torch.float16))
