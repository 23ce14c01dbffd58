"""Self-contained HTML reports of checks, fault localizations and generations.

The page embeds plotly.js once, inline, so it opens with no network (no CDN
script tag, no MathJax). Each figure sits in ``<div class="figure"
data-figure="<name>">``; plotly draws one ``svg.main-svg`` set inside each,
which is what ``tests/integration/test_report_browser.py`` counts in headless
Chromium. Like :mod:`interpkv.plot`, nothing here runs a model: the report
consumes results that :mod:`interpkv.verify.checks` computed.

>>> from interpkv.cli import html                               # doctest: +SKIP
>>> from interpkv.verify import checks                          # doctest: +SKIP
>>> html.write("report.html", checks=checks.check_zoo(["gpt2"]))   # doctest: +SKIP
"""

import datetime
import html
import os
from typing import List, Optional, Sequence, Tuple

__all__ = ["render", "write"]


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td.num { font-family: monospace; text-align: right; }
td.site, pre { font-family: monospace; }
.pass { color: #137333; font-weight: bold; }
.fail { color: #c5221f; font-weight: bold; }
pre { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; }
.figure { margin: 1em 0 2em 0; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Tuple[str, str]]]) -> str:
    """Rows of ``(css class, text)`` cells; the text is escaped here."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{cls}">{_esc(text)}</td>' for cls, text in row) + "</tr>"
        for row in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _verdict(ok: bool, yes: str = "PASS", no: str = "FAIL") -> Tuple[str, str]:
    return ("pass", yes) if ok else ("fail", no)


def _num(x: Optional[float]) -> Tuple[str, str]:
    return ("num", "-" if x is None else f"{x:.2e}")


class _Figures:
    """Turns plotly figures into divs with unique ids (plotly.js not included)."""

    def __init__(self):
        self.count = 0

    def __call__(self, fig, name: str) -> str:
        self.count += 1
        inner = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            include_mathjax=False,
            div_id=f"figure-{self.count}",
            config={"displaylogo": False},
        )
        return f'<div class="figure" data-figure="{_esc(name)}">{inner}</div>'


def versions() -> List[Tuple[str, str]]:
    """``(package, version)`` of everything that decides the report's numbers."""
    from importlib import metadata

    import interpkv

    found = [("interpkv", interpkv.__version__)]
    for package in ("torch", "transformer-lens", "transformers", "plotly"):
        try:
            found.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            found.append((package, "not installed"))
    return found


def _provenance(command: Optional[str], dtypes: Sequence[str], with_faults: bool) -> str:
    """Versions, command, dtype and the tolerances every verdict below used."""
    import torch

    from interpkv.verify.checks import CACHED_TOL, COMPARE_TOL, HF_TOL

    items = [("command", command or "-"), ("dtype", ", ".join(dtypes) or "-")]
    items += [(name, version) for name, version in versions()]
    rows = [[("", k), ("site", v)] for k, v in items]
    tol_rows = []
    for name in dtypes:
        dtype = getattr(torch, name, None)
        if dtype in CACHED_TOL:
            tol_rows.append(
                [("", name), _num(CACHED_TOL[dtype]), _num(HF_TOL[dtype]), _num(COMPARE_TOL[dtype])]
            )
    if with_faults:
        tol_rows.append([("", "float64 (bug zoo)"), ("num", "-"), ("num", "-"), _num(COMPARE_TOL[torch.float64])])
    tolerances = _table(
        ["dtype", "cached vs uncached logits", "vs HF logits", "per-site atol = rtol"], tol_rows
    )
    return "<h2>Run</h2>" + _table(["", ""], rows) + "<p>Tolerances (a value above fails):</p>" + tolerances


def _collapsed(passing: Sequence) -> str:
    """One line for the models whose heatmaps would all be near-identical green."""
    worst = max(c.max_dlogit for c in passing)
    names = ", ".join(c.model for c in passing)
    return (
        f'<p class="collapsed"><span class="pass">{len(passing)} passing</span> (no heatmap: every '
        f"site within tolerance, largest cached-vs-uncached logit difference {worst:.1e}): "
        f"{_esc(names)}</p>"
    )


def render(
    *,
    checks: Sequence = (),
    faults: Sequence = (),
    generation=None,
    other=None,
    title: str = "interpkv report",
    command: Optional[str] = None,
    dtype: Optional[str] = None,
) -> str:
    """The report as one HTML string (plotly.js inline, once).

    Args:
        checks: :class:`~interpkv.verify.checks.CheckResult` objects; each failing
            one with a ``report`` gets a divergence heatmap, the passing ones
            share one summary line.
        faults: :class:`~interpkv.verify.checks.FaultResult` objects; each gets a
            first-divergence bar chart.
        generation: an optional :class:`~interpkv.verify.checks.GenerationResult`.
        other: an optional :class:`~interpkv.verify.engine_checks.OtherImplementations`
            (other engines' caches, engine faults, TransformerLens findings).
        title: page title.
        command: the command line that produced the report (stated at the top).
        dtype: the checks' dtype name (default: taken from ``checks``).

    Returns:
        The HTML document.
    """
    from plotly.offline import get_plotlyjs

    from interpkv import plot

    figure = _Figures()
    parts: List[str] = [f"<h1>{_esc(title)}</h1>"]
    verdicts = [c.ok for c in checks] + [f.caught for f in faults]
    if generation is not None:
        verdicts.append(generation.identical)
    if other is not None:
        verdicts.append(other.ok)
    ok = all(verdicts)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts.append(
        f'<p>Verdict: <span class="{"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</span> '
        f"({sum(verdicts)}/{len(verdicts)} checks passed; generated {stamp}).</p>"
    )
    dtypes = [dtype] if dtype else sorted({str(c.dtype).replace("torch.", "") for c in checks})
    parts.append(_provenance(command, dtypes, bool(faults)))

    if checks:
        parts.append("<h2>Cached vs uncached vs HuggingFace</h2>")
        parts.append(
            "<p>Each model runs a left-padded ragged batch through a KV cache in chunks "
            "(prefill, single tokens, a chunk) and uncached. <i>max |dlogit|</i> compares the "
            "logits, <i>vs HF</i> compares the cached run with the HuggingFace twin under the same "
            "mask, <i>first divergence</i> is the earliest hook point (at its lowest position) "
            "where the cached activations leave tolerance.</p>"
        )
        rows = [
            [
                ("", c.model),
                ("", c.scheme),
                ("", str(c.dtype).replace("torch.", "")),
                _num(c.max_dlogit),
                ("num", _num(c.max_dlogit_hf)[1] + (f" ({c.hf_note})" if c.hf_note else "")),
                ("site", c.first_divergence_label),
                _verdict(c.ok),
            ]
            for c in checks
        ]
        parts.append(
            _table(
                ["model", "scheme", "dtype", "max |dlogit|", "max |dlogit| vs HF", "first divergence", "verdict"],
                rows,
            )
        )
        passing = [c for c in checks if c.ok]
        failing = [c for c in checks if not c.ok and c.report is not None]
        parts.append("<h3>Divergence heatmaps</h3>")
        if passing:
            parts.append(_collapsed(passing))
        if failing:
            parts.append(
                "<p>Failing models: log10 of the largest |cached - uncached| per layer and position; "
                "the dropdown selects the hook family. Values near -20 mean exactly equal.</p>"
            )
        for c in failing:
            parts.append(f"<h4>{_esc(c.model)}</h4>")
            parts.append(figure(plot.divergence_heatmap(c.report), f"heatmap:{c.model}"))

    if faults:
        parts.append("<h2>Bug zoo: known cache bugs, injected and localized</h2>")
        rows = [
            [
                ("", f.fault),
                ("", f.model),
                ("site", f.expected_label),
                ("site", f.found_label),
                _verdict(f.caught, "yes", "no"),
            ]
            for f in faults
        ]
        parts.append(_table(["fault", "model", "expected site", "first divergence", "caught"], rows))
        for f in faults:
            if f.report is not None:
                parts.append(f"<h4>{_esc(f.fault)} on {_esc(f.model)}</h4>")
                parts.append(figure(plot.first_divergence(f.report, atol=1e-10, rtol=1e-10), f"fault:{f.fault}:{f.model}"))

    if other is not None:
        parts.extend(_other_section(other, figure))

    if generation is not None:
        g = generation
        parts.append(f"<h2>Greedy generation with the cache on and off ({_esc(g.model)})</h2>")
        parts.append(f"<p>Prompt:</p><pre>{_esc(g.prompt)}</pre>")
        parts.append(f"<p>Cache on:</p><pre>{_esc(g.cached)}</pre>")
        parts.append(f"<p>Cache off:</p><pre>{_esc(g.uncached)}</pre>")
        parts.append(
            f'<p>Identical: <span class="{"pass" if g.identical else "fail"}">'
            f'{"yes" if g.identical else "no"}</span></p>'
        )
        parts.append(figure(plot.generation(g.diff), f"generation:{g.model}"))

    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{_esc(title)}</title><style>{_STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script>'
        "</head><body>" + "\n".join(parts) + "</body></html>\n"
    )


def _other_section(other, figure) -> List[str]:
    """The "other implementations" section: engine checks, engine faults, TransformerLens findings."""
    from interpkv import plot

    parts = ["<h2>Other implementations: TransformerLens's and HuggingFace's own caches</h2>"]
    parts.append(
        "<p>The same ragged, left-padded batch fed chunk by chunk through TransformerLens's "
        "<code>past_kv_cache</code> and through each HF model's own <code>DynamicCache</code>, against the same "
        "engine run uncached; HF sites carry TransformerLens names.</p>"
    )
    rows = [
        [("", c.model), ("", c.scheme), _num(c.max_dlogit), _num(c.max_dlogit_hf), ("site", c.first_divergence_label),
         _verdict(c.ok or c.model in other.known_mismatch, "PASS" if c.ok else "known", "FAIL")]
        for c in other.checks
    ]
    parts.append(_table(["model [engine]", "implementation", "max |dlogit|", "vs HF", "first divergence", "verdict"], rows))
    rows = [[("", f.fault), ("", f.model), ("site", f.expected_label), ("site", f.found_label), _verdict(f.caught, "yes", "no")]
            for f in other.faults]
    parts.append("<h3>A stored key corrupted in each engine's cache update</h3>")
    parts.append(_table(["fault", "model", "expected site", "first divergence", "caught"], rows))
    parts.append("<h3>TransformerLens 3.x findings, verified against HF with teacher forcing</h3>")
    for f in other.findings:
        parts.append(f"<h4>{_esc(f.title)} ({_esc(f.model)}): {_esc(f.site_label)}</h4><p>{_esc(f.claim)}</p>")
        verdict = _verdict(f.explained, "yes" if f.verified else f.status, f.status)
        rows = [[("", k), _num(v)] for k, v in f.evidence.items()] + [[("", "verified"), verdict]]
        parts.append(_table(["check", "value"], rows))
        parts.append(figure(plot.first_divergence(f.report, atol=f.atol, rtol=f.atol), f"finding:{f.title}"))
    return parts


def write(path: str, **kwargs) -> str:
    """Write :func:`render`'s page to ``path`` (parent directories created).

    Returns:
        The path written.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(**kwargs))
    return path
