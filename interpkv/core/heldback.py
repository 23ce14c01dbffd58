"""The multi-turn rule: a cache ``generate`` left holding a token back is not continued without it.

After ``interpkv.generate(..., cache=cache)`` the cache holds every token of
``Generation.tokens`` but the last, which it holds back (``cache.next_tokens``,
due at ``cache.next_tokens_at``; see :mod:`interpkv.generation.resume`). That
token is part of the conversation: a next turn fed through the cache without
it runs on a context missing one token (off by 1-2 logits on the zoo models,
and greedy continuations change). So:

- :func:`interpkv.generate` with new ``tokens`` and such a cache feeds the
  held-back token first, automatically (it becomes the first prompt column
  of ``Generation.tokens``);
- :func:`interpkv.forward` (and :func:`interpkv.capture` / ``compare`` through
  the cache) refuses with :func:`refuse_held_back`'s error, which says how to
  include it (:func:`interpkv.generation.resume.prepend_held_back`) or drop it
  on purpose (:func:`interpkv.generation.resume.release`).

A held-back token is pending while its row's ``next_positions`` still equals
the position it is due at; once the cache moved on (``crop`` elsewhere,
``select``...) it is stale and ignored.
"""

from typing import List

__all__ = ["pending_rows", "refuse_held_back", "HeldBackTokenError"]


class HeldBackTokenError(ValueError):
    """A forward through a cache whose held-back token (from ``generate``) was not fed."""


def pending_rows(cache) -> List[int]:
    """Rows whose held-back token is still due (a host sync; only when one is held back at all)."""
    ids, due = cache.next_tokens, cache.next_tokens_at
    if ids is None:
        return []
    live = (ids >= 0) & (due.to(cache.next_positions.device) == cache.next_positions)
    return live.nonzero().flatten().tolist()


def refuse_held_back(cache) -> None:
    """Raise :class:`HeldBackTokenError` when ``cache`` holds back a pending token (see module docstring)."""
    if cache.next_tokens is None:
        return
    rows = pending_rows(cache)
    if not rows:
        return
    ids = cache.next_tokens[rows].tolist()
    raise HeldBackTokenError(
        f"this cache holds back the last token generate chose (rows {rows[:8]}: ids {ids[:8]}), "
        "which is part of the context but not stored yet; these tokens would continue without it. "
        "Continue with interpkv.generate(model, tokens, cache=cache, ...), which feeds it first, or "
        "feed it yourself: `from interpkv.generation.resume import prepend_held_back; "
        "tokens, mask = prepend_held_back(cache, tokens)` then "
        "interpkv.forward(model, tokens, cache=cache, attention_mask=mask) (its logits[:, 1:] are "
        "your tokens'). To drop it on purpose: interpkv.generation.resume.release(cache)"
    )
