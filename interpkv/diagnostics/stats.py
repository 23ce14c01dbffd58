"""Per-site error statistics shared by :func:`interpkv.diff` and :func:`interpkv.compare`.

A *site* is one hook point at one absolute position of one batch row. For each
site three numbers are computed in float64 over the site's trailing axes
(heads, d_head, d_model, key positions...):

- ``max_abs``: ``max |a - b|``;
- ``rel``: ``||a - b|| / ||b||`` (``b`` is the reference);
- ``cos``: cosine similarity of ``a`` and ``b``;

and ``scale = max |b|`` for the tolerance test. Entries equal in both runs
(including the ``-inf`` of masked attention scores) count as no error, and
so does a NaN both runs computed; an entry finite in one run but not the
other is an infinite error. ``rel`` and ``cos`` use the entries finite in
both. Which sites exist is decided before, by each Record's explicit masks
(``valid``, :meth:`~interpkv.Record.computed`), never by a value: a site one
run computed and the other did not is an infinite error
(:meth:`StatsTable.missing`).
"""

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from interpkv.diagnostics.record import is_attention_hook

__all__ = ["site_stats", "STAT_NAMES", "StatsTable", "kl_divergence", "nanmax", "check_shapes"]


def site_stats(a: Tensor, b: Tensor) -> Dict[str, Tensor]:
    """Per-site statistics of ``a`` against reference ``b``, both ``[n_sites, ...]``.

    Returns:
        ``max_abs``, ``rel``, ``cos``, ``scale``: float64 tensors ``[n_sites]``.

    >>> s = site_stats(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 4.0]]))
    >>> s["max_abs"].item(), round(s["rel"].item(), 4)
    (2.0, 0.4851)
    """
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    same = (a == b) | (nan_a & nan_b)  # equal values, equal infinities, NaN in both
    err = torch.where(same, torch.zeros_like(a), (a - b).abs())
    err = torch.where(nan_a ^ nan_b, torch.full_like(err, float("inf")), err)
    max_abs = err.amax(dim=1) if err.shape[1] else err.new_zeros(err.shape[0])
    finite = torch.isfinite(a) & torch.isfinite(b)
    a = torch.where(finite, a, torch.zeros_like(a))
    b = torch.where(finite, b, torch.zeros_like(b))
    diff_norm = (a - b).norm(dim=1)
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
    inf = torch.full_like(diff_norm, float("inf"))
    rel = torch.where(norm_b > 0, diff_norm / norm_b.clamp(min=1e-300), inf)
    rel = torch.where(diff_norm == 0, torch.zeros_like(rel), rel)
    rel = torch.where(torch.isinf(max_abs), inf, rel)
    cos = (a * b).sum(dim=1) / (norm_a * norm_b).clamp(min=1e-300)
    cos = torch.where((norm_a == 0) & (norm_b == 0), torch.ones_like(cos), cos)
    scale = b.abs().amax(dim=1) if b.shape[1] else b.new_zeros(b.shape[0])
    return {"max_abs": max_abs, "rel": rel, "cos": cos, "scale": scale}


STAT_NAMES = ("max_abs", "rel", "cos", "scale")



def nanmax(x: Tensor) -> float:
    values = x[~torch.isnan(x)]
    return float(values.max()) if values.numel() else 0.0


def kl_divergence(a_logits: Tensor, b_logits: Tensor) -> Tensor:
    """KL(softmax(b) || softmax(a)) over the last axis, float64."""
    log_a = F.log_softmax(a_logits.double(), dim=-1)
    log_b = F.log_softmax(b_logits.double(), dim=-1)
    return (log_b.exp() * (log_b - log_a)).sum(dim=-1)


class StatsTable:
    """Accumulates per-site statistics into ``[batch, pos]`` tensors."""

    def __init__(self, batch: int, n_positions: int):
        self.shape = (batch, n_positions)
        self.stats: Dict[str, Dict[str, Tensor]] = {}
        self.kl = torch.full(self.shape, float("nan"), dtype=torch.float64)

    def put(self, hook: str, rows: Tensor, positions: Tensor, values: Dict[str, Tensor]) -> None:
        table = self.stats.get(hook)
        if table is None:
            table = {n: torch.full(self.shape, float("nan"), dtype=torch.float64) for n in STAT_NAMES}
            self.stats[hook] = table
        for name in STAT_NAMES:
            table[name][rows, positions] = values[name].cpu()

    def missing(self, hook: str, rows: Tensor, positions: Tensor) -> None:
        """Sites present in only one run: infinite error."""
        n = len(rows)
        inf = torch.full((n,), float("inf"), dtype=torch.float64)
        nan = torch.full((n,), float("nan"), dtype=torch.float64)
        self.put(hook, rows, positions, {"max_abs": inf, "rel": inf, "cos": nan, "scale": nan})


def check_shapes(hook: str, a: Tensor, b: Tensor) -> None:
    if is_attention_hook(hook):
        same = a.shape[1] == b.shape[1]  # heads; position axes may differ in length
    else:
        same = a.shape[2:] == b.shape[2:]
    if not same:
        raise ValueError(
            f"{hook} has shape {tuple(a.shape)} in one run and {tuple(b.shape)} in the other: "
            "the records come from different architectures and cannot be compared site by site"
        )


def pad_valid(valid: Tensor, n: int) -> Tensor:
    return F.pad(valid, (0, n - valid.shape[1]), value=False)


def pad_positions(x: Tensor, n: int) -> Tensor:
    """``x`` with its position axis zero-padded to ``n`` (the padding is never a computed site)."""
    if x.shape[1] == n:
        return x
    pad = x.new_zeros((x.shape[0], n - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def pad_attention(x: Tensor, n: int, fill: float = 0.0) -> Tensor:
    """``x`` ``[batch, head, q, k]`` padded to ``n`` positions with ``fill`` (keys after every query)."""
    if x.shape[-1] == n:
        return x
    out = x.new_full((*x.shape[:2], n, n), fill)
    out[:, :, : x.shape[2], : x.shape[3]] = x
    return out


