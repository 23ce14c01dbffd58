"""``interpkv.diff`` / ``interpkv.compare``: where two runs part ways.

A *site* is one hook point at one absolute position of one batch row (for
``blocks.L.*`` hooks the layer is part of the name). For each site a
:class:`DivergenceReport` keeps three numbers, computed in float64 over the
site's trailing axes (heads, d_head, d_model, key positions...):

- ``max_abs``: ``max |a - b|``;
- ``rel``: ``||a - b|| / ||b||`` (``b`` is the reference);
- ``cos``: cosine similarity of ``a`` and ``b``;

and ``scale = max |b|`` for the tolerance test. Entries equal in both runs
(including the ``-inf`` of masked attention scores, and NaN for "not there")
count as no error; an entry present or finite in one run but not the other
is an infinite error. ``rel`` and ``cos`` use the entries finite in both.

A site *diverges* at ``(atol, rtol)`` when ``max_abs > atol + rtol * scale``.
The logits are a site family of their own (``"logits"``, after every hook),
with a KL divergence per position, ``KL(softmax(b) || softmax(a))``.

:func:`compare` never holds two full sets of activations: it records the
uncached reference, then runs the cached chunks comparing each activation
against the reference as it fires and dropping it.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from .capture import NamesFilter, Sink, attention_rows, capture, run
from .record import LOGITS, Record, is_attention_hook, split_hook_name

__all__ = ["Site", "DivergenceReport", "diff", "compare", "site_stats"]

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5
"""Defaults of ``ok`` / ``first_divergence``: float32 parity (a cached and an
uncached float32 run differ by summation order, ~1e-6 on tiny models). Use
1e-10 for float64 runs."""


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
    same = (a == b) | (nan_a & nan_b)  # equal values, equal infinities, both absent
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


@dataclass(frozen=True)
class Site:
    """One hook at one absolute position of one batch row.

    Attributes:
        hook: full TransformerLens hook name (``"blocks.0.attn.hook_q"``), or
            ``"logits"``.
        layer: block index, None for hooks outside the blocks.
        pos: absolute position (the query position for attention hooks).
        batch: batch row.
        max_abs, rel, cos: the site's statistics (see module docstring).
    """

    hook: str
    layer: Optional[int]
    pos: int
    batch: int
    max_abs: float
    rel: float
    cos: float = float("nan")


class DivergenceReport:
    """Per-site error statistics of run ``a`` against reference ``b``.

    Attributes:
        hooks: compared hook names in forward order, ``"logits"`` last.
        stats: hook name -> {"max_abs", "rel", "cos", "scale"}: float64
            ``[batch, pos]`` tensors, NaN where the site does not exist.
        kl_per_position: ``[batch, pos]`` KL(reference || a) of the next-token
            distributions, NaN where the site does not exist.
        only_in_a, only_in_b: hooks captured in one run but not the other.
    """

    def __init__(
        self,
        hooks: List[str],
        stats: Dict[str, Dict[str, Tensor]],
        kl_per_position: Tensor,
        only_in_a: Sequence[str] = (),
        only_in_b: Sequence[str] = (),
    ):
        self.hooks = hooks
        self.stats = stats
        self.kl_per_position = kl_per_position
        self.only_in_a = list(only_in_a)
        self.only_in_b = list(only_in_b)

    # -------------------------------------------------------------- summary
    @property
    def logits_max_abs(self) -> float:
        """Largest ``|a - b|`` over every logit."""
        return _nanmax(self.stats[LOGITS]["max_abs"])

    @property
    def kl(self) -> float:
        """Largest per-position KL(reference || a)."""
        return _nanmax(self.kl_per_position)

    def hook_max_abs(self) -> Dict[str, float]:
        """Hook name -> largest ``max_abs`` over its sites, in forward order."""
        return {h: _nanmax(self.stats[h]["max_abs"]) for h in self.hooks}

    def diverged(
        self, hook: str, *, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL
    ) -> Bool[Tensor, "batch pos"]:
        """``[batch, pos]``: True where ``hook``'s site fails the tolerance."""
        s = self.stats[hook]
        return s["max_abs"] > atol + rtol * torch.nan_to_num(s["scale"], nan=0.0)

    def ok(self, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> bool:
        """Whether every site (logits included) is within tolerance."""
        return self.first_divergence(atol=atol, rtol=rtol) is None

    def first_divergence(
        self, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL
    ) -> Optional[Site]:
        """The earliest hook in forward order that diverges, at its lowest position.

        Among rows diverging at that position, the lowest batch row.

        Returns:
            A :class:`Site`, or None when every site is within tolerance.
        """
        for hook in self.hooks:
            bad = self.diverged(hook, atol=atol, rtol=rtol)
            if not bool(bad.any()):
                continue
            rows, positions = bad.nonzero(as_tuple=True)
            pos = int(positions.min())
            batch = int(rows[positions == pos].min())
            return self.site(hook, pos, batch)
        return None

    def site(self, hook: str, pos: int, batch: int = 0) -> Site:
        """The :class:`Site` of ``hook`` at ``pos`` in row ``batch``."""
        s = self.stats[hook]
        layer, _ = split_hook_name(hook)
        return Site(
            hook=hook,
            layer=layer,
            pos=pos,
            batch=batch,
            max_abs=float(s["max_abs"][batch, pos]),
            rel=float(s["rel"][batch, pos]),
            cos=float(s["cos"][batch, pos]),
        )

    def to_frame(self):
        """A pandas DataFrame with one row per hook x position x batch row.

        Columns: ``hook`` (full name), ``layer`` (nullable int), ``family``
        (the name without ``blocks.L.``), ``order`` (forward index), ``pos``,
        ``batch``, ``max_abs``, ``rel``, ``cos``, ``scale``; and ``kl`` on
        the logits rows.

        >>> frame = report.to_frame()                                  # doctest: +SKIP
        >>> frame[frame.family == "attn.hook_z"].groupby("layer").max_abs.max()  # doctest: +SKIP
        """
        import pandas as pd

        parts = []
        for order, hook in enumerate(self.hooks):
            s = self.stats[hook]
            present = ~torch.isnan(s["max_abs"])
            rows, positions = present.nonzero(as_tuple=True)
            layer, family = split_hook_name(hook)
            columns = {
                "hook": hook,
                "layer": pd.array([layer] * len(rows), dtype="Int64"),
                "family": family,
                "order": order,
                "pos": positions.numpy(),
                "batch": rows.numpy(),
            }
            for name in STAT_NAMES:
                columns[name] = s[name][rows, positions].numpy()
            if hook == LOGITS:
                columns["kl"] = self.kl_per_position[rows, positions].numpy()
            parts.append(pd.DataFrame(columns))
        frame = pd.concat(parts, ignore_index=True)
        return frame.sort_values(["order", "pos", "batch"], ignore_index=True)

    def __repr__(self) -> str:
        first = self.first_divergence()
        where = "none" if first is None else f"{first.hook} pos {first.pos} (max_abs {first.max_abs:.3g})"
        return (
            f"DivergenceReport({len(self.hooks)} hooks, logits_max_abs={self.logits_max_abs:.3g}, "
            f"kl={self.kl:.3g}, first divergence at default tolerance: {where})"
        )


def _nanmax(x: Tensor) -> float:
    values = x[~torch.isnan(x)]
    return float(values.max()) if values.numel() else 0.0


def _kl(a_logits: Tensor, b_logits: Tensor) -> Tensor:
    """KL(softmax(b) || softmax(a)) over the last axis, float64."""
    log_a = F.log_softmax(a_logits.double(), dim=-1)
    log_b = F.log_softmax(b_logits.double(), dim=-1)
    return (log_b.exp() * (log_b - log_a)).sum(dim=-1)


class _StatsTable:
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


def _check_shapes(hook: str, a: Tensor, b: Tensor) -> None:
    if is_attention_hook(hook):
        same = a.shape[1] == b.shape[1]  # heads; position axes may differ in length
    else:
        same = a.shape[2:] == b.shape[2:]
    if not same:
        raise ValueError(
            f"{hook} has shape {tuple(a.shape)} in one run and {tuple(b.shape)} in the other: "
            "the records come from different architectures and cannot be compared site by site"
        )


def diff(a: Record, b: Record) -> DivergenceReport:
    """Compare two Records site by site; ``b`` is the reference.

    Works for any two Records of the same architecture and tokens: cached vs
    uncached, float16 vs float32, patched vs clean.

    Args:
        a: the run under test.
        b: the reference run.

    Returns:
        A :class:`DivergenceReport` over the hooks both captured, in ``b``'s
        forward order.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("gpt2", dtype=torch.float64)
    >>> tokens = torch.arange(10)[None]
    >>> report = interpkv.diff(interpkv.capture(model, tokens, steps=[5, 5]),
    ...                        interpkv.capture(model, tokens))
    >>> report.ok(atol=1e-10, rtol=1e-10)
    True
    """
    if a.valid.shape[0] != b.valid.shape[0]:
        raise ValueError(
            f"the records have batch sizes {a.valid.shape[0]} and {b.valid.shape[0]}; "
            "diff compares runs over the same rows"
        )
    batch = b.valid.shape[0]
    n_positions = max(a.n_positions, b.n_positions)
    table = _StatsTable(batch, n_positions)
    a_valid, b_valid = _pad_valid(a.valid, n_positions), _pad_valid(b.valid, n_positions)
    both = a_valid & b_valid
    one = a_valid ^ b_valid
    rows, positions = both.nonzero(as_tuple=True)
    miss_rows, miss_positions = one.nonzero(as_tuple=True)
    common = [h for h in b.order if h in a]
    for hook in common:
        x, y = a[hook], b[hook]
        _check_shapes(hook, x, y)
        if is_attention_hook(hook):
            x, y = _pad_attention(x, n_positions), _pad_attention(y, n_positions)
            x_sites = x.permute(0, 2, 1, 3)[rows, positions]  # (n, H, P)
            y_sites = y.permute(0, 2, 1, 3)[rows, positions]
        else:
            x_sites = _pad_positions(x, n_positions)[rows, positions]  # (n, ...)
            y_sites = _pad_positions(y, n_positions)[rows, positions]
        table.put(hook, rows, positions, site_stats(x_sites, y_sites))
        table.missing(hook, miss_rows, miss_positions)
    logits_a = _pad_positions(a.logits, n_positions)[rows, positions]
    logits_b = _pad_positions(b.logits, n_positions)[rows, positions]
    table.kl[rows, positions] = _kl(logits_a, logits_b).cpu()
    return DivergenceReport(
        common,
        table.stats,
        table.kl,
        only_in_a=[h for h in a.order if h not in b],
        only_in_b=[h for h in b.order if h not in a],
    )


def _pad_valid(valid: Tensor, n: int) -> Tensor:
    return F.pad(valid, (0, n - valid.shape[1]), value=False)


def _pad_positions(x: Tensor, n: int) -> Tensor:
    if x.shape[1] == n:
        return x
    pad = x.new_full((x.shape[0], n - x.shape[1], *x.shape[2:]), float("nan"))
    return torch.cat([x, pad], dim=1)


def _pad_attention(x: Tensor, n: int) -> Tensor:
    if x.shape[-1] == n:
        return x
    out = x.new_full((*x.shape[:2], n, n), float("nan"))
    out[:, :, : x.shape[2], : x.shape[3]] = x
    return out


class _Comparator(Sink):
    """A sink comparing each activation to a reference Record as it fires.

    Activations wait in a small per-hook buffer (at most ``FLUSH_SITES``
    positions) and are compared in one batched call, then dropped: a chunk of
    one token costs an append, not a dozen small tensor ops per hook.
    """

    FLUSH_SITES = 64

    def __init__(self, reference: Record, valid: Tensor):
        if valid.shape != reference.valid.shape:
            raise ValueError(
                f"the reference covers positions {tuple(reference.valid.shape)} (batch, pos) but "
                f"this run covers {tuple(valid.shape)}; compare the same tokens and mask"
            )
        self.reference = reference
        self.table = _StatsTable(*valid.shape)
        self.seen: Dict[str, None] = {}
        self.pending: Dict[str, list] = {}
        self.pending_sites: Dict[str, int] = {}
        self._memo = None

    def activation(self, name, act, q_pos, k_pos):
        self.seen[name] = None
        if name not in self.reference:
            return
        _check_shapes(name, act, self.reference[name])
        # A copy: a later hook may modify this tensor in place before the flush.
        sites = self._sites(q_pos) if k_pos is None else None
        self._push(name, (act.clone(), q_pos, k_pos, sites))

    def logits(self, logits, q_pos):
        self._push(LOGITS, (logits, q_pos, None, self._sites(q_pos)))

    def _push(self, name: str, entry) -> None:
        self.pending.setdefault(name, []).append(entry)
        self.pending_sites[name] = self.pending_sites.get(name, 0) + entry[1].shape[1]
        if self.pending_sites[name] >= self.FLUSH_SITES:
            self._flush(name)

    def finish(self) -> None:
        for name in list(self.pending):
            self._flush(name)

    def _sites(self, q_pos: Tensor):
        """Rows, chunk columns and absolute positions of a chunk's real tokens.

        Memoized on the chunk's ``q_pos`` object, which every hook of a chunk shares.
        """
        if self._memo is None or self._memo[0] is not q_pos:
            rows, cols = (q_pos >= 0).nonzero(as_tuple=True)
            self._memo = (q_pos, rows, cols, q_pos[rows, cols])
        return self._memo[1:]

    def _flush(self, name: str) -> None:
        entries = self.pending.pop(name, [])
        self.pending_sites.pop(name, None)
        if not entries:
            return
        ref = self.reference[name]
        a_parts, row_parts, pos_parts = [], [], []
        for act, q_pos, k_pos, sites in entries:
            if k_pos is None:
                rows, cols, positions = sites
                a_parts.append(act[rows, cols])
                row_parts.append(rows)
                pos_parts.append(positions)
                continue
            for b in range(q_pos.shape[0]):
                q_abs, a_rows = attention_rows(act, q_pos, k_pos, ref.shape[-1], b)
                a_parts.append(a_rows.transpose(0, 1))  # (nq, H, P)
                row_parts.append(torch.full_like(q_abs, b))
                pos_parts.append(q_abs)
        rows, positions = torch.cat(row_parts), torch.cat(pos_parts)
        a_sites = torch.cat([a.to(a_parts[0].dtype) for a in a_parts])
        if is_attention_hook(name):
            b_sites = ref.permute(0, 2, 1, 3)[rows, positions]  # (n, H, P)
        else:
            b_sites = ref[rows, positions]
        self.table.put(name, rows, positions, site_stats(a_sites, b_sites))
        if name == LOGITS:
            self.table.kl[rows, positions] = _kl(a_sites, b_sites).cpu()

    def report(self) -> DivergenceReport:
        order = self.reference.order
        common = [h for h in order if h in self.table.stats]
        return DivergenceReport(
            common,
            self.table.stats,
            self.table.kl,
            only_in_a=[h for h in self.seen if h not in self.reference],
            only_in_b=[h for h in order if h != LOGITS and h not in self.seen],
        )


def compare(
    model,
    tokens: Tensor,
    *,
    steps: Sequence[int],
    attention_mask: Optional[Tensor] = None,
    names: NamesFilter = None,
) -> DivergenceReport:
    """Cached (chunked by ``steps``) against uncached, site by site.

    The uncached run is recorded first (it is the reference, ``b``); the
    cached run is then compared against it hook by hook as it fires, so only
    the statistics of the cached run survive (memory: one Record plus one
    chunk's activations).

    Args:
        model: a HookedTransformer.
        tokens: token ids ``[batch, pos]``.
        steps: chunk lengths of the cached run, summing to ``pos``.
        attention_mask: ``[batch, pos]`` (1 = real, 0 = padding).
        names: hooks to compare (as in :func:`interpkv.capture`).

    Returns:
        A :class:`DivergenceReport` (cached = ``a``, uncached = ``b``).

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("llama", dtype=torch.float64)
    >>> report = interpkv.compare(model, torch.arange(12)[None], steps=[6, 1, 1, 4])
    >>> report.ok(atol=1e-10, rtol=1e-10), report.first_divergence(atol=1e-10, rtol=1e-10)
    (True, None)
    """
    if steps is None:
        raise ValueError("compare needs steps=[...] for the cached run, e.g. steps=[8, 1, 1]")
    reference = capture(model, tokens, attention_mask=attention_mask, names=names)
    sink = run(
        model,
        tokens,
        lambda valid: _Comparator(reference, valid),
        steps=steps,
        attention_mask=attention_mask,
        names=names,
    )
    return sink.report()
