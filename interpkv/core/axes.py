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

PAD_POSITION = -1

ATTENTION_HOOKS = ("hook_attn_scores", "hook_pattern")
"""Hook suffixes shaped ``[batch, head_index, pos, kv_pos]`` (the query axis is 2)."""

__all__ = ["PAD_POSITION", "ATTENTION_HOOKS", "is_attention_hook", "MASKED_SCORE", "fill_value"]

MASKED_SCORE = float("-inf")
"""``hook_attn_scores`` where a key is masked: TransformerLens's ``attn.IGNORE`` (``-inf``)."""


def fill_value(name: str) -> float:
    """What ``run_with_cache`` holds where hook ``name`` has no value: ``MASKED_SCORE`` for scores, else 0.

    >>> fill_value("blocks.0.attn.hook_attn_scores"), fill_value("blocks.0.attn.hook_pattern")
    (-inf, 0.0)
    """
    return MASKED_SCORE if name.endswith("hook_attn_scores") else 0.0


def is_attention_hook(name: str) -> bool:
    """Whether hook ``name`` is shaped ``[batch, head_index, pos, kv_pos]``.

    >>> is_attention_hook("blocks.0.attn.hook_pattern"), is_attention_hook("blocks.0.hook_resid_post")
    (True, False)
    """
    return name.rsplit(".", 1)[-1] in ATTENTION_HOOKS
