"""The KV cache: per-layer storage, the multi-layer container, window policy, persistence.

- :mod:`~interpkv.cache.kvcache`: :class:`KVCache`, whole: positions, offsets, the
  forward protocol (:meth:`KVCache.begin` / :meth:`KVCache.commit`), lifecycle,
  ``from_state``, and the two calls into persistence.
- :mod:`~interpkv.cache.bound`: ``PositionBound``, the host-side upper bound on the next
  positions (no host sync per decode step).
- :mod:`~interpkv.cache.layer`: one layer's preallocated key/value buffers.
- :mod:`~interpkv.cache.window`: the window rule (which slots a query may attend,
  which slots are evicted), written once.
- :mod:`~interpkv.cache.signature`: what a cache is bound to (a model's architecture fields).
- :mod:`~interpkv.cache.fingerprint`: a model's weights fingerprint (what a saved cache was
  computed with).
- :mod:`~interpkv.cache.persist`: persistence, one subpackage behind
  ``save_cache`` / ``load_cache``.
- :mod:`~interpkv.cache.provenance`: which interventions wrote each span of a
  cache's slots, and the :class:`~interpkv.ProvenanceWarning` check
  (subpackage: records, collect, spans, view).
- :mod:`~interpkv.cache.identity`: the content digest that makes two hooks the
  same intervention.
"""

from interpkv.cache.kvcache import KVCache

__all__ = ["KVCache"]
