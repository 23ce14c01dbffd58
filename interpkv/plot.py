"""Plots of divergence reports (plotly, imported only when a function runs).

Every function consumes a report object and returns a
``plotly.graph_objects.Figure``; nothing here runs a model. Figures embed
their numbers (hover text, ``customdata``) so a saved HTML file
(``fig.write_html(path, include_plotlyjs=True)``, self-contained and
offline) is a complete record.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch

from interpkv.diagnostics.record import split_hook_name
from interpkv.diagnostics.report import DivergenceReport
from interpkv.generation.result import GenerationDiff
from interpkv.tolerances import DEFAULT_ATOL, DEFAULT_RTOL

__all__ = ["divergence_heatmap", "first_divergence", "generation", "heatmap_cells"]

_LOG_FLOOR = -20.0  # log10 shown for an exact zero (float64 round-off is ~1e-16)
_TOL_LINE = {"line_color": "gray", "line_dash": "dot"}


def log_series(values: List[float]) -> dict:
    """How an error series is drawn on a log axis without hiding any entry.

    A log axis cannot show 0 or inf, so: exact zeros are drawn at a floor a
    decade below the smallest positive value (text ``"0"``), infinite errors
    at a cap a decade above the largest finite one (text ``"inf"``); NaN
    (no such site) stays a gap. A series with no positive finite value at all
    is drawn on a linear axis (``log`` False) instead of an empty log panel.

    Returns:
        ``{"y": [...], "text": [...], "log": bool}``.
    """
    finite = [v for v in values if v == v and 0 < v < float("inf")]
    if not finite and not any(v == float("inf") for v in values):
        return {"y": list(values), "text": ["0" if v == 0 else "" for v in values], "log": False}
    floor = min(finite) / 10 if finite else 1e-20
    cap = max(finite) * 10 if finite else 1.0
    y, text = [], []
    for v in values:
        label = "inf" if v == float("inf") else "0" if v == 0 else ""
        y.append(cap if label == "inf" else floor if label == "0" else v)
        text.append(label)
    return {"y": y, "text": text, "log": True}


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


def divergence_heatmap(report: DivergenceReport):
    """Layer x position heatmap of ``max_abs`` (log10), one hook family at a time.

    A dropdown selects the family (``attn.hook_attn_scores``,
    ``hook_resid_post``...); the figure opens on the family of the first
    divergence (the residual stream when there is none); hovering a cell shows its layer, position,
    ``max_abs``, ``rel`` and ``cos``.

    Args:
        report: a :class:`~interpkv.diagnostics.diff.DivergenceReport`.

    Returns:
        A ``plotly.graph_objects.Figure`` with one heatmap trace per family
        (trace ``name`` = family, ``customdata[..., 0:3]`` = max_abs, rel, cos).
    """
    import numpy as np
    import plotly.graph_objects as go

    cells = heatmap_cells(report)
    shown = _initial_family(report, list(cells))
    fig = go.Figure()
    for family, cell in cells.items():
        max_abs = cell["max_abs"]
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(max_abs > 0, np.log10(max_abs), _LOG_FLOOR)
        z = np.where(np.isnan(max_abs), np.nan, np.where(np.isinf(max_abs), 300.0, z))
        labels = ["-" if layer is None else f"L{layer}" for layer in cell["layers"]]
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
                colorbar={"title": "log10 max |a-b|"},
                hovertemplate=(
                    f"{family}<br>layer %{{y}} pos %{{x}}<br>max_abs %{{customdata[0]:.3g}}"
                    "<br>rel %{customdata[1]:.3g}<br>cos %{customdata[2]:.6f}<extra></extra>"
                ),
            )
        )
    families = list(cells)
    buttons = [
        {
            "label": family,
            "method": "update",
            "args": [{"visible": [f == family for f in families]}, {"title": f"max |a-b|: {family}"}],
        }
        for family in families
    ]
    fig.update_layout(
        title=f"max |a-b|: {shown}" if families else "max |a-b|",
        xaxis_title="absolute position",
        yaxis_title="layer",
        # ``active`` is the button shown as selected: the family actually drawn.
        updatemenus=[
            {
                "buttons": buttons,
                "active": families.index(shown) if shown in families else 0,
                "x": 1.0,
                "y": 1.15,
                "xanchor": "right",
            }
        ],
    )
    return fig


def first_divergence(
    report: DivergenceReport, *, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL
):
    """Largest error of each hook in forward order, the first divergent hook marked.

    Horizontal bars, one per hook (names read without rotation), the first hook
    at the top. Infinite errors (an entry present or finite in one run only)
    are drawn at a cap and labelled ``inf``; exact zeros at a floor labelled
    ``0``; a report with no error at all is drawn on a linear axis. A dotted
    line marks ``atol`` (a site diverges above ``atol + rtol * |reference|``).

    Args:
        report: a :class:`~interpkv.diagnostics.diff.DivergenceReport`.
        atol, rtol: tolerance deciding which hooks diverge.

    Returns:
        A ``plotly.graph_objects.Figure``: one bar (``y`` = hook names in
        forward order, ``customdata`` = ``report.hook_max_abs()`` values, ``x``
        = those values as drawn), red for the first divergent hook, orange for
        later divergent ones.
    """
    import plotly.graph_objects as go

    per_hook = report.hook_max_abs()
    hooks = list(per_hook)
    values = [per_hook[h] for h in hooks]
    site = report.first_divergence(atol=atol, rtol=rtol)
    colors = []
    for hook in hooks:
        if site is not None and hook == site.hook:
            colors.append("crimson")
        elif bool(report.diverged(hook, atol=atol, rtol=rtol).any()):
            colors.append("orange")
        else:
            colors.append("steelblue")
    drawn = log_series(values)
    fig = go.Figure(
        go.Bar(
            y=hooks,
            x=drawn["y"],
            orientation="h",
            customdata=values,
            text=drawn["text"],
            textposition="outside",
            marker_color=colors,
            hovertemplate="%{y}<br>max |a-b| %{customdata:.3g}<extra></extra>",
            name="max |a-b|",
        )
    )
    # Shapes take data coordinates on a log axis, annotations take log10 of them.
    fig.add_vline(x=atol, **_TOL_LINE)
    fig.add_annotation(
        x=math.log10(atol) if drawn["log"] else atol, xref="x", y=1, yref="y domain", yanchor="bottom",
        text=f"atol {atol:g}", showarrow=False, font={"color": "gray", "size": 10},
    )
    if site is None:
        title = "no divergence"
    else:
        title = (
            f"first divergence: {site.hook} @ pos {site.pos}<br><sup>row {site.batch}, "
            f"max_abs {site.max_abs:.3g}, rel {site.rel:.3g}; atol={atol:g}, rtol={rtol:g}</sup>"
        )
    fig.update_layout(
        title=title,
        xaxis_type="log" if drawn["log"] else "linear",
        xaxis_title="max |a-b| over positions",
        yaxis={"autorange": "reversed", "automargin": True, "tickfont": {"size": 10}},
        height=160 + 15 * len(hooks),
        margin={"t": 80},
    )
    return fig


def generation(gen_diff: GenerationDiff):
    """Per-step logit error, KL and top-1 agreement of two generations.

    Args:
        gen_diff: a :class:`~interpkv.generation.result.GenerationDiff`.

    Returns:
        A ``plotly.graph_objects.Figure`` with three stacked panels (traces
        ``logits_max_abs``, ``kl``, ``top1_agree``; ``x`` = step) and a
        vertical line at ``first_divergent_step`` when there is one.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    steps = list(range(gen_diff.n_steps))
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        subplot_titles=("max |logit a - logit b|", "KL(b || a)", "top-1 token agrees"),
    )
    drawn = log_series(gen_diff.logits_max_abs)
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=drawn["y"],
            customdata=gen_diff.logits_max_abs,
            text=[s if s == "inf" else "" for s in drawn["text"]],
            mode="lines+markers+text" if "inf" in drawn["text"] else "lines+markers",
            textposition="top center",
            hovertemplate="step %{x}<br>max |a-b| %{customdata:.3g}<extra></extra>",
            name="logits_max_abs",
        ),
        1,
        1,
    )
    fig.add_hline(y=gen_diff.atol, row=1, col=1, **_TOL_LINE)
    fig.add_annotation(
        x=1, xref="x domain", y=math.log10(gen_diff.atol) if drawn["log"] else gen_diff.atol, yref="y",
        xanchor="right", yanchor="bottom", text=f"atol {gen_diff.atol:g}", showarrow=False,
        font={"color": "gray", "size": 10},
    )
    if not drawn["log"] and gen_diff.n_steps and all(v == 0 for v in gen_diff.logits_max_abs):
        fig.add_annotation(
            x=0.5, xref="x domain", y=0.5, yref="y domain", text="every step exactly 0", showarrow=False
        )
    fig.add_trace(go.Scatter(x=steps, y=gen_diff.kl, name="kl"), 2, 1)
    fig.add_trace(
        go.Scatter(x=steps, y=[int(a) for a in gen_diff.top1_agree], name="top1_agree", mode="markers"),
        3,
        1,
    )
    fig.update_yaxes(type="log" if drawn["log"] else "linear", row=1, col=1)
    fig.update_yaxes(range=[-0.1, 1.1], tickvals=[0, 1], ticktext=["no", "yes"], row=3, col=1)
    if gen_diff.first_divergent_step is not None:
        for row in (1, 2, 3):
            fig.add_vline(x=gen_diff.first_divergent_step, line_color="crimson", line_dash="dash", row=row, col=1)
    fig.update_layout(
        title=(
            "no divergent step"
            if gen_diff.first_divergent_step is None
            else f"first divergent step: {gen_diff.first_divergent_step}"
        ),
        xaxis3_title="generated step",
        showlegend=False,
    )
    return fig
