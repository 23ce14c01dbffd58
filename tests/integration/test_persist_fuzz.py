"""Fuzzing cache files: every mutation of a valid file loads identically or raises CacheFileError.

Never another exception (RecursionError, TypeError, MemoryError, ...), never a
hang (each load runs under a SIGALRM guard). Seeded and bounded: the fast
subset runs in a few seconds; the ``slow`` one runs ten times as many.
"""

import json
import random
import signal
import struct

import pytest
import torch

import interpkv
from interpkv.cache.persist import checksums, file_checks
from interpkv.cache.persist.st_format import tensor_bytes

from .lifecycle_helpers import padded_batch, tiny_model

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM for the hang guard")

LOAD_TIMEOUT_S = 20  # a load of this ~6 KB file takes ~5 ms; only a hang gets near this


class Hang(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in the loader hides it."""


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    model = tiny_model("neox", n_layers=1)
    cache = interpkv.KVCache.for_model(model, 2, window=4, sinks=1)
    tokens, mask = padded_batch([[1, 2, 3, 4, 5, 6], [7, 8, 9]], [0, 3])
    interpkv.forward(model, tokens, cache=cache, attention_mask=mask)
    path = tmp_path_factory.mktemp("fuzz") / "cache.safetensors"
    cache.save(path, metadata={"prompt": "abc", "n": [1, 2]})
    return model, cache, path.read_bytes()


def split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header, body: bytes, raw: str = None) -> bytes:
    text = (raw if raw is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(text)) + text + body


WEIRD = [None, [], {}, "x", "", -1, 0, 2**64, 10**30, 1.5, True, {"a": 1}, [1, 2, 3], "9" * 30]


def paths(obj, prefix=()):
    """Every path to a value inside nested dicts/lists."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


def set_path(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def resign(header, body):
    """Recompute the checksums, as a self-consistent (buggy) writer would."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        return
    sums = {}
    for name, entry in header.items():
        if name != "__metadata__" and isinstance(entry, dict):
            try:
                begin, end = entry["data_offsets"]
                sums[name] = checksums.WRITTEN.new(body[begin:end]).hexdigest()
            except (KeyError, TypeError, ValueError):
                pass
    meta[checksums.WRITTEN.key] = json.dumps(sums)
    if all(isinstance(v, str) for v in meta.values()):
        meta["header_sha256"] = file_checks.header_digest(meta)


def mutate(data: bytes, rng: random.Random):
    """``(mutated bytes, kind, exact)``: ``exact`` means a successful load must equal the original."""
    header, body = split(data)
    kind = rng.choice(["flip", "truncate", "json", "json-raw", "swap", "meta", "tensor"])
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 8])):
            out[rng.randrange(len(out))] ^= rng.randrange(1, 256)
        return bytes(out), kind, True
    if kind == "truncate":
        return data[: rng.randrange(len(data))], kind, True
    if kind == "json":  # a structurally valid JSON header with one value replaced or removed
        path = rng.choice([p for p in paths(header) if p])
        if rng.random() < 0.2 and isinstance(path[-1], str):
            parent = header
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
        else:
            set_path(header, path, rng.choice(WEIRD))
        if rng.random() < 0.5:
            resign(header, body)
            return join(header, body), kind + "-resigned", False
        return join(header, body), kind, True
    if kind == "json-raw":  # deeply nested or garbage text spliced into the header
        raw = json.dumps(header)
        at = rng.randrange(len(raw))
        junk = rng.choice(
            ["[" * 100000 + "]" * 100000, '{"a":' * 50000 + "1" + "}" * 50000, "\x00", "\ud800", "1e999", "9" * 5000]
        )
        return join(None, body, raw=raw[:at] + junk + raw[at:]), kind, True
    if kind == "swap":
        names = [n for n in header if n != "__metadata__"]
        a, b = rng.sample(names, 2)
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        return join(header, body), kind, True
    if kind == "meta":  # one metadata string edited, checksum recomputed (reaches the semantic checks)
        meta = header["__metadata__"]
        key = rng.choice(sorted(meta))
        meta[key] = rng.choice(["", "none", "-1", "0", "1", "99", str(2**70), "[]", "{}", "[" * 5000,
                                json.dumps({"x": 1}), '"s"', "nan", meta[key][::-1]])
        resign(header, body)
        return join(header, body), kind, False
    # "tensor": tensor values edited with recomputed checksums
    name = rng.choice([n for n in header if n != "__metadata__"])
    begin, end = header[name]["data_offsets"]
    values = rng.choice([float("nan"), float("inf"), 2**62, -5, 0, 1, 3])
    dtype = torch.int64 if header[name]["dtype"] == "I64" else torch.float64
    count = (end - begin) // 8
    tensor = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype).clone() if count else torch.zeros(0, dtype=dtype)
    if count:
        tensor[rng.randrange(count)] = values if dtype == torch.float64 or isinstance(values, int) else 0
    body = body[:begin] + bytes(tensor_bytes(tensor)) + body[end:]
    resign(header, body)
    return join(header, body), kind, False


def assert_same(loaded, cache):
    assert loaded.positions.tolist() == cache.positions.tolist()
    assert loaded.next_positions.tolist() == cache.next_positions.tolist()
    assert (loaded.window, loaded.sinks, loaded.metadata) == (cache.window, cache.sinks, {"prompt": "abc", "n": [1, 2]})
    for a, b in zip(loaded.layers, cache.layers):
        for x, y in zip(a.view(loaded.seq_len), b.view(cache.seq_len)):
            assert torch.equal(x, y)


def run_fuzz(original, tmp_path, n: int, seed: int):
    model, cache, data = original
    rng = random.Random(seed)
    path = tmp_path / "mutant.safetensors"

    def alarm(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    kinds = {}
    try:
        for i in range(n):
            mutant, kind, exact = mutate(data, rng)
            path.write_bytes(mutant)
            signal.setitimer(signal.ITIMER_REAL, LOAD_TIMEOUT_S)
            try:
                loaded = interpkv.KVCache.load(path, model)
            except interpkv.CacheFileError as error:
                # load turns any stray exception into a CacheFileError (for files changing
                # underneath); a file at rest must be refused by a check, not by that net
                if error.__cause__ is not None and not isinstance(error.__cause__, OSError):
                    pytest.fail(f"mutation {i} ({kind}) passed every check and raised "
                                f"{type(error.__cause__).__name__}: {error.__cause__}"[:500])
                kinds[kind] = kinds.get(kind, 0) + 1
                continue
            except Hang:
                pytest.fail(f"mutation {i} ({kind}) hung for {LOAD_TIMEOUT_S} s")
            except Exception as error:  # noqa: BLE001 - the point of the test
                pytest.fail(f"mutation {i} ({kind}) raised {type(error).__name__}: {error}"[:500])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if exact:
                assert_same(loaded, cache)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return kinds


def test_fuzz_fast(original, tmp_path):
    kinds = run_fuzz(original, tmp_path, n=300, seed=0)
    # the mutations reach every family of checks, not just the JSON parser
    assert {"flip", "truncate", "json", "json-raw", "swap", "meta", "tensor"} <= set(kinds), kinds


def test_fuzz_threaded_reads(original, tmp_path, monkeypatch):
    """The same mutations through the threaded read (64-byte steps, two readers, a huge-page body)."""
    from interpkv.cache.persist import st_read

    monkeypatch.setattr(st_read, "CHUNK_BYTES", 64)
    monkeypatch.setattr(st_read, "HUGE_PAGES_FROM", 0)
    kinds = run_fuzz(original, tmp_path, n=300, seed=100)
    assert {"flip", "truncate", "swap", "tensor"} <= set(kinds), kinds


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 11))
def test_fuzz_slow(original, tmp_path, seed):
    run_fuzz(original, tmp_path, n=1000, seed=seed)
