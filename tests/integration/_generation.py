"""Shared helpers for the generation and patching tests: reference loops and prompts."""

import functools
from typing import Optional, Sequence

import torch

import interpkv
from interpkv import zoo
from interpkv.generation.generate import sample_next

# float64 leaves only summation-order noise (~1e-14): 1e-10 catches any real
# difference. float32 accumulates ~1e-7 relative per op over a few layers on
# logits of size ~1-10: 1e-5 is the stated bar.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@functools.cache
def model(name: str, dtype: torch.dtype = torch.float64):
    return zoo.load(name, dtype=dtype)


def prompts(d_vocab: int, batch: int = 3, length: int = 10, seed: int = 0, ragged: bool = True):
    """Token ids and a left-padding mask (row 1 loses 3 columns, row 2 six)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (batch, length), generator=gen)
    mask = torch.ones_like(tokens)
    if ragged:
        for row, pad in zip(range(1, batch), (3, 6, 2, 5)):
            mask[row, :pad] = 0
    return tokens, mask


def uncached_loop(
    m,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    *,
    fwd_hooks: Sequence = (),
    temperature: float = 0.0,
    seed: Optional[int] = None,
):
    """Generation without a cache: the whole sequence is recomputed every step.

    Returns (tokens [batch, prompt+steps], logits [batch, steps, d_vocab]).
    """
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    seq, seq_mask, logits = tokens, mask, []
    for _ in range(steps):
        last = interpkv.forward(m, seq, attention_mask=seq_mask, fwd_hooks=fwd_hooks)[:, -1]
        logits.append(last)
        chosen = sample_next(last, temperature=temperature, generator=gen)
        seq = torch.cat([seq, chosen[:, None]], 1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(chosen)[:, None]], 1)
    return seq, torch.stack(logits, 1)


def teacher_forced(m, tokens: torch.Tensor, mask: torch.Tensor, prompt_len: int, fwd_hooks=()):
    """Uncached logits that chose each generated token: ``[batch, new, d_vocab]``."""
    logits = interpkv.forward(m, tokens[:, :-1], attention_mask=mask[:, :-1], fwd_hooks=fwd_hooks)
    return logits[:, prompt_len - 1 :]
