"""Continuing generation from a cache: the held-back token.

Next-token logits are not in a key/value cache: they come from the residual
stream of the last token, which the cache does not keep. So a cache can only
be continued from if the last token has *not* been fed yet and is known. This
is the convention :func:`interpkv.generate` follows (as HuggingFace's
``generate`` does with ``past_key_values``): afterwards the cache holds every
token of ``Generation.tokens`` but the last one, which it *holds back*: one id
per row (``-1`` for a row that has none) together with the positions it is
due at, read with :func:`held_tokens`. The held-back token belongs to
generation: it rides on the cache as per-row state the cache never reads
(``cache.row_state["next_tokens"]`` and ``["next_tokens_at"]``, the names
cache files have always used), so forks, selections, repeats and saves carry
it.
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
from interpkv.core.heldback import DUE, IDS, pending_rows

__all__ = ["held_tokens", "held_back", "hold_back", "forget", "release", "prepend_held_back", "snapshot", "restore",
           "NO_TOKEN"]

NO_TOKEN = -1
"""Held-back id of a row with nothing held back (it had stopped)."""


def held_tokens(cache: KVCache) -> Optional[Tuple[Int[Tensor, " batch"], Int[Tensor, " batch"]]]:
    """``(ids, due_at)`` of the tokens :func:`interpkv.generate` held back in ``cache``, or None.

    ``ids[b]`` is row ``b``'s chosen-but-not-fed token (:data:`NO_TOKEN` if
    none), ``due_at[b]`` the ``next_positions`` it was held back at.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("gpt2")
    >>> cache = interpkv.KVCache.for_model(model)
    >>> gen = interpkv.generate(model, torch.tensor([[1, 2, 3]]), cache=cache, max_new_tokens=2)
    >>> ids, due = held_tokens(cache)
    >>> ids.tolist() == gen.tokens[:, -1].tolist(), due.tolist() == cache.next_positions.tolist()
    (True, True)
    """
    state = cache.row_state
    if IDS not in state and DUE not in state:
        return None
    if IDS not in state or DUE not in state:
        raise ValueError(
            f"this cache holds {sorted(k for k in (IDS, DUE) if k in state)} of the held-back token but not "
            f"both {IDS!r} and {DUE!r} (a file written by hand?); pass the tokens to feed: "
            "generate(model, tokens, cache=cache, ...)"
        )
    return state[IDS], state[DUE]


def held_back(cache: KVCache) -> Tuple[Int[Tensor, "batch 1"], Int[Tensor, "batch 1"]]:
    """The held-back tokens of ``cache`` as a one-column prompt and its mask.

    Returns:
        ``(tokens, mask)``, each ``[batch, 1]``: the held-back ids (0 and mask 0
        for rows with none).

    Raises:
        ValueError: nothing is held back, or the cache moved on since.
    """
    held = held_tokens(cache)
    if held is None:
        raise ValueError(
            "this cache has no held-back token to continue from: it holds every token it was "
            "given (filled by interpkv.forward or interpkv.capture, or loaded from a file), and "
            "next-token logits need the last token run again. Either prefill it with "
            "interpkv.generate(model, prompt, cache=cache, max_new_tokens=0), which feeds all but "
            "the last prompt token and holds that one back, or pass the tokens to feed: "
            "generate(model, tokens, cache=cache, ...)"
        )
    ids, due = held
    model = cache.model
    d_vocab = int(model.cfg.d_vocab) if model is not None else None
    if (d_vocab is not None and bool(((ids < NO_TOKEN) | (ids >= d_vocab)).any())) or bool((due < 0).any()):
        raise ValueError(
            f"the held-back tokens {ids.tolist()[:8]} of this cache are not ids in [0, d_vocab={d_vocab}) "
            f"(or {NO_TOKEN}), or their positions {due.tolist()[:8]} are negative: the cache (or the file it "
            "was loaded from) is corrupted; pass the tokens to feed: generate(model, tokens, cache=cache, ...)"
        )
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
    cache.row_state = {**cache.row_state, IDS: ids, DUE: due}  # one store: both or neither


def forget(cache: KVCache) -> None:
    """Drop what :func:`hold_back` recorded (the cache can no longer be continued from it)."""
    cache.row_state = {k: v for k, v in cache.row_state.items() if k not in (IDS, DUE)}  # one store: both or neither

def release(cache: KVCache) -> None:
    """Forget the held-back tokens: ``cache`` is then continued as it is (without them)."""
    forget(cache)


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
            "(ids, _ = interpkv.generation.resume.held_tokens(cache); model.embed(ids[:, None])) and put it in front, then "
            "interpkv.generation.resume.release(cache)"
        )
    live = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    live[rows] = True
    held = torch.where(live, cache.row_state[IDS].to(tokens.device), torch.zeros_like(live, dtype=tokens.dtype))
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
    ids, due = cache.row_state.get(IDS), cache.row_state.get(DUE)
    return (None if ids is None else ids.clone(), None if due is None else due.clone())


def restore(cache: KVCache, state: Tuple[Optional[Tensor], Optional[Tensor]]) -> None:
    """Put back the held-back tokens of :func:`snapshot` (the cache's slots are the caller's to keep)."""
    forget(cache)
    for name, value in zip((IDS, DUE), state):
        if value is not None:
            cache.row_state[name] = value
