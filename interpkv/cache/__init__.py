"""The KV cache: per-layer storage, the multi-layer container, window policy, persistence.

- :mod:`~interpkv.cache.layer`: one layer's preallocated key/value buffers.
- :mod:`~interpkv.cache.kvcache`: :class:`KVCache`, positions, offsets, the
  forward protocol (:meth:`KVCache.begin` / :meth:`KVCache.commit`) and lifecycle.
- :mod:`~interpkv.cache.window`: the window rule (which slots a query may attend,
  which slots are evicted), written once.
- :mod:`~interpkv.cache.persist` and :mod:`~interpkv.cache.st_format`: safetensors
  files, working from the cache's public state.
- :mod:`~interpkv.cache.provenance`: which interventions wrote each span of a
  cache's slots, and the :class:`~interpkv.ProvenanceWarning` check
  (subpackage: records, collect, spans, view).
- :mod:`~interpkv.cache.identity`: the content digest that makes two hooks the
  same intervention.
"""

from interpkv.cache.kvcache import KVCache

__all__ = ["KVCache"]
