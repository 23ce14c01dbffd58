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

__all__ = ["held_tokens", "held_back", "hold_back", "forget", "snapshot", "restore", "NO_TOKEN"]

NO_TOKEN = -1
"""Held-back id of a row with nothing held back (it had stopped)."""

IDS, DUE = "next_tokens", "next_tokens_at"
"""The names of the held-back ids and of the positions they are due at in ``cache.row_state`` (and in files)."""


def held_tokens(cache: KVCache) -> Optional[Tuple[Int[Tensor, "batch"], Int[Tensor, "batch"]]]:
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


def hold_back(cache: KVCache, tokens: Int[Tensor, "batch"], real: Bool[Tensor, "batch"]) -> None:
    """Record ``tokens`` (where ``real``) as chosen but not fed, due at ``cache.next_positions``."""
    cache.row_state[IDS] = torch.where(real, tokens, torch.full_like(tokens, NO_TOKEN))
    cache.row_state[DUE] = cache.next_positions.clone()


def forget(cache: KVCache) -> None:
    """Drop what :func:`hold_back` recorded (the cache can no longer be continued from it)."""
    cache.row_state.pop(IDS, None)
    cache.row_state.pop(DUE, None)



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
