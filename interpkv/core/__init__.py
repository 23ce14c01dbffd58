"""One forward pass: inputs, absolute positions, positional schemes, attention.

- :mod:`~interpkv.core.tl`: the one seam to TransformerLens (every import of it).
- :mod:`~interpkv.core.inputs`: the input normalisation every entry point uses.
- :mod:`~interpkv.core.positions`: attention mask + offsets -> absolute positions.
- :mod:`~interpkv.core.schemes`: the one factory that reads the positional scheme.
- :mod:`~interpkv.core.attention`: position-aware attention over a cache.
- :mod:`~interpkv.core.forward`: :func:`interpkv.forward`.
- :mod:`~interpkv.core.prepared`: TransformerLens's linear maps without per-call weight copies.
- :mod:`~interpkv.core.fused`: single-kernel norms and GELU while their inner hooks are idle.
- :mod:`~interpkv.core.stephooks`: the seam where fault objects plug in.
"""
