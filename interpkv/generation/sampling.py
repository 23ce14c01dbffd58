"""Choosing the next token from final-position logits: greedy, temperature, top-k, top-p.

Sampling draws from a caller's ``torch.Generator`` (``interpkv.generate`` keeps
a private one, seeded by ``seed=`` or, without one, by a draw from torch's
global generator), so a seed, or ``torch.manual_seed``, reproduces a run.
"""

from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["sample_next"]


def sample_next(
    logits: Float[Tensor, "batch d_vocab"],
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Int[Tensor, " batch"]:
    """Choose one token per row from final-position logits.

    Args:
        logits: ``[batch, d_vocab]``.
        temperature: 0 = greedy (argmax, first index on ties); else logits are
            divided by it before sampling.
        top_k: keep only the ``top_k`` largest logits.
        top_p: nucleus sampling: keep the smallest set of most likely tokens
            whose probability reaches ``top_p`` (always at least one token).
        generator: the ``torch.Generator`` to draw from.

    Returns:
        Token ids ``[batch]``.

    >>> sample_next(torch.tensor([[0.0, 2.0, 1.0]]))
    tensor([1])
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
