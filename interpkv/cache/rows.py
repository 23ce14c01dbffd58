"""Row selection for :meth:`KVCache.select`: validated integer row indices."""

import torch
from torch import Tensor

__all__ = ["validated_rows"]


def validated_rows(batch_indices, batch_size: int, device) -> Tensor:
    """Row indices for ``select``: a 1-D list or tensor of ints in ``[0, batch_size)``."""
    if isinstance(batch_indices, Tensor):
        if batch_indices.dtype == torch.bool or batch_indices.is_floating_point():
            raise TypeError(
                f"select(batch_indices) takes integer row indices, got a {batch_indices.dtype} tensor; "
                "for a boolean row mask pass mask.nonzero().flatten()"
            )
        if batch_indices.ndim != 1:
            raise ValueError(
                f"select(batch_indices) takes a 1-D list of row indices, got shape {tuple(batch_indices.shape)}"
            )
        rows = batch_indices.tolist()
    else:
        if isinstance(batch_indices, (str, bytes)) or not hasattr(batch_indices, "__iter__"):
            raise TypeError(f"select(batch_indices) takes a list of row indices, got {batch_indices!r}")
        rows = list(batch_indices)
        bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, int)]
        if bad:
            raise TypeError(f"select(batch_indices) takes integer row indices, got {bad[:3]!r}")
    if not rows:
        raise ValueError("select(batch_indices) needs at least one row index (got none); a cache has >= 1 row")
    outside = [r for r in rows if not 0 <= r < batch_size]
    if outside:
        raise ValueError(
            f"batch_indices {outside[:5]} are outside [0, {batch_size}) for a cache "
            f"with batch_size={batch_size}"
        )
    return torch.tensor(rows, dtype=torch.long, device=device)
