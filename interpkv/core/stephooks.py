"""The seam where :mod:`interpkv.faults` plugs known cache bugs into the core.

Core modules consult this module at a few named points, and only for a forward
call that was given a cache by its caller (``interpkv.forward(..., cache=c)``).
A ``cache=None`` call, the reference every comparison is made against, never
sees a fault. With no fault active every point is skipped by an
``if step.faults`` test, so the fault-free path is the plain core code, bit for
bit.

The points, in the order a forward call reaches them:

- :func:`query_offsets` (forward.py): the per-row offset added to new tokens'
  positions (``stale_position_offset``).
- :func:`before_reserve` (forward.py): cache surgery before the new slots are
  reserved (``zero_padded_resume`` appends zero slots once;
  ``kv_heads_repeated_before_cache`` widens storage to ``n_heads``).
- :func:`bias_positions` (attention.Step): query positions the ALiBi bias is
  built from (``alibi_unsliced``).
- :func:`allowed` (attention.Step.mask): which key slots are attended
  (``no_cache_history``, ``zero_padded_resume``).
- :func:`stored_kv` (attention): the key/value tensors written to the cache
  (``kv_heads_repeated_before_cache``).

The registry maps a model to the names injected on it (a
``WeakKeyDictionary``: a model that is garbage-collected takes its faults
with it). :mod:`interpkv.faults` is the public face.
"""

import weakref
from collections import Counter
from typing import FrozenSet, Tuple

import torch
from torch import Tensor

from interpkv._types import PAD_POSITION

__all__ = [
    "NO_CACHE_HISTORY",
    "STALE_POSITION_OFFSET",
    "ALIBI_UNSLICED",
    "ZERO_PADDED_RESUME",
    "KV_HEADS_REPEATED",
    "ALL",
    "activate",
    "deactivate",
    "active",
]

NO_CACHE_HISTORY = "no_cache_history"
STALE_POSITION_OFFSET = "stale_position_offset"
ALIBI_UNSLICED = "alibi_unsliced"
ZERO_PADDED_RESUME = "zero_padded_resume"
KV_HEADS_REPEATED = "kv_heads_repeated_before_cache"
ALL = (
    NO_CACHE_HISTORY,
    STALE_POSITION_OFFSET,
    ALIBI_UNSLICED,
    ZERO_PADDED_RESUME,
    KV_HEADS_REPEATED,
)

ZERO_PAD_BLOCK = 16
"""``zero_padded_resume`` pads the stored history up to the next multiple of
this many slots (mlx-examples allocated in steps of 256; 16 keeps the zeros a
large share of a short test prompt, which is when the real bug hurt most)."""

_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, Counter]" = weakref.WeakKeyDictionary()
# Per cache: the (first, end) slots of zero padding appended by zero_padded_resume.
_ZERO_SLOTS: "weakref.WeakKeyDictionary[object, Tuple[int, int]]" = weakref.WeakKeyDictionary()

_EMPTY: FrozenSet[str] = frozenset()


def activate(model: torch.nn.Module, name: str) -> None:
    if name not in ALL:
        raise ValueError(f"unknown fault {name!r}; known faults: {', '.join(ALL)}")
    _ACTIVE.setdefault(model, Counter())[name] += 1


def deactivate(model: torch.nn.Module, name: str) -> None:
    counts = _ACTIVE.get(model)
    if counts is None or counts[name] == 0:
        return
    counts[name] -= 1
    if counts[name] == 0:
        del counts[name]
    if not counts:
        del _ACTIVE[model]


def active(model: torch.nn.Module) -> FrozenSet[str]:
    """Names of faults injected on ``model`` (empty almost always)."""
    counts = _ACTIVE.get(model)
    return frozenset(counts) if counts else _EMPTY


# --------------------------------------------------------------- forward.py
def query_offsets(faults: FrozenSet[str], cache) -> Tensor:
    """Per-row offset of the new tokens' positions (``cache.next_positions`` normally)."""
    if STALE_POSITION_OFFSET in faults:
        # The offset is never advanced: every call places its tokens as if the
        # cache were empty (x-transformers "feed only the last token" reports).
        return torch.zeros_like(cache.next_positions)
    return cache.next_positions


def before_reserve(faults: FrozenSet[str], model: torch.nn.Module, cache) -> None:
    """Cache surgery a faulty implementation would have done by now."""
    if KV_HEADS_REPEATED in faults:
        _widen_storage(model, cache)
    if ZERO_PADDED_RESUME in faults and cache.seq_len > 0 and cache not in _ZERO_SLOTS:
        _append_zero_slots(cache)


def _widen_storage(model: torch.nn.Module, cache) -> None:
    n_heads = int(model.cfg.n_heads)
    for layer in cache.layers:
        kv_heads = layer.keys.shape[1]
        if kv_heads == n_heads:
            continue
        # Tiled (head h holds kv head h % kv_heads), the layout mistake: the
        # model shares kv head h // group among consecutive query heads.
        layer.keys = layer.keys.repeat(1, n_heads // kv_heads, 1, 1)
        layer.values = layer.values.repeat(1, n_heads // kv_heads, 1, 1)
    # The storage really holds n_heads heads now; nbytes reads this field.
    cache.signature = dict(cache.signature, kv_heads=n_heads)


def _append_zero_slots(cache) -> None:
    n_zero = ZERO_PAD_BLOCK - cache.seq_len % ZERO_PAD_BLOCK  # 1..ZERO_PAD_BLOCK
    start = cache.reserve(n_zero)
    pad = torch.full(
        (cache.batch_size, n_zero), PAD_POSITION, dtype=torch.long, device=cache.device
    )
    cache.key_positions(pad)
    for layer in cache.layers:
        zeros = layer.keys.new_zeros(
            (cache.batch_size, n_zero, layer.keys.shape[1], layer.keys.shape[3])
        )
        layer.write(start, zeros, zeros)
    cache.commit(pad)
    _ZERO_SLOTS[cache] = (start, start + n_zero)


# ------------------------------------------------------------- attention.py
def bias_positions(faults: FrozenSet[str], cache, q_pos: Tensor) -> Tensor:
    """Query positions the ALiBi bias rows are taken for (``q_pos`` normally)."""
    if ALIBI_UNSLICED in faults:
        # Rows [:query_ctx] of the bias matrix: the first positions, as if the
        # cached keys were not there (TransformerLens #776).
        offsets = cache.next_positions[:, None]  # (B, 1), not yet committed
        return torch.where(q_pos >= 0, q_pos - offsets, q_pos)
    return q_pos


def allowed(faults: FrozenSet[str], cache, start: int, mask: Tensor) -> Tensor:
    """Which key slots may be attended (``mask`` normally)."""
    if NO_CACHE_HISTORY in faults and start > 0:
        mask = mask.clone()
        mask[..., :start] = False  # the stored history is never read
    zero = _ZERO_SLOTS.get(cache) if ZERO_PADDED_RESUME in faults else None
    if zero is not None:
        mask = mask.clone()
        mask[..., zero[0] : zero[1]] = True  # the zero slots count as real history
    return mask


def stored_kv(faults: FrozenSet[str], layer_cache, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """Keys and values as written to the cache, ``[batch, pos, heads, d_head]``."""
    if KV_HEADS_REPEATED in faults:
        repeat = layer_cache.keys.shape[1] // k.shape[2]
        return k.repeat(1, 1, repeat, 1), v.repeat(1, 1, repeat, 1)  # tiled heads
    return k, v
