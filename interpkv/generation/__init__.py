"""Generation through a cache and its comparison against an uncached loop.

- :mod:`~interpkv.generation.generate`: :func:`interpkv.generate` and sampling.
- :mod:`~interpkv.generation.result`: :class:`~interpkv.Generation` and :class:`~interpkv.GenerationDiff`.
- :mod:`~interpkv.generation.compare`: :func:`interpkv.compare_generation`.
- :mod:`~interpkv.generation.resume`: the held-back token a cache is continued from.
"""
