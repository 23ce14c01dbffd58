"""Per-site error statistics shared by :func:`interpkv.diff` and :func:`interpkv.compare`.

A *site* is one hook point at one absolute position of one batch row. For each
site three numbers are computed in float64 over the site's trailing axes
(heads, d_head, d_model, key positions...):

- ``max_abs``: ``max |a - b|``;
- ``rel``: ``||a - b|| / ||b||`` (``b`` is the reference);
- ``cos``: cosine similarity of ``a`` and ``b``;

and ``scale = max |b|`` for the tolerance test. Entries equal in both runs
(including the ``-inf`` of masked attention scores) count as no error; an
entry finite in one run but not the other is an infinite error, and so is
a NaN anywhere, in either run or both (a NaN model never passes). The
``nonfinite`` statistic says which side is at fault: a bit mask of
:data:`NONFINITE_A` (NaN, or an infinity the other run does not have, in
``a``) and :data:`NONFINITE_B` (the same in ``b``); 0 for finite sites.
``rel`` and ``cos`` use the entries finite in both. Which sites exist is decided before, by each Record's explicit masks
(``valid``, :meth:`~interpkv.Record.computed`), never by a value: a site one
run computed and the other did not is an infinite error
(:meth:`StatsTable.missing`).
"""

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from interpkv.diagnostics.record import is_attention_hook

__all__ = [
    "site_stats",
    "STAT_NAMES",
    "StatsTable",
    "kl_divergence",
    "nanmax",
    "check_shapes",
    "NONFINITE_A",
    "NONFINITE_B",
    "nonfinite_note",
]

NONFINITE_A = 1
"""Bit of the ``nonfinite`` statistic: the run under test (``a``) has a NaN or an unmatched infinity."""
NONFINITE_B = 2
"""Bit of the ``nonfinite`` statistic: the reference (``b``) has a NaN or an unmatched infinity."""


def nonfinite_note(code: float, a: str = "a", b: str = "b") -> str:
    """Words for a ``nonfinite`` code: ``""`` (finite), ``"NaN/inf in a"``, ``"... in b"``, ``"... in both"``.

    >>> nonfinite_note(3, "cached", "uncached")
    'NaN/inf in both cached and uncached'
    """
    code = 0 if code != code else int(code)  # NaN: not a site
    if code == NONFINITE_A | NONFINITE_B:
        return f"NaN/inf in both {a} and {b}"
    if code == NONFINITE_A:
        return f"NaN/inf in {a} only"
    if code == NONFINITE_B:
        return f"NaN/inf in {b} only"
    return ""


SITE_BLOCK = 1 << 17
"""Elements per block of sites :func:`site_stats` works on: 1 MiB per float64 temporary.

Temporaries of several MiB are returned to the OS on free and page-faulted in again on
the next allocation: at 16 MiB blocks the statistics ran 3-7x slower (GPT-2-small flush).
"""


def site_stats(a: Tensor, b: Tensor) -> Dict[str, Tensor]:
    """Per-site statistics of ``a`` against reference ``b``, both ``[n_sites, ...]``.

    Sites are processed in blocks of about :data:`SITE_BLOCK` elements, so the
    float64 temporaries stay small whatever the site count (256 logit sites
    of a 50k vocabulary are 100 MB per temporary otherwise).

    Returns:
        ``max_abs``, ``rel``, ``cos``, ``scale``, ``nonfinite``: float64 tensors ``[n_sites]``.

    >>> s = site_stats(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 4.0]]))
    >>> s["max_abs"].item(), round(s["rel"].item(), 4)
    (2.0, 0.4851)
    """
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    per_block = max(1, SITE_BLOCK // max(1, a.shape[1]))
    if a.shape[0] <= per_block:
        return _site_stats(a, b)
    parts = [_site_stats(a[i : i + per_block], b[i : i + per_block]) for i in range(0, a.shape[0], per_block)]
    return {name: torch.cat([p[name] for p in parts]) for name in STAT_NAMES}


def _site_stats(a: Tensor, b: Tensor) -> Dict[str, Tensor]:
    # Boolean tensor ops (isnan, isfinite, masks) cost 5-20x an arithmetic pass on
    # CPU, so the masks below are spelled in arithmetic with the same values.
    a, b = a.double(), b.double()
    if not a.shape[1]:
        zeros = a.new_zeros(a.shape[0])
        return _finish(zeros, zeros, zeros, zeros, zeros, zeros, zeros)
    d = a - b  # (n, D)
    err = d.abs()
    max_abs = err.amax(dim=1)  # NaN if any difference is NaN
    if bool(torch.isfinite(max_abs).all()):
        # Every entry finite in both (a finite difference needs two finite values):
        # equal entries already have a zero difference, nothing to mask.
        zeros = torch.zeros_like(max_abs)
        return _finish(
            max_abs, d.norm(dim=1), a.norm(dim=1), b.norm(dim=1), (a * b).sum(dim=1), b.abs().amax(dim=1), zeros
        )
    # A NaN difference: equal infinities (no error), or a NaN in either run, or an
    # infinity in one run only (both infinite errors).
    max_abs = torch.nan_to_num(err, nan=0.0, posinf=float("inf")).amax(dim=1)
    nan_a, nan_b = _absent(a), _absent(b)  # (n, D) 0/1
    # An infinity the other run does not have: a finite |a - b| is impossible, and
    # equal infinities give NaN, so "inf difference or NaN difference without a NaN".
    unmatched = torch.isinf(err).double()
    inf_a = unmatched * torch.isinf(a).double()
    inf_b = unmatched * torch.isinf(b).double()
    bad_a = (nan_a + inf_a).amax(dim=1) > 0  # (n,)
    bad_b = (nan_b + inf_b).amax(dim=1) > 0
    nonfinite = bad_a.double() * NONFINITE_A + bad_b.double() * NONFINITE_B
    max_abs = torch.where(nonfinite > 0, torch.full_like(max_abs, float("inf")), max_abs)
    # rel and cos over the entries finite in both: zero elsewhere.
    both_finite = (a - a) + (b - b)  # 0 where both are finite, NaN elsewhere
    a = torch.nan_to_num(a + both_finite, nan=0.0)
    b = torch.nan_to_num(b + both_finite, nan=0.0)
    return _finish(
        max_abs, (a - b).norm(dim=1), a.norm(dim=1), b.norm(dim=1), (a * b).sum(dim=1), b.abs().amax(dim=1), nonfinite
    )


def _absent(x: Tensor) -> Tensor:
    """1.0 where ``x`` is NaN, 0.0 elsewhere (infinities included)."""
    return torch.nan_to_num(x, nan=1.0, posinf=0.0, neginf=0.0) - torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _finish(max_abs, diff_norm, norm_a, norm_b, dot, scale, nonfinite) -> Dict[str, Tensor]:
    inf = torch.full_like(diff_norm, float("inf"))
    rel = torch.where(norm_b > 0, diff_norm / norm_b.clamp(min=1e-300), inf)
    rel = torch.where(diff_norm == 0, torch.zeros_like(rel), rel)
    rel = torch.where(torch.isinf(max_abs), inf, rel)
    cos = dot / (norm_a * norm_b).clamp(min=1e-300)
    cos = torch.where((norm_a == 0) & (norm_b == 0), torch.ones_like(cos), cos)
    return {"max_abs": max_abs, "rel": rel, "cos": cos, "scale": scale, "nonfinite": nonfinite}


STAT_NAMES = ("max_abs", "rel", "cos", "scale", "nonfinite")



def nanmax(x: Tensor) -> float:
    values = x[~torch.isnan(x)]
    return float(values.max()) if values.numel() else 0.0


def kl_divergence(a_logits: Tensor, b_logits: Tensor) -> Tensor:
    """KL(softmax(b) || softmax(a)) over the last axis, float64 (in blocks of rows, as :func:`site_stats`)."""
    lead, n_vocab = a_logits.shape[:-1], a_logits.shape[-1]
    a_rows, b_rows = a_logits.reshape(-1, n_vocab), b_logits.reshape(-1, n_vocab)
    per_block = max(1, SITE_BLOCK // max(1, n_vocab))
    parts = [_kl(a_rows[i : i + per_block], b_rows[i : i + per_block]) for i in range(0, a_rows.shape[0], per_block)]
    return (torch.cat(parts) if parts else a_rows.new_zeros(0, dtype=torch.float64)).reshape(lead)


def _kl(a_logits: Tensor, b_logits: Tensor) -> Tensor:
    log_a = F.log_softmax(a_logits.double(), dim=-1)
    log_b = F.log_softmax(b_logits.double(), dim=-1)
    kl = (log_b.exp() * (log_b - log_a)).sum(dim=-1)
    # NaN logits on either side: an infinite divergence, never a NaN that max() skips.
    return torch.nan_to_num(kl, nan=float("inf"))


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
        zero = torch.zeros((n,), dtype=torch.float64)
        self.put(hook, rows, positions, {"max_abs": inf, "rel": inf, "cos": nan, "scale": nan, "nonfinite": zero})


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


