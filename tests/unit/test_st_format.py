"""Header sniffing: a valid header whose length byte happens to look like a pickle."""

import json
import struct

import pytest

from interpkv.cache.st_format import CacheFileError, parse_header


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
