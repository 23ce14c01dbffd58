"""Activations recorded, diffed and compared, cached against uncached.

- :mod:`~interpkv.diagnostics.record`: :class:`~interpkv.Record`, activations by absolute position.
- :mod:`~interpkv.diagnostics.tokenlayout`: a Record's two position layouts (token columns,
  absolute positions).
- :mod:`~interpkv.diagnostics.assemble`: preallocated buffers filled like ``run_with_cache``.
- :mod:`~interpkv.diagnostics.names`: ``names_filter=`` next to ``names=``.
- :mod:`~interpkv.diagnostics.selection`: hook selection, one meaning for ``names=``,
  ``names_filter=``, ``capture=`` and patching hooks.
- :mod:`~interpkv.diagnostics.hfsites`: a ``transformers`` model's TransformerLens-named sites.
- :mod:`~interpkv.diagnostics.capture`: :func:`interpkv.capture` (chunked runs feeding a sink).
- :mod:`~interpkv.diagnostics.chunk`: the query and key positions of the chunk a capture runs.
- :mod:`~interpkv.diagnostics.layouts`: hooks of other shapes put at positions, or skipped.
- :mod:`~interpkv.diagnostics.stats`: per-site error statistics.
- :mod:`~interpkv.diagnostics.report`: :class:`~interpkv.DivergenceReport` and :class:`~interpkv.Site`.
- :mod:`~interpkv.diagnostics.diff`: :func:`interpkv.diff` of two records.
- :mod:`~interpkv.diagnostics.comparator`: the sink that compares a cached run as it fires.
- :mod:`~interpkv.diagnostics.fastpath`: the cached steps run again with nothing recording
  them, so compare audits the fast path too.
- :mod:`~interpkv.diagnostics.compare`: :func:`interpkv.compare`, streaming, without storing records.
- :mod:`~interpkv.diagnostics.cause`: naming the ``fwd_hooks`` that make cached and uncached differ.
- :mod:`~interpkv.diagnostics.engines`: whose cache a compare audits (interpkv's,
  TransformerLens's, a ``transformers`` model's).
- :mod:`~interpkv.diagnostics.hf_reference`: the HuggingFace reference logits.
"""
