"""Continuing generation from a cache: the held-back token.

Next-token logits are not in a key/value cache: they come from the residual
stream of the last token, which the cache does not keep. So a cache can only
be continued from if the last token has *not* been fed yet and is known. This
is the convention :func:`interpkv.generate` follows (as HuggingFace's
``generate`` does with ``past_key_values``): afterwards the cache holds every
token of ``Generation.tokens`` but the last one, which it *holds back* in
``cache.next_tokens`` (one id per row, ``-1`` for a row that has none) together
with the positions it is due at (``cache.next_tokens_at``).
``generate(model, cache=cache, max_new_tokens=n)`` feeds the held-back tokens
and goes on, giving exactly the tokens one uninterrupted call would have.

A held-back token is only valid while the cache is where ``generate`` left it:
once a forward moves a row's ``next_positions``, the cache no longer ends right
before it and it is refused (cropping back to the same place makes it valid
again, since ``crop`` keeps the first slots unchanged).

The held-back token is part of the context, so it is never left out of a
next turn (:mod:`interpkv.core.heldback`): ``generate(model, tokens,
cache=cache)`` feeds it before ``tokens``, and ``interpkv.forward`` through
the cache refuses until it is fed (:func:`prepend_held_back`) or dropped on
purpose (:func:`release`).

A cache filled by :func:`interpkv.forward` or :func:`interpkv.capture` holds
every token it was given and has nothing held back. To make a prompt cache to
continue from, prefill it with ``generate(model, prompt, cache=cache,
max_new_tokens=0)``: that feeds every prompt token but the last and holds the
last back.
"""

from typing import Optional, Tuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interpkv.cache.kvcache import KVCache

__all__ = ["held_back", "hold_back", "snapshot", "restore", "release", "prepend_held_back", "NO_TOKEN"]

NO_TOKEN = -1
"""``cache.next_tokens`` value of a row with nothing held back (it had stopped)."""


def held_back(cache: KVCache) -> Tuple[Int[Tensor, "batch 1"], Int[Tensor, "batch 1"]]:
    """The held-back tokens of ``cache`` as a one-column prompt and its mask.

    Returns:
        ``(tokens, mask)``, each ``[batch, 1]``: the held-back ids (0 and mask 0
        for rows with none).

    Raises:
        ValueError: nothing is held back, or the cache moved on since.
    """
    if cache.next_tokens is None:
        raise ValueError(
            "this cache has no held-back token to continue from: it holds every token it was "
            "given (filled by interpkv.forward or interpkv.capture, or loaded from a file), and "
            "next-token logits need the last token run again. Either prefill it with "
            "interpkv.generate(model, prompt, cache=cache, max_new_tokens=0), which feeds all but "
            "the last prompt token and holds that one back, or pass the tokens to feed: "
            "generate(model, tokens, cache=cache, ...)"
        )
    ids, due = cache.next_tokens, cache.next_tokens_at
    live = ids != NO_TOKEN
    moved = (live & (due != cache.next_positions)).nonzero().flatten().tolist()
    if moved:
        raise ValueError(
            f"rows {moved} of this cache moved on since generate held their next token back "
            f"(held back at positions {due[moved].tolist()}, the rows are now at "
            f"{cache.next_positions[moved].tolist()}); pass the tokens to feed explicitly: "
            "generate(model, tokens, cache=cache, ...)"
        )
    tokens = torch.where(live, ids, torch.zeros_like(ids))[:, None]  # (B, 1)
    return tokens, live.long()[:, None]


def hold_back(cache: KVCache, tokens: Int[Tensor, " batch"], real: Bool[Tensor, " batch"]) -> None:
    """Record ``tokens`` (where ``real``) as chosen but not fed, due at ``cache.next_positions``."""
    ids = torch.where(real, tokens, torch.full_like(tokens, NO_TOKEN))
    due = cache.next_positions.clone()
    cache.next_tokens, cache.next_tokens_at = ids, due  # one statement: both or neither



def release(cache: KVCache) -> None:
    """Forget the held-back tokens: ``cache`` is then continued as it is (without them)."""
    cache.next_tokens = cache.next_tokens_at = None


def prepend_held_back(
    cache: KVCache,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    *,
    keep: bool = False,
) -> Tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """The next turn's ``tokens`` with ``cache``'s pending held-back token in front (the multi-turn rule).

    Rows with nothing pending get a padding column (mask 0), so every row
    continues from its real context. ``tokens`` that are exactly the held-back
    column (one column, ``out.tokens[:, -1:]``, passed explicitly) are that
    token and are returned as they are, not repeated. Unless ``keep``, the
    hold is released: the returned tokens are what to feed next.

    Args:
        cache: a cache :func:`interpkv.generate` continued (others: returned unchanged).
        tokens: the next turn's ids, ``[batch, pos]``.
        attention_mask: their mask (None: all real).
        keep: leave the hold in place (``generate`` releases it itself once
            it can restore it on failure).

    Returns:
        ``(tokens, mask)``, one column longer when a token was pending.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("gpt2")
    >>> cache = interpkv.KVCache.for_model(model)
    >>> first = interpkv.generate(model, torch.tensor([[1, 2, 3]]), cache=cache, max_new_tokens=2)
    >>> tokens, mask = prepend_held_back(cache, torch.tensor([[7, 8]]))
    >>> tokens[0, 0] == first.tokens[0, -1], tokens.shape
    (tensor(True), torch.Size([1, 3]))
    """
    from interpkv.core.heldback import pending_rows

    if attention_mask is None:
        attention_mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    rows = pending_rows(cache)
    if not rows:
        if not keep:
            release(cache)  # stale (the cache moved on) or nothing held
        return tokens, attention_mask
    if tokens.is_floating_point():
        raise ValueError(
            "this cache holds back a token id but the next turn is embeddings: embed it yourself "
            "(model.embed(cache.next_tokens[:, None])) and put it in front, then "
            "interpkv.generation.resume.release(cache)"
        )
    live = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    live[rows] = True
    held = torch.where(live, cache.next_tokens.to(tokens.device), torch.zeros_like(live, dtype=tokens.dtype))
    if tokens.shape[1] == 1 and bool(((tokens[:, 0] == held) & (attention_mask[:, 0] == 1) | ~live).all()):
        if not keep:  # exactly the held-back column, passed explicitly (the older idiom): not repeated
            release(cache)
        return tokens, attention_mask
    tokens = torch.cat([held[:, None].to(tokens.dtype), tokens], dim=1)  # (B, 1 + T)
    mask = torch.cat([live.to(attention_mask.dtype)[:, None], attention_mask.to(tokens.device)], dim=1)
    if not keep:
        release(cache)
    return tokens, mask


def snapshot(cache: KVCache) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """What :func:`restore` puts back: the held-back tokens and where they are due."""
    ids, due = cache.next_tokens, cache.next_tokens_at
    return (None if ids is None else ids.clone(), None if due is None else due.clone())


def restore(cache: KVCache, state: Tuple[Optional[Tensor], Optional[Tensor]]) -> None:
    """Put back the held-back tokens of :func:`snapshot` (the cache's slots are the caller's to keep)."""
    cache.next_tokens, cache.next_tokens_at = state
