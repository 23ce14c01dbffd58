"""Activations recorded, diffed and compared, cached against uncached.

- :mod:`~interpkv.diagnostics.record`: :class:`~interpkv.Record`, activations by absolute position.
- :mod:`~interpkv.diagnostics.capture`: :func:`interpkv.capture` (chunked runs through a cache).
- :mod:`~interpkv.diagnostics.stats`: per-site error statistics.
- :mod:`~interpkv.diagnostics.report`: :class:`~interpkv.DivergenceReport` and :class:`~interpkv.Site`.
- :mod:`~interpkv.diagnostics.diff`: :func:`interpkv.diff` of two records.
- :mod:`~interpkv.diagnostics.compare`: :func:`interpkv.compare`, streaming, without storing records.
"""
