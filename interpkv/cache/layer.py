"""Per-layer key/value storage: one preallocated buffer pair per attention layer.

The multi-layer container (positions, offsets, model binding) is
:class:`interpkv.cache.KVCache`; this module only knows tensors and slots.
"""

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["LayerCache"]


class LayerCache:
    """Keys and values of one layer, ``[batch, kv_head, capacity, d_head]``.

    Slots ``[0, length)`` are in use (the container owns ``length``). Writes go
    to slots past it first and only count once the container commits, so a
    forward pass that fails halfway, or a frozen cache, leaves the stored
    history untouched. Capacity grows geometrically, so appending is amortised
    O(new tokens) and never re-touches stored keys except to move them once on
    growth.

    Keys are stored at ``n_key_value_heads`` heads: grouped-query heads are
    shared at attention time, never repeated in storage.
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        d_head: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (batch, kv_heads, capacity, d_head)
        self.keys: Float[Tensor, "batch kv_head capacity d_head"] = torch.zeros(
            shape, dtype=dtype, device=device
        )
        self.values: Float[Tensor, "batch kv_head capacity d_head"] = torch.zeros(
            shape, dtype=dtype, device=device
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def reserve(self, used: int, needed: int) -> None:
        """Make room for ``needed`` slots, keeping the first ``used``."""
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], new_capacity, old.shape[3]))
            new[:, :, :used] = old[:, :, :used]
            setattr(self, name, new)

    def write(
        self,
        start: int,
        keys: Float[Tensor, "batch pos kv_head d_head"],
        values: Float[Tensor, "batch pos kv_head d_head"],
    ) -> None:
        """Write new keys and values (TransformerLens layout) at ``start``.

        In place into the preallocated buffers, except when autograd tracks the
        history (grad enabled and a key, value or stored slot requires grad):
        then the buffers are rebuilt out of place, so a backward pass from a
        later call reaches every earlier one (an in-place write would bump the
        version of a tensor an earlier call saved for backward).
        """
        end = start + keys.shape[1]
        k, v = keys.transpose(1, 2), values.transpose(1, 2)  # (B, kvh, T, d)
        if self._tracks_graph(k, v):
            self.keys = _spliced(self.keys, start, end, k)
            self.values = _spliced(self.values, start, end, v)
            return
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v

    @property
    def holds_graph(self) -> bool:
        """Whether the stored keys or values carry an autograd graph."""
        return self.keys.requires_grad or self.values.requires_grad

    def _tracks_graph(self, *new: Tensor) -> bool:
        return torch.is_grad_enabled() and (self.holds_graph or any(t.requires_grad for t in new))

    def view(self, end: int):
        """Keys and values of slots ``[0, end)``, ``[batch, kv_head, kv_pos, d_head]``."""
        return self.keys[:, :, :end], self.values[:, :, :end]

    # ------------------------------------------------------------ lifecycle
    @classmethod
    def from_tensors(
        cls,
        keys: Float[Tensor, "batch kv_head kv_pos d_head"],
        values: Float[Tensor, "batch kv_head kv_pos d_head"],
    ) -> "LayerCache":
        """A layer cache holding exactly ``keys`` and ``values`` (capacity = their length)."""
        layer = cls.__new__(cls)
        layer.keys, layer.values = keys, values
        return layer

    def take(self, rows: Tensor, length: int) -> "LayerCache":
        """A new, independent layer cache of ``rows`` (in that order), slots ``[0, length)``."""
        keys, values = self.view(length)
        # Advanced indexing copies; index_select on these strided views is ~100x slower.
        return LayerCache.from_tensors(keys[rows], values[rows])

    def gather_slots_(self, index: Tensor, length: int) -> None:
        """In place: new slot ``j`` of row ``b`` becomes old slot ``index[b, j]``.

        Args:
            index: ``[batch, kept]`` old slot indices, each ``< length``.
            length: slots in use before the move.

        Capacity is unchanged (a windowed cache reuses its buffers, so memory
        stays flat); slots past ``kept`` keep stale data and are unused.
        """
        batch, kv_heads, _, d_head = self.keys.shape
        kept = index.shape[1]
        expanded = index[:, None, :, None].expand(batch, kv_heads, kept, d_head)
        out_of_place = self._tracks_graph()
        for name in ("keys", "values"):
            buffer = getattr(self, name)
            moved = buffer[:, :, :length].gather(2, expanded)  # (B, kvh, kept, d)
            if out_of_place:  # keep earlier calls' saved tensors intact (see write)
                setattr(self, name, torch.cat([moved, buffer[:, :, kept:]], dim=2))
            else:
                buffer[:, :, :kept] = moved


def _spliced(buffer: Tensor, start: int, end: int, new: Tensor) -> Tensor:
    """``buffer`` with slots ``[start, end)`` replaced by ``new``, out of place."""
    return torch.cat([buffer[:, :, :start], new.to(buffer.dtype), buffer[:, :, end:]], dim=2)
