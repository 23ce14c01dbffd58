"""Plots of divergence reports (plotly, imported only when a function runs).

Every function consumes a report object and returns a
``plotly.graph_objects.Figure``; nothing here runs a model. Figures embed
their numbers (hover text, ``customdata``) so a saved HTML file
(``fig.write_html(path, include_plotlyjs=True)``, self-contained and
offline) is a complete record.

How they read: axis titles in words; plain scientific notation (``1e-10``,
never plotly's SI prefixes ``100p`` or ``1μ``); an exact zero is drawn as no
length on a log axis whose end is labelled "exact 0" (a heatmap's colour bar
says the same), never at a made-up small value; the tolerance is a labelled
dotted line; a legend says what the colours mean; the runs are named
(``runs=("cached", "uncached")`` by default, e.g. ``("TransformerLens cached",
"HF")`` for another engine's reference).
"""

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from interpkv.diagnostics.record import split_hook_name
from interpkv.diagnostics.report import DivergenceReport
from interpkv.generation.result import GenerationDiff

__all__ = ["divergence_heatmap", "first_divergence", "generation", "position_error", "heatmap_cells", "RUNS"]

_LOG_FLOOR = -20.0  # log10 drawn for an exact zero in the heatmaps, labelled "exact 0" on the colour bar
_TOL_LINE = {"line_color": "gray", "line_dash": "dot"}
RUNS = ("cached", "uncached")
"""Default names of a report's run ``a`` and reference ``b``: what :func:`interpkv.compare` compares."""

_ZERO_GAP = 2  # decades between the smallest drawn value and the "exact 0" mark


def log_series(values: List[float], *, below: Optional[float] = None) -> dict:
    """How an error series is drawn on a log axis without hiding any entry.

    A log axis cannot show 0 or inf, so exact zeros are drawn at a floor two
    decades below the smallest positive value (and below ``below``, the
    tolerance, so a zero never sits above its line), where the axis ends and
    says "exact 0" (:func:`log_ticks`): a bar of an exact zero has no length.
    Infinite errors are drawn at a cap a decade above the largest finite one
    (text ``"inf"``); NaN (no such site) stays a gap. A series with no positive
    finite value at all is drawn on a linear axis (``log`` False) instead of
    an empty log panel.

    Returns:
        ``{"y": [...], "text": [...], "log": bool, "floor": float or None}``.
    """
    finite = [v for v in values if v == v and 0 < v < float("inf")]
    if not finite and not any(v == float("inf") for v in values):
        return {"y": list(values), "text": ["exact 0" if v == 0 else "" for v in values], "log": False, "floor": None}
    lowest = min(finite + ([below] if below else [])) if finite or below else 1e-18
    floor = 10.0 ** (math.floor(math.log10(lowest)) - _ZERO_GAP)
    cap = max(finite) * 10 if finite else 1.0
    y, text = [], []
    for v in values:
        label = "inf" if v == float("inf") else "exact 0" if v == 0 else ""
        y.append(cap if label == "inf" else floor if label == "exact 0" else v)
        text.append(label)
    return {"y": y, "text": text, "log": True, "floor": floor}


def log_ticks(low: float, high: float, *, zero: Optional[float] = None, most: int = 8) -> dict:
    """Tick values and plain labels (``1e-10``) for a log axis from ``low`` to ``high``.

    Decades only, every second or third when there are many; ``zero`` (the
    floor of :func:`log_series`, below ``low``) is where the axis starts and is
    labelled "exact 0". Returns plotly axis
    settings: ``type``, ``range`` (log10), ``tickvals``, ``ticktext``.

    >>> log_ticks(1e-10, 5.0, zero=1e-12)["ticktext"]
    ['exact 0', '1e-9', '1e-7', '1e-5', '1e-3', '1e-1', '1e1']
    """
    lo = math.floor(math.log10(low))
    hi = math.ceil(math.log10(high))
    step = max(1, math.ceil((hi - lo + 1) / most))
    decades = list(range(hi, lo - 1, -step))[::-1]  # anchored at the top decade
    vals = [10.0**k for k in decades]
    text = ["1" if k == 0 else f"1e{k}" for k in decades]
    if zero is not None:
        vals.insert(0, zero)
        text.insert(0, "exact 0")
    return {
        "type": "log",
        # An exact zero sits on the axis's edge: a bar of it has no length.
        "range": [math.log10(zero) if zero is not None else lo - 0.05, math.log10(high) + 0.15],
        "tickvals": vals,
        "ticktext": text,
    }


def _log_axis(drawn: dict, tol: Optional[float]) -> dict:
    """Axis settings for a :func:`log_series` (plain ticks, "exact 0" at its floor)."""
    finite = [v for v, t in zip(drawn["y"], drawn["text"]) if v == v and v > 0 and t != "exact 0"]
    if not drawn["log"]:
        return {"type": "linear", "exponentformat": "e", "rangemode": "tozero"}
    low = min(finite + ([tol] if tol else []))
    high = max(finite + ([tol] if tol else []))
    zero = drawn["floor"] if "exact 0" in drawn["text"] else None
    return log_ticks(low, high, zero=zero)


def heatmap_cells(report: DivergenceReport) -> Dict[str, dict]:
    """The numbers :func:`divergence_heatmap` draws, per hook family.

    For each family (hook name without ``blocks.L.``), ``layers`` (row
    labels: layer indices, or ``[None]`` outside the blocks) and
    ``max_abs``, ``rel``, ``cos``: float64 ``[n_layers, pos]`` arrays taken
    from the worst batch row of each site (NaN where no site exists).
    """
    families: Dict[str, List[Tuple[Optional[int], str]]] = {}
    for hook in report.hooks:
        layer, family = split_hook_name(hook)
        families.setdefault(family, []).append((layer, hook))
    cells = {}
    for family, members in families.items():
        grids: Dict[str, list] = {"max_abs": [], "rel": [], "cos": []}
        for _, hook in members:
            s = report.stats[hook]
            err = torch.nan_to_num(s["max_abs"], nan=-1.0)  # (B, P)
            worst = err.argmax(dim=0, keepdim=True)  # (1, P): worst row per position
            for name in grids:
                grids[name].append(s[name].gather(0, worst)[0])
        cells[family] = {
            "layers": [layer for layer, _ in members],
            "hooks": [hook for _, hook in members],
            **{name: torch.stack(rows).numpy() for name, rows in grids.items()},
        }
    return cells


def _initial_family(report: DivergenceReport, families: list) -> "str | None":
    """The family shown first: where the report first diverges, else the residual stream."""
    site = report.first_divergence()
    if site is not None:
        family = split_hook_name(site.hook)[1]
        if family in families:
            return family
    for preferred in ("hook_resid_post", "logits"):
        if preferred in families:
            return preferred
    return families[0] if families else None


def _runs_label(runs: Tuple[str, str]) -> str:
    return f"|{runs[0]} - {runs[1]}|"


def divergence_heatmap(
    report: DivergenceReport, *, atol: Optional[float] = None, runs: Tuple[str, str] = RUNS, family: Optional[str] = None
):
    """Layer x position heatmap of ``max_abs`` (log10), one hook family at a time.

    A dropdown selects the family (``attn.hook_attn_scores``,
    ``hook_resid_post``...); the figure opens on the family of the first
    divergence (the residual stream when there is none); hovering a cell shows its layer, position,
    ``max_abs``, ``rel`` and ``cos``. The colour bar reads in plain scientific
    notation; its bottom (log10 = -20) is labelled "exact 0": the two runs
    agree to the bit there.

    Args:
        report: a :class:`~interpkv.diagnostics.diff.DivergenceReport`.
        atol: the tolerance the report was judged at, marked on the colour bar.
        runs: names of the report's run ``a`` and reference ``b`` (default cached, uncached).
        family: the family shown first (default: that of the first divergence), e.g.
            ``"logits"`` when the logits are what failed.

    Returns:
        A ``plotly.graph_objects.Figure`` with one heatmap trace per family
        (trace ``name`` = family, ``customdata[..., 0:3]`` = max_abs, rel, cos).
    """
    import plotly.graph_objects as go  # deferred: plotly (importing interpkv never imports it)

    cells = heatmap_cells(report)
    shown = family if family in cells else _initial_family(report, list(cells))
    diff = _runs_label(runs)
    tickvals = [_LOG_FLOOR, -15, -10, -5, 0]
    ticktext = ["exact 0", "1e-15", "1e-10", "1e-5", "1"]
    if atol is not None and atol > 0:
        near = min(range(1, len(tickvals)), key=lambda i: abs(tickvals[i] - math.log10(atol)))
        tickvals[near], ticktext[near] = math.log10(atol), f"atol {atol:g}"
    fig = go.Figure()
    n_rows = 1
    for family, cell in cells.items():
        max_abs = cell["max_abs"]
        n_rows = max(n_rows, max_abs.shape[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(max_abs > 0, np.log10(max_abs), _LOG_FLOOR)
        z = np.where(np.isnan(max_abs), np.nan, np.where(np.isinf(max_abs), 300.0, z))
        labels = ["-" if layer is None else f"layer {layer}" for layer in cell["layers"]]
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(range(max_abs.shape[1])),
                y=labels,
                customdata=np.stack([max_abs, cell["rel"], cell["cos"]], axis=-1),
                name=family,
                visible=family == shown,
                colorscale="Viridis",
                zmin=_LOG_FLOOR,
                zmax=2.0,
                colorbar={"title": {"text": f"largest<br>{diff}<br>(log scale)"}, "tickvals": tickvals,
                          "ticktext": ticktext},
                hovertemplate=(
                    f"{family}<br>%{{y}}, position %{{x}}<br>max {diff} %{{customdata[0]:.3g}}"
                    "<br>relative %{customdata[1]:.3g}<br>cosine %{customdata[2]:.6f}<extra></extra>"
                ),
            )
        )
    families = list(cells)

    def title(family: str) -> str:
        return f"largest {diff} per layer and position: {family}"

    buttons = [
        {"label": family, "method": "update", "args": [{"visible": [f == family for f in families]}, {"title": title(family)}]}
        for family in families
    ]
    fig.update_layout(
        title=title(shown) if families and shown is not None else f"largest {diff}",
        xaxis_title="absolute position of the token (query position for attention hooks)",
        yaxis={"title": "layer", "type": "category"},
        xaxis={"dtick": 1 if max((c["max_abs"].shape[1] for c in cells.values()), default=0) <= 32 else None},
        height=300 + 50 * n_rows,
        # ``active`` is the button shown as selected: the family actually drawn.
        updatemenus=[
            {
                "buttons": buttons,
                "active": families.index(shown) if shown in families else 0,
                "x": 1.0,
                "y": 1.02,
                "xanchor": "right",
                "yanchor": "bottom",
            }
        ],
        margin={"t": 110},
    )
    fig.update_xaxes(exponentformat="e")
    return fig


def first_divergence(
    report: DivergenceReport,
    *,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    runs: Tuple[str, str] = RUNS,
):
    """Largest error of each hook in forward order, the first divergent hook marked.

    Horizontal bars, one per hook (names read without rotation), the first hook
    at the top. Infinite errors (an entry present or finite in one run only)
    are drawn at a cap and labelled ``inf``; exact zeros have no length and are
    labelled "exact 0", where the axis says "exact 0"; a report with no error
    at all is drawn on a linear axis. A dotted line marks ``atol`` (a site
    diverges above ``atol + rtol * |reference|``); the legend names the colours.

    Args:
        report: a :class:`~interpkv.diagnostics.diff.DivergenceReport`.
        atol, rtol: tolerance deciding which hooks diverge (default: the
            report's dtype's, ``report.tolerance()``).
        runs: names of the report's run ``a`` and reference ``b`` (default cached, uncached).

    Returns:
        A ``plotly.graph_objects.Figure``: one bar (``y`` = hook names in
        forward order, ``customdata`` = ``report.hook_max_abs()`` values, ``x``
        = those values as drawn), red for the first divergent hook, orange for
        later divergent ones; legend-only entries after it.
    """
    import plotly.graph_objects as go  # deferred: plotly (importing interpkv never imports it)

    per_hook = report.hook_max_abs()
    hooks = list(per_hook)
    values = [per_hook[h] for h in hooks]
    atol, rtol = report.tolerance(atol, rtol)  # default: the report's dtype's
    site = report.first_divergence(atol=atol, rtol=rtol)
    colors = []
    for hook in hooks:
        if site is not None and hook == site.hook:
            colors.append("crimson")
        elif bool(report.diverged(hook, atol=atol, rtol=rtol).any()):
            colors.append("orange")
        else:
            colors.append("steelblue")
    drawn = log_series(values, below=atol)
    diff = _runs_label(runs)
    fig = go.Figure(
        go.Bar(
            y=hooks,
            x=drawn["y"],
            orientation="h",
            customdata=values,
            text=drawn["text"],
            textposition="outside",
            cliponaxis=False,
            marker_color=colors,
            hovertemplate=f"%{{y}}<br>max {diff} %{{customdata:.3g}}<extra></extra>",
            name=f"max {diff}",
            showlegend=False,
        )
    )
    for color, meaning in (
        ("crimson", "first hook past the tolerance"),
        ("orange", "later hook past the tolerance"),
        ("steelblue", "within the tolerance"),
    ):
        if color in colors:
            fig.add_trace(go.Bar(x=[None], y=[None], orientation="h", marker_color=color, name=meaning, showlegend=True))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"color": "gray", "dash": "dot"},
                             name=f"tolerance: atol {atol:g} (+ rtol {rtol:g} x |{runs[1]}|)"))
    # Shapes take data coordinates on a log axis, annotations take log10 of them.
    fig.add_vline(x=atol, **_TOL_LINE)
    fig.add_annotation(
        x=math.log10(atol) if drawn["log"] else atol, xref="x", y=1, yref="y domain", yanchor="bottom",
        text=f"atol {atol:g}", showarrow=False, font={"color": "gray", "size": 10},
    )
    if site is None:
        title = f"{runs[0]} vs {runs[1]}: no hook past the tolerance"
    else:
        title = (
            f"first divergence: {site.hook} @ position {site.pos}<br><sup>{runs[0]} vs {runs[1]}: row {site.batch}, "
            f"max {diff} {site.max_abs:.3g}, relative {site.rel:.3g}</sup>"
        )
    fig.update_layout(
        title=title,
        xaxis={**_log_axis(drawn, atol), "title": f"largest {diff} over positions and rows"},
        yaxis={"autorange": "reversed", "automargin": True, "tickfont": {"size": 10}, "title": "hook, in forward order",
               "type": "category"},
        height=260 + 16 * len(hooks),
        margin={"t": 90, "b": 130},
        legend={"orientation": "h", "x": 0, "y": 8, "yref": "container", "yanchor": "bottom", "xanchor": "left"},
        barmode="overlay",
    )
    return fig


def generation(gen_diff: GenerationDiff, *, runs: Tuple[str, str] = RUNS):
    """Per-step logit error, KL and top-1 agreement of two generations.

    Args:
        gen_diff: a :class:`~interpkv.generation.result.GenerationDiff`.
        runs: names of its generation ``a`` and reference ``b`` (default cached, uncached).

    Returns:
        A ``plotly.graph_objects.Figure`` with three stacked panels (traces 0, 2
        and 3: ``logits_max_abs`` as drawn with ``customdata`` the values, ``kl``,
        ``top1_agree`` as 0/1; ``x`` = step; trace 1 is the tolerance's legend
        entry) and a vertical line at ``first_divergent_step`` when there is one.
    """
    import plotly.graph_objects as go  # deferred: plotly (importing interpkv never imports it)
    from plotly.subplots import make_subplots  # deferred: plotly

    a, b = runs
    steps = list(range(gen_diff.n_steps))
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.09,
        row_heights=[0.45, 0.35, 0.2],
        subplot_titles=(
            f"largest |logit {a} - logit {b}| over the vocabulary",
            f"KL({b} || {a}) of the next-token distributions",
            "same top-1 token",
        ),
    )
    drawn = log_series(gen_diff.logits_max_abs, below=gen_diff.atol)
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=drawn["y"],
            customdata=gen_diff.logits_max_abs,
            text=[s if s in ("inf", "exact 0") else "" for s in drawn["text"]],
            mode="lines+markers+text" if "inf" in drawn["text"] else "lines+markers",
            textposition="top center",
            cliponaxis=False,
            hovertemplate=f"step %{{x}}<br>max |{a} - {b}| %{{customdata:.3g}}<extra></extra>",
            name=f"largest |logit {a} - logit {b}|",
        ),
        1,
        1,
    )
    fig.add_hline(y=gen_diff.atol, row=1, col=1, **_TOL_LINE)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"color": "gray", "dash": "dot"},
                             name=f"tolerance: atol {gen_diff.atol:g}"), 1, 1)
    fig.add_annotation(
        x=1, xref="x domain", y=math.log10(gen_diff.atol) if drawn["log"] else gen_diff.atol, yref="y",
        xanchor="right", yanchor="bottom", text=f"atol {gen_diff.atol:g}", showarrow=False,
        font={"color": "gray", "size": 10},
    )
    if not drawn["log"] and gen_diff.n_steps and all(v == 0 for v in gen_diff.logits_max_abs):
        fig.add_annotation(
            x=0.5, xref="x domain", y=0.5, yref="y domain", text="every step exactly 0", showarrow=False
        )
    fig.add_trace(go.Scatter(x=steps, y=gen_diff.kl, name="KL", mode="lines+markers"), 2, 1)
    fig.add_trace(
        go.Scatter(x=steps, y=[int(a) for a in gen_diff.top1_agree], name="same top-1 token", mode="markers"),
        3,
        1,
    )
    fig.update_yaxes(**_log_axis(drawn, gen_diff.atol), title_text="|logit difference|", row=1, col=1)
    fig.update_yaxes(title_text="KL (nats)", exponentformat="e", rangemode="tozero", row=2, col=1)
    fig.update_yaxes(range=[-0.2, 1.2], tickvals=[0, 1], ticktext=["no", "yes"], title_text="agrees", row=3, col=1)
    if gen_diff.first_divergent_step is not None:
        for row in (1, 2, 3):
            fig.add_vline(x=gen_diff.first_divergent_step, line_color="crimson", line_dash="dash", row=row, col=1)
    fig.update_layout(
        title=(
            f"{a} vs {b} generation: no divergent step"
            if gen_diff.first_divergent_step is None
            else f"{a} vs {b} generation: first divergent step {gen_diff.first_divergent_step}"
        ),
        xaxis3_title="generated step (0 = first new token)",
        height=720,
        showlegend=True,
        legend={"orientation": "h", "x": 0, "y": 1.06, "yanchor": "bottom"},
        margin={"t": 130},
    )
    fig.update_xaxes(exponentformat="e")
    return fig


def position_error(
    values: List[float], *, atol: float, runs: Tuple[str, str] = ("cached", "HF"), what: str = "logit", title: str = ""
):
    """One number per absolute position against a tolerance, e.g. a check's failing ``vs HF`` logits.

    Args:
        values: the largest ``|a - b|`` at each absolute position (NaN: no token there).
        atol: the tolerance the number was judged at (a labelled dotted line).
        runs: names of run ``a`` and reference ``b``.
        what: the compared quantity, for the axis title.
        title: the figure's title (default: says how many positions exceed ``atol``).

    Returns:
        A ``plotly.graph_objects.Figure``: one bar per position (``customdata`` = ``values``),
        red above ``atol``, the rest steel blue.
    """
    import plotly.graph_objects as go  # deferred: plotly (importing interpkv never imports it)

    drawn = log_series(values, below=atol)
    over = [v == v and v > atol for v in values]
    diff = f"|{what} {runs[0]} - {what} {runs[1]}|"
    fig = go.Figure(
        go.Bar(
            x=list(range(len(values))), y=drawn["y"], customdata=values, text=drawn["text"], textposition="outside",
            cliponaxis=False, marker_color=["crimson" if o else "steelblue" for o in over], showlegend=False,
            hovertemplate=f"position %{{x}}<br>max {diff} %{{customdata:.3g}}<extra></extra>",
        )
    )
    fig.add_trace(go.Bar(x=[None], y=[None], marker_color="crimson", name="past the tolerance"))
    if not all(over):
        fig.add_trace(go.Bar(x=[None], y=[None], marker_color="steelblue", name="within the tolerance"))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"color": "gray", "dash": "dot"},
                             name=f"tolerance {atol:g}"))
    fig.add_hline(y=atol, **_TOL_LINE)
    fig.add_annotation(
        x=1, xref="x domain", y=math.log10(atol) if drawn["log"] else atol, yref="y", xanchor="right",
        yanchor="bottom", text=f"tolerance {atol:g}", showarrow=False, font={"color": "gray", "size": 10},
    )
    fig.update_layout(
        title=title or f"{runs[0]} vs {runs[1]}: {sum(over)} of {len(values)} positions past the tolerance",
        xaxis={"title": "absolute position (token index, padding not counted)", "dtick": 1 if len(values) <= 32 else None,
               "exponentformat": "e"},
        yaxis={**_log_axis(drawn, atol), "title": f"largest {diff}"},
        height=460,
        margin={"t": 80, "b": 120},
        legend={"orientation": "h", "x": 0, "y": 8, "yref": "container", "yanchor": "bottom"},
        barmode="overlay",
    )
    return fig
