"""Generation through a cache and its comparison against an uncached loop.

- :mod:`~interpkv.generation.generate`: :func:`interpkv.generate`.
- :mod:`~interpkv.generation.options`: its options checked once (TransformerLens's keywords
  translated or refused).
- :mod:`~interpkv.generation.loop`: the decode loop and what a failed step leaves.
- :mod:`~interpkv.generation.sampling`: greedy, temperature, top-k, top-p.
- :mod:`~interpkv.generation.budget`: what a generation may allocate, checked before it
  allocates anything.
- :mod:`~interpkv.generation.resume`: the held-back token a cache is continued from.
- :mod:`~interpkv.generation.recording`: ``capture=`` streamed into one whole-generation Record.
- :mod:`~interpkv.generation.steering`: ``interpkv.steering``, hooks by absolute position.
- :mod:`~interpkv.generation.result`: :class:`~interpkv.Generation` and :class:`~interpkv.GenerationDiff`.
- :mod:`~interpkv.generation.compare`: :func:`interpkv.compare_generation`.
"""
