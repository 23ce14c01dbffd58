"""``Slots``: the answer a cache gives a forward call (where to read and write)."""

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Slots", "grown"]


@dataclass(frozen=True)
class Slots:
    """Where one forward call reads and writes, from :meth:`KVCache.begin`.

    Attributes:
        q_pos: ``Int[Tensor, "batch pos"]``, absolute positions of the new
            tokens (``-1`` for padding).
        k_pos: ``Int[Tensor, "batch kv_pos"]``, positions of every key the
            call attends: stored slots, then the new ones.
        start: first slot the new keys and values are written to.
    """

    q_pos: Tensor
    k_pos: Tensor
    start: int

    @property
    def end(self) -> int:
        """One past the last slot written (= ``k_pos.shape[1]``)."""
        return self.start + self.q_pos.shape[1]


def grown(table: Tensor, used: int, capacity: int, fill: int) -> Tensor:
    """``table`` ``[batch, n]`` widened to ``capacity`` columns, keeping the first ``used``."""
    grown = table.new_full((table.shape[0], capacity), fill)
    grown[:, :used] = table[:, :used]
    return grown
