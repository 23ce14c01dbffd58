"""``PositionBound``: the host-side upper bound on a cache's next positions.

A forward through a cache needs host values now and then (is a learned
position embedding's ``n_ctx`` reached?), and reading them back from the
positions tensor would make every decode step wait for the device. The cache
keeps this bound in Python ints instead: each commit adds its number of new
columns (a row advances by at most that), so no step reads anything back.
The bound belongs to one positions tensor; once the cache replaces that
tensor another way (crop, select, load, ...), it is recomputed on the next
request, with one host read. It is exact while every column fed is real.
"""

from typing import Optional

from torch import Tensor

__all__ = ["PositionBound"]


class PositionBound:
    """Upper bound on ``max(next_positions)`` for one ``next_positions`` tensor.

    >>> import torch
    >>> next_positions = torch.tensor([3, 5])
    >>> bound = PositionBound(next_positions, 5)
    >>> advanced = next_positions + torch.tensor([1, 0])
    >>> _ = bound.advance(next_positions, advanced, 1)
    >>> bound.get(advanced), bound.get(torch.tensor([2, 2]))  # another tensor: read once
    (6, 2)
    """

    def __init__(self, tensor: Optional[Tensor], bound: int = 0):
        self._tensor, self._bound = tensor, bound

    def get(self, next_positions: Tensor) -> int:
        """The bound for ``next_positions`` (one host read if it is not the tracked tensor)."""
        if self._tensor is not next_positions:
            self._tensor = next_positions
            self._bound = int(next_positions.max()) if next_positions.numel() else 0
        return self._bound

    def tighten(self, next_positions: Tensor) -> int:
        """The exact ``max(next_positions)`` (one host read), kept as the bound."""
        self._tensor = None
        return self.get(next_positions)

    def advance(self, old: Tensor, new: Tensor, columns: int) -> Tensor:
        """``new`` is ``old`` plus at most ``columns`` per row (a commit); returns ``new``.

        A bound that was stale stays stale.
        """
        if self._tensor is old:
            self._tensor, self._bound = new, self._bound + columns
        return new
