"""Absolute positions: the one function every positional scheme reads.

Attention mask + per-row offsets -> absolute position of each new token.
Learned embeddings index their rows with it, rotary rotates by it and ALiBi
biases by differences of it. Callers never compute offsets themselves (the
"feed only the last token without its offset" bug).
"""

import torch
from jaxtyping import Int
from torch import Tensor

from interpkv.core.axes import PAD_POSITION
from interpkv.core.hostread import checks_on_device, host_array

__all__ = ["absolute_positions", "validate_mask"]


def validate_mask(
    tokens: Tensor, attention_mask: "Tensor | None"
) -> Int[Tensor, "batch pos"]:
    """Check a mask against its tokens and return it as int64 (all ones if None).

    Raises:
        ValueError: the shapes differ, or the mask holds values other than 0 and 1.
    """
    if attention_mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    if attention_mask.shape != tokens.shape[:2]:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the tokens have "
            f"shape {tuple(tokens.shape[:2])} (batch, pos); the mask covers exactly the "
            "new tokens of this call: pass one 0/1 entry per token."
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask.to(device=tokens.device, dtype=torch.long)
    if attention_mask.is_floating_point() or not _zeros_and_ones(attention_mask):
        raise ValueError(
            "attention_mask must hold only 0 (padding) and 1 (real token); got values "
            f"{torch.unique(attention_mask).tolist()[:8]}"
        )
    return attention_mask.to(device=tokens.device, dtype=torch.long)


def _zeros_and_ones(mask: Tensor) -> bool:
    """Whether ``mask`` holds only 0 and 1, read where it lives (:mod:`interpkv.core.hostread`)."""
    values = host_array(mask)
    if values is not None:
        return bool(((values == 0) | (values == 1)).all())
    if checks_on_device(mask):
        return bool(((mask == 0) | (mask == 1)).all())  # one read per prompt
    return True  # a one-position step on an accelerator: no sync


def absolute_positions(
    attention_mask: Int[Tensor, "batch pos"], offsets: Int[Tensor, " batch"]
) -> Int[Tensor, "batch pos"]:
    """Absolute position of each token, ``-1`` for padding.

    A real token's position is the number of real tokens before it in its row,
    counting the ``offsets[b]`` already stored in a cache.

    Args:
        attention_mask: 1 for real tokens, 0 for padding (any pattern).
        offsets: real tokens already seen per row (``KVCache`` tracks it).

    Returns:
        Positions with the mask's shape.

    >>> absolute_positions(torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.tensor([0, 5]))
    tensor([[-1,  0,  1],
            [ 5,  6,  7]])
    """
    mask = attention_mask.long()
    positions = offsets.long()[:, None] + mask.cumsum(dim=1) - 1  # (B, T)
    return torch.where(mask.bool(), positions, torch.full_like(positions, PAD_POSITION))
