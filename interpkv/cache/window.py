"""Eviction for windowed caches: which stored slots a future query can still attend.

A windowed cache (``window=W, sinks=S``) lets a query at position ``q`` attend a
key at position ``k`` iff ``k < S`` (an attention sink) or ``k > q - W`` (inside
the window), plus causality; :func:`in_window` is that rule, and every user of it
(the attention mask :func:`interpkv.core.attention.allowed_keys`, eviction,
validation of loaded files and crops) calls it.
Every future query of a row comes after its newest stored position ``n``, so a
key at ``S <= k <= n - W`` can never be attended again and is dropped. What
stays is the first ``S`` and the last ``W`` positions of each row, so memory is
flat: ``S + W`` slots per row once the window is full.

Kept keys keep their absolute positions (they are not renumbered), so rotary,
ALiBi and learned position embeddings still see the right distances: a windowed
cache equals an uncached run whose attention is restricted to the same keys.

Rows may be ragged (left padding, different lengths), so different rows drop
different slots. Storage stays rectangular: :func:`compaction_index` moves each
row's kept slots to the right end, in their original order, and fills the
front with padding slots (position ``-1``), the same layout left padding gives.
"""

from typing import Optional, Tuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interpkv.core.arguments import check_cache_memory, count
from interpkv.core.axes import PAD_POSITION

__all__ = [
    "in_window",
    "check_window_args",
    "kept_slots",
    "required_positions",
    "check_holds_required",
    "compaction_index",
    "eviction",
    "compact_positions",
]


def in_window(
    key_pos: Int[Tensor, "..."], query_pos: Int[Tensor, "..."], window: Optional[int], sinks: int = 0
) -> Bool[Tensor, "..."]:
    """The window rule, written once: may a query at ``query_pos`` see a key at ``key_pos``?

    True iff ``key_pos < sinks`` (an attention sink) or ``key_pos > query_pos -
    window`` (inside the window); always True without a window. Causality and
    padding are not part of it. Broadcasts like ``torch`` comparisons.

    >>> in_window(torch.tensor([0, 1, 2, 3, 4]), torch.tensor(4), window=2, sinks=1).tolist()
    [True, False, False, True, True]
    """
    if window is None:
        return torch.ones(torch.broadcast_shapes(key_pos.shape, query_pos.shape), dtype=torch.bool, device=key_pos.device)
    return (key_pos < sinks) | (key_pos > query_pos - window)


def kept_slots(
    positions: Int[Tensor, "batch kv_pos"],
    next_positions: Int[Tensor, " batch"],
    window: Optional[int],
    sinks: int = 0,
) -> Bool[Tensor, "batch kv_pos"]:
    """Stored slots a future query may still attend (padding slots are never kept).

    Args:
        positions: absolute position of each stored slot, ``-1`` for padding.
        next_positions: position the next token of each row will get (the
            newest stored position is ``next_positions - 1``).
        window: the cache window ``W`` (None: keep every real slot).
        sinks: the first ``sinks`` positions are kept forever.

    Returns:
        True for slots to keep: real, and ``p < sinks`` or ``p > newest - window``.

    >>> kept_slots(torch.tensor([[-1, 0, 1, 2, 3, 4]]), torch.tensor([5]), 2, 1).tolist()
    [[False, True, False, False, True, True]]
    """
    real = positions >= 0
    if window is None:
        return real
    newest = (next_positions - 1)[:, None]  # (B, 1)
    return real & in_window(positions, newest, window, sinks)


def required_positions(
    next_positions: Int[Tensor, " batch"], window: Optional[int], sinks: int, limit: int
) -> Bool[Tensor, "batch limit"]:
    """Positions ``0..limit-1`` a correct cache of each row must hold.

    A row that has seen ``m = next_positions[b]`` tokens must hold every position
    below ``m`` (no window), or those below ``min(sinks, m)`` and the last
    ``window`` ones (windowed). Used to validate loaded files and crops.
    """
    p = torch.arange(limit, device=next_positions.device)[None, :]  # (1, L)
    m = next_positions[:, None]  # (B, 1)
    seen = p < m
    if window is None:
        return seen
    return seen & in_window(p, m - 1, window, sinks)


def compaction_index(
    keep: Bool[Tensor, "batch kv_pos"], n_kept: Optional[int] = None
) -> Tuple[Int[Tensor, "batch kept"], Bool[Tensor, "batch kept"]]:
    """Slot indices that move each row's kept slots to the right end, in order.

    Args:
        keep: which slots of each row survive.
        n_kept: the new length, at least the largest number of kept slots in
            any row (None: exactly that, read from ``keep`` on the host).

    Returns:
        ``(index, real)``: ``index[b, j]`` is the old slot that becomes new slot
        ``j`` of row ``b``, and ``real[b, j]`` says whether it is a kept slot
        (False: a padding slot at the front of a shorter row). The new length
        is ``n_kept``.

    >>> index, real = compaction_index(torch.tensor([[True, False, True], [False, False, True]]))
    >>> index.tolist(), real.tolist()
    ([[0, 2], [1, 2]], [[True, True], [False, True]])
    >>> compaction_index(torch.tensor([[True, False, True]]), n_kept=3)[1].tolist()
    [[False, True, True]]
    """
    # A row keeps at most sinks + window slots (its positions are distinct: at most
    # `sinks` below sinks, `window` inside the window), so a windowed cache passes
    # n_kept = sinks + window once it stores more, and reads nothing back.
    n_slots = keep.shape[1]
    if n_kept is None:
        n_kept = int(keep.sum(dim=1).max()) if keep.numel() else 0
    # A stable sort on "kept" puts dropped slots first and kept ones last, each
    # group in its original slot order.
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices  # (B, L)
    index = order[:, n_slots - n_kept :]  # (B, L')
    return index, keep.gather(1, index)


def eviction(
    positions: Int[Tensor, "batch kv_pos"], next_positions: Int[Tensor, " batch"], window: int, sinks: int
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """What a windowed cache's commit compacts: :func:`compaction_index` of the kept slots.

    Nothing is evicted until more than ``sinks + window`` slots are stored; then
    every row is compacted to exactly that many (the most a row can keep), so
    the length comes from host ints and nothing is read back from the device.
    ``(None, None)``: nothing to evict.
    """
    if positions.shape[1] <= sinks + window:
        return None, None
    keep = kept_slots(positions, next_positions, window, sinks)
    return compaction_index(keep, n_kept=sinks + window)


def compact_positions(
    positions: Int[Tensor, "batch kv_pos"], index: Tensor, real: Tensor
) -> Int[Tensor, "batch kept"]:
    """Positions after :func:`compaction_index`: gathered, ``-1`` where not real."""
    gathered = positions.gather(1, index)
    return torch.where(real, gathered, torch.full_like(gathered, PAD_POSITION))


def check_holds_required(
    positions: Tensor, next_positions: Tensor, window: Optional[int], sinks: int, what: str
) -> None:
    """Raise unless every row holds each position its next query may attend."""
    limit = int(next_positions.max()) if next_positions.numel() else 0
    required = required_positions(next_positions, window, sinks, limit)  # (B, L)
    present = torch.zeros_like(required)
    real = positions >= 0
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
    present[rows[real], positions[real]] = True
    missing = required & ~present
    if bool(missing.any()):
        row = int(missing.any(dim=1).nonzero()[0])
        lost = missing[row].nonzero().flatten().tolist()
        raise ValueError(
            f"{what} would leave row {row} continuing at position "
            f"{int(next_positions[row])} without positions {lost[:6]}, which the window "
            f"(window={window}, sinks={sinks}) already evicted; a windowed "
            "cache cannot be cropped back past its window. Keep a fork() from the point "
            "you want to return to."
        )


def check_window_args(batch_size: int, window: Optional[int], sinks: int, model=None, capacity: int = 1) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming the bad argument of a new cache (before it allocates)."""
    count("batch_size", batch_size)
    if window is not None:
        count("window", window)
    count("sinks", sinks)
    if model is not None:
        check_cache_memory("batch_size", batch_size, model, batch_size, max(1, capacity), "its first cache slots")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of positions, got {window}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    if sinks and window is None:
        raise ValueError("sinks only make sense with a window: pass window=W as well")
