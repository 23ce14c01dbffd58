"""Pieces every engine runner shares: absolute positions, the valid grid, chunk bounds.

An engine runner feeds ``tokens`` to some implementation (interpkv's own
cache, TransformerLens's ``past_kv_cache``, a ``transformers`` model with its
``past_key_values``) chunk by chunk and hands each activation to a
:class:`~interpkv.diagnostics.capture.Sink` with the absolute positions of its
queries. Positions come from the attention mask here, never from the engine
under audit: a left-padded row's first real token is position 0 whatever the
engine believes.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interpkv.core.positions import absolute_positions, validate_mask
from interpkv.diagnostics.capture import split_steps

__all__ = ["Layout", "layout", "chunk_bounds"]


@dataclass
class Layout:
    """Tokens, mask and absolute positions of one audited run.

    Attributes:
        tokens: ``[batch, pos]`` token ids.
        mask: ``[batch, pos]`` int64, 1 = real, 0 = padding (all ones if none was given).
        given_mask: the mask as the caller gave it (None when none was given).
        true_pos: ``[batch, pos]`` absolute position of each token, -1 for padding.
        valid: ``[batch, n_positions]``, True where a row has a token at that position.
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]
    given_mask: Optional[Tensor]
    true_pos: Int[Tensor, "batch pos"]
    valid: Bool[Tensor, "batch pos"]


def layout(tokens: Tensor, attention_mask: Optional[Tensor]) -> Layout:
    """Validate ``tokens`` / ``attention_mask`` and number the real tokens from 0 per row.

    >>> layout(torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 1]])).true_pos
    tensor([[-1,  0,  1]])
    """
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor [batch, pos], got {type(tokens).__name__}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if attention_mask is not None and attention_mask.ndim == 1:
        attention_mask = attention_mask[None]
    mask = validate_mask(tokens, attention_mask)
    true_pos = absolute_positions(mask, mask.new_zeros(tokens.shape[0]))  # (B, T), -1 for padding
    n_positions = int(true_pos.max()) + 1 if true_pos.numel() else 0
    if n_positions <= 0:
        raise ValueError("attention_mask marks every token as padding: nothing to run")
    valid = torch.zeros(tokens.shape[0], n_positions, dtype=torch.bool, device=tokens.device)
    rows, cols = (true_pos >= 0).nonzero(as_tuple=True)
    valid[rows, true_pos[rows, cols]] = True
    given = None if attention_mask is None else mask
    return Layout(tokens, mask, given, true_pos, valid)


def chunk_bounds(n_tokens: int, steps: Optional[Sequence[int]]) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` slot ranges of the chunks (one chunk when ``steps`` is None).

    >>> chunk_bounds(10, [6, 1, 3])
    [(0, 6), (6, 7), (7, 10)]
    """
    bounds, start = [], 0
    for n in split_steps(n_tokens, steps):
        bounds.append((start, start + n))
        start += n
    return bounds
