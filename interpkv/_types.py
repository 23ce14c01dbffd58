"""Axis names and tensor aliases shared by the whole package.

Axis names reuse TransformerLens's vocabulary, declared once here:

- ``batch``: rows of a batch; each row has its own absolute positions.
- ``pos``: positions of the tokens fed in this call (the "new" tokens).
- ``kv_pos``: stored key/value slots of a cache (ordered by insertion, not
  necessarily contiguous in absolute position once a window evicts keys).
- ``head_index``: query heads (``cfg.n_heads``).
- ``kv_head``: key/value heads (``cfg.n_key_value_heads`` under GQA, else
  ``n_heads``).
- ``d_head``, ``d_model``, ``d_vocab``: as in TransformerLens.

Absolute positions are integers counting the real (unpadded) tokens of a row
before a token, so the first real token of every row is at position 0 whatever
padding precedes it. Padding is marked with position ``-1``.
"""

from jaxtyping import Bool, Float, Int
from torch import Tensor

PAD_POSITION = -1

Tokens = Int[Tensor, "batch pos"]
Mask = Int[Tensor, "batch pos"]
Positions = Int[Tensor, "batch pos"]
KeyPositions = Int[Tensor, "batch kv_pos"]
Logits = Float[Tensor, "batch pos d_vocab"]
Residual = Float[Tensor, "batch pos d_model"]
Queries = Float[Tensor, "batch pos head_index d_head"]
Keys = Float[Tensor, "batch pos kv_head d_head"]
StoredKeys = Float[Tensor, "batch kv_head kv_pos d_head"]
Scores = Float[Tensor, "batch head_index pos kv_pos"]
Allowed = Bool[Tensor, "batch 1 pos kv_pos"]

__all__ = [
    "PAD_POSITION",
    "Tokens",
    "Mask",
    "Positions",
    "KeyPositions",
    "Logits",
    "Residual",
    "Queries",
    "Keys",
    "StoredKeys",
    "Scores",
    "Allowed",
]
