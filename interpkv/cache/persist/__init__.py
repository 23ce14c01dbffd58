"""Persistence: a :class:`~interpkv.cache.kvcache.KVCache` in a file and back, behind one boundary.

:class:`KVCache` calls exactly two functions here, :func:`save_cache` (from
:meth:`KVCache.save`) and :func:`load_cache` (from :meth:`KVCache.load`); both
work from the cache's public state and never import the cache module. The
subsystem, outermost first:

- :mod:`~interpkv.cache.persist.cachefile`: what is in a file (tensors and
  metadata fields, format versions), the two boundary functions,
  :func:`read_provenance` (a file's provenance from its header alone) and
  :func:`read_header` (its string metadata, e.g. the dtype, likewise).
- :mod:`~interpkv.cache.persist.file_checks`: every semantic check of a loaded
  file (format, model, dtype, shapes, positions, window, checksums, finiteness).
- :mod:`~interpkv.cache.persist.checksums`: per-tensor checksums (XXH3-128;
  SHA-256 in format-2 files) and the header digest.
- :mod:`~interpkv.cache.persist.st_format`: the safetensors container's header
  (parse, check, decode bytes into tensors).
- :mod:`~interpkv.cache.persist.st_write` / :mod:`~interpkv.cache.persist.st_read`:
  bytes out and in (one pass, hashed while written or read, threads for big files).
- :mod:`~interpkv.cache.persist.atomic`: atomic replace (temp file, fsync,
  ``os.replace``, symlinks followed, stale temp clean-up).

The weights fingerprint a file carries is :mod:`interpkv.cache.fingerprint`
(it identifies a model's weights, persistence only records it).
"""

from interpkv.cache.persist.cachefile import load_cache, read_header, read_provenance, save_cache

__all__ = ["save_cache", "load_cache", "read_header", "read_provenance"]
