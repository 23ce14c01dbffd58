"""Checks of a cache file's contents, after :mod:`~interpkv.cache.persist.st_format` parsed its container.

Each function raises :class:`CacheFileError` naming the file and the problem;
:func:`interpkv.cache.persist.load_cache` runs them in order: metadata (format,
header checksum, model, weights, dtype, sizes, user metadata), tensor entries
against the metadata, the weights fingerprint (computed while the body is
read), tensor checksums, finite keys and values, positions against
``next_positions``.
"""

import json
import re
from typing import Dict, Optional

import numpy
import torch

from interpkv.cache import fingerprint
from interpkv.cache.persist import checksums, st_format
from interpkv.cache.persist.checksums import header_digest
from interpkv.cache.persist.st_format import DTYPES, CacheFileError
from interpkv.cache.signature import model_signature
from interpkv.cache.window import in_window
from interpkv.core import tl as _tl
from interpkv.core.schemes import scheme_for

__all__ = ["FORMAT", "FORMAT_VERSION", "DTYPE_NAMES", "header_digest", "all_finite", "check_metadata",
           "check_tensors", "check_weights", "model_fingerprint", "check_checksums", "check_finite",
           "check_positions", "ROW_STATE_NAME", "row_state_names"]

FORMAT = "interpkv.KVCache"
#: 2: tensor and header SHA-256, sampled weights fingerprint, user metadata; 3: XXH3-128 tensor checksums
FORMAT_VERSION = 3
_READS = (1, 2, 3)
_COMMON = {"format_version", "model", "dtype", "batch_size", "seq_len", "window", "sinks"}
_REQUIRED = {1: _COMMON | {"weights_sha256"}, **{
    v: _COMMON | {"weights_fingerprint", checksums.for_version(v).key, "header_sha256"} for v in (2, 3)}}

DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def _json(text: str, what: str, path: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise CacheFileError(f"{path}: corrupted {what} in the metadata (JSON nested too deeply)") from None
    except ValueError as error:
        raise CacheFileError(f"{path}: corrupted {what} in the metadata ({str(error)[:120]})") from None


def check_metadata(header: dict, model: "_tl.HookedTransformer", path: str, weights: bool = True) -> dict:
    """Parsed metadata, after checking format, header checksum, model, weights and dtype.

    Args:
        weights: also check the weights fingerprint here; ``False`` leaves it
            to :func:`check_weights` (so that it can be computed while the
            body is read).

    Returns:
        ``batch_size``, ``seq_len``, ``window``, ``sinks``, ``dtype``, ``version``,
        ``checksum`` (the version's :class:`~interpkv.cache.persist.checksums.Checksum`, None for
        format 1), ``tensor_sums`` (its JSON dict, None for format 1) and ``user``
        (the caller's metadata or None).
    """
    raw = header.get("__metadata__")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CacheFileError(
            f"{path} is a safetensors file but not an interpkv cache (metadata "
            f"format={None if not isinstance(raw, dict) else str(raw.get('format'))[:80]!r}, "
            f"expected {FORMAT!r}); write caches with cache.save(path)"
        )
    if not all(isinstance(v, str) for v in raw.values()):
        raise CacheFileError(f"{path}: corrupted header: metadata values must be strings")
    version = next((v for v in _READS if raw.get("format_version") == str(v)), None)
    if version is None:
        raise CacheFileError(
            f"{path}: cache format version {str(raw.get('format_version'))[:20]!r}; this interpkv "
            f"reads versions {', '.join(map(str, _READS))}"
        )
    missing = _REQUIRED[version] - set(raw)
    if missing:
        raise CacheFileError(f"{path}: cache metadata lacks {sorted(missing)}; corrupted header")
    if "header_sha256" in raw and raw["header_sha256"] != header_digest(raw):
        raise CacheFileError(
            f"{path}: the header's metadata does not match its checksum (header_sha256); "
            "the file is corrupted"
        )
    saved_sig = _json(raw["model"], "model fingerprint", path)
    sig = model_signature(model)
    if saved_sig != sig:
        if not isinstance(saved_sig, dict):
            raise CacheFileError(f"{path}: corrupted model fingerprint in the metadata")
        differ = sorted(k for k in set(sig) | set(saved_sig) if sig.get(k) != saved_sig.get(k))
        detail = ", ".join(f"{k}: file {saved_sig.get(k)!r} vs model {sig.get(k)!r}" for k in differ)
        raise CacheFileError(
            f"{path} was saved from another model architecture ({detail[:600]}); load it with the "
            "model that made it"
        )
    model_dtype = DTYPE_NAMES.get(model.cfg.dtype, str(model.cfg.dtype))
    if raw["dtype"] != model_dtype:
        raise CacheFileError(
            f"{path} holds a {raw['dtype'][:20]} cache but the model runs in {model_dtype}; "
            "load it into the model in the dtype it was saved from"
        )
    if weights:
        check_weights(header, {"version": version}, model_fingerprint(version, model), path)
    try:
        batch, length, sinks = int(raw["batch_size"]), int(raw["seq_len"]), int(raw["sinks"])
        window = None if raw["window"] == "none" else int(raw["window"])
    except ValueError:
        raise CacheFileError(f"{path}: corrupted cache metadata {repr(raw)[:300]}") from None
    if batch < 1 or length < 0 or sinks < 0 or (window is not None and window < 1) or (
        sinks and window is None
    ) or max(batch, length, sinks, window or 0) >= 2**62:  # beyond int64 arithmetic
        raise CacheFileError(
            f"{path}: impossible cache metadata (batch_size={batch}, seq_len={length}, "
            f"window={window}, sinks={sinks})"
        )
    checksum = checksums.for_version(version)
    sums = None if checksum is None else _json(raw[checksum.key], "tensor checksums", path)
    user_bytes = len(raw.get("user_metadata", "").encode("utf-8"))
    if user_bytes > st_format.MAX_USER_METADATA_BYTES:  # save never writes more
        raise CacheFileError(
            f"{path}: its user metadata is {user_bytes:,} bytes of JSON; save writes at most "
            f"{st_format.MAX_USER_METADATA_BYTES:,}, so this file was not written by KVCache.save"
        )
    user = None if "user_metadata" not in raw else _json(raw["user_metadata"], "user metadata", path)
    if user is not None and not isinstance(user, dict):
        raise CacheFileError(f"{path}: corrupted user metadata (JSON {type(user).__name__}, not an object)")
    return {"batch_size": batch, "seq_len": length, "window": window, "sinks": sinks,
            "dtype": model.cfg.dtype, "version": version, "checksum": checksum,
            "tensor_sums": sums, "user": user}


def model_fingerprint(version: int, model) -> str:
    """``model``'s weights fingerprint as a file of format ``version`` records it."""
    return fingerprint.legacy_sha256(model) if version == 1 else fingerprint.weights_fingerprint(model)


def check_weights(header: dict, metadata: dict, mine: str, path: str) -> None:
    """The file's weights fingerprint equals ``mine`` (:func:`model_fingerprint` of the model)."""
    raw = header["__metadata__"]
    saved = raw["weights_sha256"] if metadata["version"] == 1 else raw["weights_fingerprint"]
    if saved != mine:
        def short(f):
            return f.split(":")[-1][:12]
        raise CacheFileError(
            f"{path} was saved from a model with the same architecture but different weights "
            f"(weights fingerprint {short(saved)}... vs {short(mine)}...); its keys mean nothing "
            "to this model"
        )


#: Names a file may carry per-row state under (:attr:`KVCache.row_state`; generation's held-back
#: token has always been ``next_tokens`` / ``next_tokens_at``, so older files load unchanged).
ROW_STATE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def row_state_names(names) -> list:
    """The names among ``names`` that are row state rather than the cache's own tensors."""
    own = {"positions", "next_positions"}
    return sorted(n for n in names if n not in own and ROW_STATE_NAME.fullmatch(n))


def check_tensors(header: dict, metadata: dict, model, path: str) -> Dict[str, tuple]:
    """Each expected tensor is present, with the dtype and shape the metadata implies.

    Returns:
        ``{name: (safetensors dtype, shape)}`` of the expected tensors.
    """
    cfg = model.cfg
    batch, length = metadata["batch_size"], metadata["seq_len"]
    kv_shape = [batch, _tl.kv_head_count(cfg), length, int(cfg.d_head)]
    float_name = {v: k for k, v in DTYPES.items()}[metadata["dtype"]]
    expected = {"positions": ("I64", [batch, length]), "next_positions": ("I64", [batch])}
    for i in range(cfg.n_layers):
        expected[f"layers.{i}.keys"] = (float_name, kv_shape)
        expected[f"layers.{i}.values"] = (float_name, kv_shape)
    names = set(header) - {"__metadata__"}
    for name in row_state_names(names - set(expected)):  # optional per-row state (KVCache.row_state)
        expected[name] = ("I64", [batch])
    if names != set(expected):
        raise CacheFileError(
            f"{path}: tensors {sorted(names ^ set(expected))[:6]} are missing or unexpected "
            f"for a {cfg.n_layers}-layer cache; corrupted file"
        )
    for name, (dtype, shape) in expected.items():
        entry = header[name]
        if entry["dtype"] != dtype or entry["shape"] != shape:
            raise CacheFileError(
                f"{path}: tensor {name!r} is {entry['dtype']} {entry['shape']} but the metadata "
                f"(batch_size={batch}, seq_len={length}, dtype {metadata['dtype']}) and the model "
                f"imply {dtype} {shape}"
            )
    return expected


def check_checksums(digests: Optional[Dict[str, str]], header: dict, metadata: dict, path: str) -> None:
    """Each tensor's bytes hashed to the checksum the header records for its name.

    Args:
        digests: name -> hex digest (of ``metadata["checksum"]``) of the
            tensor's bytes as read (:func:`interpkv.cache.persist.st_read.read_body`
            hashes while reading).

    Detects corrupted tensor bytes and tensors whose offsets were swapped.
    Format-1 files carry no checksums (nothing to check).
    """
    checksum, sums = metadata["checksum"], metadata["tensor_sums"]
    if checksum is None:
        return
    names = set(header) - {"__metadata__"}
    if not isinstance(sums, dict) or set(sums) != names or not all(map(checksum.is_digest, sums.values())):
        raise CacheFileError(f"{path}: corrupted tensor checksums in the metadata ({checksum.key})")
    for name in sorted(names):
        begin, end = header[name]["data_offsets"]
        if digests is None or digests.get(name) != sums[name]:
            raise CacheFileError(
                f"{path}: tensor {name!r} does not match its {checksum.name} checksum: its bytes "
                "(data_offsets {}) are corrupted or belong to another tensor".format([begin, end])
            )


#: Exponent bits of bfloat16 (all ones: infinity or NaN); numpy has no bfloat16.
_BF16_EXPONENT = 0x7F80


def all_finite(tensor: torch.Tensor) -> bool:
    """No element of ``tensor`` is NaN or infinite.

    The minimum and maximum are finite exactly when every element is (NaN
    propagates through both; an infinity is one of them): one reduction each,
    no allocation of the tensor's size. On the CPU numpy computes them on the
    calling thread: ``torch.isfinite(t).all()`` was 30x slower on a 1 GB cache,
    and each torch reduction over 8 MB waited ~8 ms for its OpenMP threads on
    the busy 2-core machine. Non-float tensors are always finite.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    t = tensor.detach()
    if t.device.type != "cpu":
        low, high = torch.aminmax(t)
        return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).numpy()
        step = 2**20
        return not any(bool(((bits[i:i + step] & _BF16_EXPONENT) == _BF16_EXPONENT).any())
                       for i in range(0, bits.size, step))
    values = t.numpy()
    return bool(numpy.isfinite(values.min())) and bool(numpy.isfinite(values.max()))


def check_finite(tensors: Dict[str, torch.Tensor], path: str) -> None:
    """Keys and values hold no NaN or infinity (a forward never stores them)."""
    for name, tensor in tensors.items():
        if not all_finite(tensor):
            bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
            raise CacheFileError(
                f"{path}: tensor {name!r} holds NaN or infinite values (first at index {bad}); "
                "a forward pass never stores them, so the file is corrupted"
            )


def _low(t: torch.Tensor):
    """The minimum of a non-empty integer tensor (numpy on the CPU: see :func:`all_finite`)."""
    if t.numel() == 0:
        return 0
    return t.detach().cpu().numpy().min() if t.device.type == "cpu" else t.min()


def check_positions(positions, next_positions, metadata: dict, model, path: str) -> None:
    """Positions must be exactly what a cache that saw ``next_positions`` tokens holds.

    Row ``b`` must store, in increasing order, every position ``p < m`` (``m =
    next_positions[b]``) that the window keeps: all of them without a window,
    else ``p < sinks`` or ``p >= m - window``. Checked with counts, never by
    allocating ``m`` of anything (``m`` is read from the file).
    """
    window, sinks = metadata["window"], metadata["sinks"]
    if int(_low(positions)) < -1 or int(_low(next_positions)) < 0:
        raise CacheFileError(f"{path}: negative positions other than the -1 padding marker")
    limit = scheme_for(model).max_positions()
    if limit is not None and bool((next_positions > limit).any()):
        raise CacheFileError(
            f"{path}: next_positions {next_positions.tolist()[:8]} pass the model's n_ctx={limit}"
        )
    plain = window is None and positions.device.type == "cpu"  # numpy: see all_finite
    rows = positions.detach().numpy() if plain else positions
    for row in range(positions.shape[0]):
        real = rows[row][rows[row] >= 0]
        m = int(next_positions[row])
        if plain:
            increasing = real.size < 2 or bool((real[1:] > real[:-1]).all())
            if real.size == m and increasing and (real.size == 0 or int(real[-1]) < m):
                continue
            real = torch.from_numpy(real)  # for the message
            kept, wanted = torch.zeros(1, dtype=torch.bool), m
        elif window is None:
            kept, wanted = torch.ones_like(real, dtype=torch.bool), m
        else:
            kept = in_window(real, torch.tensor(m - 1), window, sinks)
            wanted = min(m, sinks + window)
        ok = (real.numel() == wanted and bool(kept.all()) and bool((real < m).all())
              and (real.numel() < 2 or bool((real[1:] > real[:-1]).all())))
        if not ok:
            raise CacheFileError(
                f"{path}: row {row} stores positions {real.tolist()[:8]}"
                f"{'...' if real.numel() > 8 else ''} but next_positions says it has seen {m} "
                f"tokens (window={window}, sinks={sinks}); positions and next_positions disagree"
            )
