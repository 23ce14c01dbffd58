"""The per-tensor checksum each cache file format records, and how to compute it.

A cache file records one checksum per tensor, of the tensor's bytes as stored,
under a metadata key of its format version:

- format 2: ``tensor_sha256``, SHA-256 (about 1.6 GB/s a core here);
- format 3 (written now): ``tensor_xxh3_128``, XXH3-128 (about 26 GB/s a core
  here, from the ``xxhash`` package), so that hashing costs a few percent of a
  save or a validated load instead of most of it.

Both catch what the checksums are for: bytes corrupted on disk or in transit,
a truncated or partly rewritten body, two tensors whose offsets were swapped
(a 128-bit digest misses a random corruption with probability 2^-128). Neither
is a signature: whoever can edit the file can recompute either, so SHA-256 was
never a defence against a forger. The header checksum (``header_sha256``)
and the weights fingerprint stay SHA-256; they hash a few kilobytes.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import xxhash

__all__ = ["Checksum", "SHA256", "XXH3_128", "WRITTEN", "for_version", "header_digest"]


@dataclass(frozen=True)
class Checksum:
    """One per-tensor checksum: where a file keeps it and how to compute it."""

    #: The metadata key holding JSON ``{tensor name: hex digest}``.
    key: str
    #: The algorithm's name, for messages.
    name: str
    #: A new streaming hasher (``update(bytes)``, ``hexdigest()``).
    new: Callable[[], object]
    #: Hex digits of one digest.
    hex_digits: int

    @property
    def placeholder(self) -> str:
        """Stands for a digest in a header reserved before the digests are known (same length)."""
        return "0" * self.hex_digits

    def is_digest(self, value) -> bool:
        """``value`` is a lowercase hex digest of this algorithm."""
        return isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{self.hex_digits}}}", value) is not None


SHA256 = Checksum("tensor_sha256", "SHA-256", hashlib.sha256, 64)
XXH3_128 = Checksum("tensor_xxh3_128", "XXH3-128", xxhash.xxh3_128, 32)
#: What :meth:`KVCache.save` writes (format 3).
WRITTEN = XXH3_128

_BY_VERSION = {2: SHA256, 3: XXH3_128}


def for_version(version: int) -> Optional[Checksum]:
    """The checksum files of format ``version`` record (None: format 1 records none)."""
    return _BY_VERSION.get(version)


def header_digest(raw: Dict[str, str]) -> str:
    """SHA-256 (``header_sha256``) of every metadata entry but ``header_sha256`` itself (canonical JSON)."""
    rest = {k: v for k, v in raw.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()
