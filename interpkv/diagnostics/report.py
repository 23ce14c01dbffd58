"""``DivergenceReport`` and ``Site``: where two runs part ways.

A site *diverges* at ``(atol, rtol)`` when ``max_abs > atol + rtol * scale``
(statistics in :mod:`interpkv.diagnostics.stats`). The logits are a site family
of their own (``"logits"``, after every hook), with a KL divergence per
position, ``KL(softmax(b) || softmax(a))``. Default tolerances follow the
runs' dtype (``report.dtype``, :func:`interpkv.tolerances.site_tolerance`:
1e-10 float64, 1e-5 float32, 2e-2 float16, 1.5e-1 bfloat16).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from jaxtyping import Bool
from torch import Tensor

from interpkv._repr import html_summary
from interpkv.core.arguments import tolerance as checked_tolerance
from interpkv.diagnostics.record import LOGITS, split_hook_name
from interpkv.diagnostics.stats import STAT_NAMES, nanmax, nonfinite_note
from interpkv.tolerances import site_tolerance

__all__ = ["Site", "DivergenceReport"]


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
        nonfinite: ``""`` for a finite site, else which run has the NaN or
            unmatched infinity that makes it fail (``"NaN/inf in a only"``...;
            :func:`~interpkv.diagnostics.stats.nonfinite_note`).
    """

    hook: str
    layer: Optional[int]
    pos: int
    batch: int
    max_abs: float
    rel: float
    cos: float = float("nan")
    nonfinite: str = ""


class DivergenceReport:
    """Per-site error statistics of run ``a`` against reference ``b``.

    Attributes:
        hooks: compared hook names in forward order, ``"logits"`` last.
        stats: hook name -> {"max_abs", "rel", "cos", "scale"}: float64
            ``[batch, pos]`` tensors, NaN where the site does not exist.
        kl_per_position: ``[batch, pos]`` KL(reference || a) of the next-token
            distributions, NaN where the site does not exist.
        only_in_a, only_in_b: hooks captured in one run but not the other.
        skipped: hook name -> why it fired but could not be compared (no
            single value per position; see :mod:`interpkv.diagnostics.layouts`).
            Skipped hooks have no rows in :meth:`to_frame` and never count as
            diverging; :meth:`__repr__` lists how many there are.
        cause: None, or a short string naming the ``fwd_hooks`` that make the
            runs differ (set by :func:`interpkv.compare` when the comparison
            without them agrees; see :mod:`interpkv.diagnostics.cause`).
        audited: site families in :attr:`stats` beyond :attr:`hooks` that
            :meth:`ok` and :meth:`first_divergence` check too, after the hooks:
            ``"fast_path.logits"``, the unrecorded cached run's logits
            (:mod:`interpkv.diagnostics.fastpath`).
        dtype: the compared runs' dtype (the coarser of the two), which the
            default ``atol`` / ``rtol`` follow; None: float32's.
    """

    def __init__(
        self,
        hooks: List[str],
        stats: Dict[str, Dict[str, Tensor]],
        kl_per_position: Tensor,
        only_in_a: Sequence[str] = (),
        only_in_b: Sequence[str] = (),
        skipped: Optional[Dict[str, str]] = None,
        cause: Optional[str] = None,
    ):
        self.cause = cause
        self.hooks = hooks
        self.stats = stats
        self.kl_per_position = kl_per_position
        self.only_in_a = list(only_in_a)
        self.only_in_b = list(only_in_b)
        self.skipped = dict(skipped or {})
        self.run_names = ("a", "b")  # what a and b are, for messages (compare: cached, uncached)
        self.audited: List[str] = []
        self.dtype: Optional[torch.dtype] = None

    def tolerance(self, atol: Optional[float] = None, rtol: Optional[float] = None) -> Tuple[float, float]:
        """``(atol, rtol)``: the given ones, else :func:`~interpkv.tolerances.site_tolerance` of :attr:`dtype`."""
        default = site_tolerance(self.dtype)
        return (default if atol is None else atol, default if rtol is None else rtol)

    # -------------------------------------------------------------- summary
    @property
    def logits_max_abs(self) -> float:
        """Largest ``|a - b|`` over every logit."""
        return nanmax(self.stats[LOGITS]["max_abs"])

    @property
    def kl(self) -> float:
        """Largest per-position KL(reference || a)."""
        return nanmax(self.kl_per_position)

    def hook_max_abs(self) -> Dict[str, float]:
        """Hook name -> largest ``max_abs`` over its sites, in forward order."""
        return {h: nanmax(self.stats[h]["max_abs"]) for h in self.hooks}

    def diverged(
        self, hook: str, *, atol: Optional[float] = None, rtol: Optional[float] = None
    ) -> Bool[Tensor, "batch pos"]:
        """``[batch, pos]``: True where ``hook``'s site fails the tolerance (default: :meth:`tolerance`)."""
        atol, rtol = self.tolerance(atol, rtol)
        atol, rtol = checked_tolerance("atol", atol), checked_tolerance("rtol", rtol)
        s = self.stats[hook]
        return s["max_abs"] > atol + rtol * torch.nan_to_num(s["scale"], nan=0.0)

    def ok(self, atol: Optional[float] = None, rtol: Optional[float] = None) -> bool:
        """Whether every site (logits included) is within tolerance (default: the dtype's, :meth:`tolerance`)."""
        return self.first_divergence(atol=atol, rtol=rtol) is None

    def first_divergence(
        self, atol: Optional[float] = None, rtol: Optional[float] = None
    ) -> Optional[Site]:
        """The earliest hook in forward order that diverges, at its lowest position.

        Among rows diverging at that position, the lowest batch row.

        Returns:
            A :class:`Site`, or None when every site is within tolerance.
        """
        for name, value in (("atol", atol), ("rtol", rtol)):  # even with no hook to compare
            if value is not None:
                checked_tolerance(name, value)
        for hook in [*self.hooks, *self.audited]:
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
            nonfinite=nonfinite_note(float(s["nonfinite"][batch, pos]), *self.run_names) if "nonfinite" in s else "",
        )

    def to_frame(self):
        """A pandas DataFrame with one row per hook x position x batch row.

        Hooks in :attr:`skipped` have no rows. Columns: ``hook`` (full name), ``layer`` (nullable int), ``family``
        (the name without ``blocks.L.``), ``order`` (forward index), ``pos``,
        ``batch``, ``max_abs``, ``rel``, ``cos``, ``scale``; and ``kl`` on
        the logits rows.

        >>> frame = report.to_frame()                                  # doctest: +SKIP
        >>> frame[frame.family == "attn.hook_z"].groupby("layer").max_abs.max()  # doctest: +SKIP
        """
        import pandas as pd  # deferred: pandas, only for to_frame

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
                if name in s:
                    columns[name] = s[name][rows, positions].numpy()
            if hook == LOGITS:
                columns["kl"] = self.kl_per_position[rows, positions].numpy()
            parts.append(pd.DataFrame(columns))
        frame = pd.concat(parts, ignore_index=True)
        return frame.sort_values(["order", "pos", "batch"], ignore_index=True)

    def __repr__(self) -> str:
        first = self.first_divergence()
        where = "none" if first is None else f"{first.hook} pos {first.pos} (max_abs {first.max_abs:.3g})"
        if first is not None and first.nonfinite:
            where = f"{first.hook} pos {first.pos} ({first.nonfinite})"
        skipped = ""
        if self.skipped:
            names = ", ".join(list(self.skipped)[:2]) + (", ..." if len(self.skipped) > 2 else "")
            skipped = f", {len(self.skipped)} hooks skipped ({names}; see .skipped)"
        return (
            f"DivergenceReport({len(self.hooks)} hooks, logits_max_abs={self.logits_max_abs:.3g}, "
            f"kl={self.kl:.3g}, first divergence at default tolerance: {where}{skipped})"
            + (f"\ncause: {self.cause}" if self.cause else "")
        )

    def family_summary(
        self, atol: Optional[float] = None, rtol: Optional[float] = None
    ) -> List[Tuple[str, int, float, int, Optional[int]]]:
        """Per hook family in forward order: ``(family, hooks, max_abs, diverging sites, first position)``.

        ``diverging sites`` counts sites failing ``(atol, rtol)``; ``first
        position`` is the lowest diverging position (None when none diverges).
        """
        rows: Dict[str, list] = {}
        for hook in self.hooks:
            _, family = split_hook_name(hook)
            row = rows.setdefault(family, [family, 0, float("-inf"), 0, None])
            bad = self.diverged(hook, atol=atol, rtol=rtol)
            row[1] += 1
            row[2] = max(row[2], nanmax(self.stats[hook]["max_abs"]))
            row[3] += int(bad.sum())
            if bool(bad.any()):
                first = int(bad.nonzero()[:, 1].min())
                row[4] = first if row[4] is None else min(row[4], first)
        return [tuple(r) for r in rows.values()]

    def _repr_html_(self) -> str:
        first = self.first_divergence()
        where = "none" if first is None else f"{first.hook} at pos {first.pos}, row {first.batch}"
        if first is not None and first.nonfinite:
            where += f" ({first.nonfinite})"
        batch, positions = self.stats[LOGITS]["max_abs"].shape
        fields = [
            ("hooks compared", len(self.hooks)),
            ("batch x positions", f"{batch} x {positions}"),
            ("logits max |a-b|", self.logits_max_abs),
            ("KL (worst position)", self.kl),
            ("first divergence (atol {:g}, rtol {:g})".format(*self.tolerance()), where),
        ]
        if self.cause:
            fields.append(("cause", self.cause))
        header = ["hook family", "hooks", "max |a-b|", "diverging sites", "first diverging pos"]
        return html_summary("DivergenceReport", fields, (header, self.family_summary()))
