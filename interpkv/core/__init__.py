"""One forward pass: inputs, absolute positions, positional schemes, attention, per-call routing.

- :mod:`~interpkv.core.tl`: the one seam to TransformerLens (every import of it, and the
  adapters that read its internals).
- :mod:`~interpkv.core.tl_versions`: the stand-ins and error when the installed TransformerLens
  lacks a name (TransformerLens 4, or none); imports no TransformerLens.
- :mod:`~interpkv.core.axes`: axis names and the padding marker.
- :mod:`~interpkv.core.inputs`: the input normalisation every entry point uses.
- :mod:`~interpkv.core.padding`: token ids with pad runs and no mask: the mask TransformerLens
  would use, or None.
- :mod:`~interpkv.core.arguments`: checks of public arguments (each error names the argument,
  the value and the fix).
- :mod:`~interpkv.core.positions`: attention mask + offsets -> absolute positions.
- :mod:`~interpkv.core.schemes`: the one factory that reads the positional scheme.
- :mod:`~interpkv.core.attention`: position-aware attention over a cache.
- :mod:`~interpkv.core.forward`: :func:`interpkv.forward`.
- :mod:`~interpkv.core.returns`: its ``return_type`` (logits, TransformerLens's loss).
- :mod:`~interpkv.core.routing`: per-call routing, which module runs which forward in one call
  (attention, the fast modules, SAE wrappers).
- :mod:`~interpkv.core.overlay`: the per-call view of the model a call's routes run through.
- :mod:`~interpkv.core.fused`: single-kernel norms and GELU while their inner hooks are idle.
- :mod:`~interpkv.core.prepared`: TransformerLens's linear maps without per-call weight copies.
- :mod:`~interpkv.core.sae_lens`: SAELens SAE wrappers routed per call.
- :mod:`~interpkv.core.calls`: per-call state in context variables (gated ``fwd_hooks``,
  positions, generation start; "is this hook point hooked for this call").
- :mod:`~interpkv.core.hookpos`: :func:`interpkv.hook_positions`.
- :mod:`~interpkv.core.stephooks`: the seam where fault objects plug in.
- :mod:`~interpkv.core.heldback`: the multi-turn rule: a forward refuses a cache whose
  held-back token (from ``generate``) was not fed; the ``row_state`` key names.
- :mod:`~interpkv.core.hostread`: where interpkv may read tensor values on the host
  (and where it must not: the per-step decode path).
- :mod:`~interpkv.core.tlkeywords`: TransformerLens's forward keywords on ``forward`` / ``capture``.
"""
