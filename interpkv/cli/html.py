"""Self-contained HTML reports of checks, fault localizations and generations.

The page embeds plotly.js once, inline, so it opens with no network (no CDN
script tag, no MathJax), and only when the page has a figure (a one-row
passing ``check`` report is a few kB, not 4.8 MB). Verdicts and counts come
from one :class:`~interpkv.verify.verdicts.Tally`, the same the terminal
prints. Each figure sits in ``<div class="figure"
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
from importlib import metadata
from typing import List, Optional, Sequence, Tuple

import torch

import interpkv
from interpkv import faults as fault_zoo
from interpkv import plot, tolerances
from interpkv.verify.checks import CACHED_TOL, COMPARE_TOL, FAULT_INPUTS, HF_TOL, INPUTS
from interpkv.verify.findings import INPUTS as findings_inputs
from interpkv.verify.verdicts import run_tally

__all__ = ["render", "write", "provenance_section", "render_provenance", "write_provenance"]


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td.num { font-family: monospace; text-align: right; }
td.site, pre { font-family: monospace; }
.pass { color: #137333; font-weight: bold; }
.fail { color: #c5221f; font-weight: bold; }
.known { color: #8a4b00; background: #fff4d6; font-weight: bold; }
td.why { font-size: 0.85em; max-width: 32em; overflow-wrap: anywhere; }
p.inputs { font-size: 0.9em; color: #444; }
pre { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; }
.figure { margin: 1em 0 2em 0; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _cell(cls: str, text: str) -> str:
    """A table cell; a verdict cell also carries ``data-verdict`` (one per row: what tests count)."""
    mark = f' data-verdict="{_esc(text)}"' if cls in ("pass", "fail", "known") else ""
    return f'<td class="{cls}"{mark}>{_esc(text)}</td>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Tuple[str, str]]]) -> str:
    """Rows of ``(css class, text)`` cells; the text is escaped here."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(cls, text) for cls, text in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


_CLASS = {"PASS": "pass", "FAIL": "fail", "KNOWN UPSTREAM": "known"}


def _verdict(verdict) -> Tuple[str, str]:
    """A verdict cell: PASS green, FAIL red, KNOWN UPSTREAM amber (never green)."""
    return (_CLASS[verdict.word], verdict.word)


def _why(verdict) -> Tuple[str, str]:
    return ("why", verdict.note or "-")


def _section_head(title: str, section) -> str:
    counts = "" if section is None else f" <small>({_esc(section.counts)})</small>"
    return f"<h2>{_esc(title)}{counts}</h2>"


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
    found = [("interpkv", interpkv.__version__)]
    for package in ("torch", "transformer-lens", "transformers", "plotly"):
        try:
            found.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            found.append((package, "not installed"))
    return found


def _provenance(command: Optional[str], dtypes: Sequence[str], with_faults: bool) -> str:
    """Versions, command, dtype and the tolerances every verdict below used."""
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
        f'<p class="collapsed"><span class="pass">{len(passing)} PASS</span> (no plot: every '
        f"site within tolerance, largest cached-vs-uncached logit difference {worst:.1e}): "
        f"{_esc(names)}</p>"
    )


def _failed_figures(results, rows, figure, runs_hf: Tuple[str, str]) -> List[str]:
    """For each row that is not PASS, a plot of the quantity that failed.

    Cached vs uncached past its tolerance (or a divergent site): the divergence
    heatmap. The HF comparison past its tolerance: the cached-vs-HF logit
    difference per position.
    """
    parts: List[str] = []
    for c, (label, verdict) in zip(results, rows):
        if verdict.word == "PASS":
            continue
        own = not c.max_dlogit < tolerances.CACHED_LOGITS[c.dtype] or c.first_divergence is not None
        hf_tol = tolerances.HF_LOGITS[c.dtype]
        hf = c.max_dlogit_hf is not None and not c.max_dlogit_hf < hf_tol
        parts.append(f'<h4>{_esc(c.model)}: <span class="{_CLASS[verdict.word]}">{verdict.word}</span></h4>')
        if own and c.report is not None:
            atol = tolerances.site_tolerance(c.dtype)
            family = None if c.first_divergence is not None else "logits"  # the logits are what failed
            parts.append(figure(plot.divergence_heatmap(c.report, atol=atol, family=family), f"heatmap:{c.model}"))
        if hf and c.hf_by_position is not None:
            fig = plot.position_error(c.hf_by_position, atol=hf_tol, runs=runs_hf(c) if callable(runs_hf) else runs_hf)
            parts.append(figure(fig, f"vs-hf:{c.model}"))
    return parts


def _check_rows(results, rows) -> list:
    return [
        [
            ("", c.model),
            ("", c.scheme),
            _num(c.max_dlogit),
            _num(c.max_dlogit_hf),
            ("site", c.first_divergence_label),
            _verdict(verdict),
            _why(verdict),
        ]
        for c, (_, verdict) in zip(results, rows)
    ]


_CHECK_HEADERS = ["model", "scheme", "max |cached - uncached| logit", "max |cached - HF| logit", "first divergence",
                  "verdict", "why"]


def _fault_sentence(name: str) -> str:
    try:
        fault = fault_zoo.get(name)
    except ValueError:
        return ""
    first = (type(fault).__doc__ or "").strip().split("\n")[0].replace("``", "")
    return f"<b>{_esc(name)}</b>: {_esc(first)} Reproduces {_esc(fault.report)}."


def provenance_section(path: str, saved, heading: str = "h2") -> str:
    """What wrote each span of a saved cache: the table ``cache.provenance`` shows in a notebook.

    ``saved``: the file's :class:`~interpkv.cache.provenance.Provenance`, or None for
    a file saved without one. The table sits in ``<div class="provenance">``.
    """
    parts = [f"<{heading}>What wrote {_esc(path)}</{heading}>"]
    if saved is None:
        parts.append("<p>Saved without provenance (by an interpkv before it): what wrote it is unknown.</p>")
        return '<div class="provenance">' + "".join(parts) + "</div>"
    parts.append(
        "<p>For each span of stored slots, the interventions active when it was written: hooks that edited "
        "(with their hook point), SAEs, faults, hooks the model held. <i>none</i>: written by the plain model. "
        f'Weights fingerprint: <code>{_esc(saved.weights or "-")}</code>.</p>'
    )
    rows = [[("num", slots), ("num", positions), ("site", what)] for slots, positions, what in saved.rows()]
    parts.append(_table(list(saved.COLUMNS), rows))
    return '<div class="provenance">' + "".join(parts) + "</div>"


def _saved_section(saved, section) -> List[str]:
    """The ``check --cache`` section: the cache's provenance and its rows (provenance, continuation)."""
    parts = [_section_head(f"Loaded cache: {saved.path} in {saved.model}", section)]
    parts.append(
        f"<p><code>KVCache.load</code> read the file into {_esc(saved.model)} ({saved.batch_size} rows x "
        f"{saved.seq_len} slots). <i>provenance</i> compares what wrote each span with what the model runs "
        "under here (no hooks, SAEs or faults); <i>continuation</i> continues the cache and compares its logits "
        "with one uncached run of the same tokens.</p>"
    )
    rows = [[("", label), _verdict(v), _why(v)] for label, v in section.rows]
    parts.append(_table(["check", "verdict", "why"], rows))
    parts.append(f'<p class="inputs">Continuation: {_esc(saved.inputs)}.</p>')
    parts.append(provenance_section(saved.path, saved.provenance, heading="h3"))
    return parts


def render(
    *,
    checks: Sequence = (),
    faults: Sequence = (),
    generation=None,
    other=None,
    title: str = "interpkv report",
    command: Optional[str] = None,
    dtype: Optional[str] = None,
    tally=None,
    engine: str = "interpkv",
    saved=None,
) -> str:
    """The report as one HTML string (plotly.js inline, once, when there is a figure).

    Args:
        checks: :class:`~interpkv.verify.checks.CheckResult` objects; each row that
            is not PASS gets a plot of the quantity that failed (a divergence
            heatmap, or the cached-vs-HF logits per position), the passing
            ones share one summary line.
        faults: :class:`~interpkv.verify.checks.FaultResult` objects; each gets a
            first-divergence bar chart.
        generation: an optional :class:`~interpkv.verify.checks.GenerationResult`.
        other: an optional :class:`~interpkv.verify.engine_checks.OtherImplementations`
            (other engines' caches, engine faults, TransformerLens findings).
        title: page title.
        command: the command line that produced the report (stated at the top).
        dtype: the checks' dtype name (default: taken from ``checks``).
        tally: the run's :class:`~interpkv.verify.verdicts.Tally` (what the
            terminal printed); default: computed from the results here.
        engine: whose cache ``checks`` audited (``check --engine``).
        saved: a loaded cache's :class:`~interpkv.verify.saved_cache.SavedCacheResult`
            (``check --cache``): its rows and what wrote it.

    Returns:
        The HTML document.
    """
    if tally is None:
        demo = bool(faults) or generation is not None or other is not None
        tally = run_tally(checks=checks, faults=faults, generation=generation, other=other,
                          check_title="zoo check" if demo else "checks", saved=saved)
    sections = {s.title: s for s in tally.sections}
    figure = _Figures()
    parts: List[str] = [f"<h1>{_esc(title)}</h1>"]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = tally.line()
    parts.append(
        f'<p class="verdict">Verdict: <span class="{_CLASS[tally.word]}">{tally.word}</span>'
        f"{_esc(head[len(tally.word):])} (generated {stamp}).</p>"
        f'<p class="breakdown">By section: {_esc(tally.breakdown())}. KNOWN UPSTREAM: another library\'s '
        "documented bug, with its reason and reference beside the row; it does not fail the run.</p>"
    )
    dtypes = [dtype] if dtype else sorted({str(c.dtype).replace("torch.", "") for c in checks})
    parts.append(_provenance(command, dtypes, bool(faults)))

    if checks:
        section = tally.sections[0]
        parts.append(_section_head("Cached vs uncached vs HuggingFace", section))
        parts.append(
            "<p>Each model runs a left-padded ragged batch through a KV cache in chunks "
            "(prefill, single tokens, a chunk) and uncached. The logit columns compare the cached run "
            "with the uncached run and with the HuggingFace twin under the same mask (logits centred "
            "over the vocabulary); <i>first divergence</i> is the earliest hook point (at its lowest "
            "position) where the cached activations leave tolerance.</p>"
        )
        parts.append(f'<p class="inputs">Inputs of every number in this table: {_esc(INPUTS)}; {", ".join(dtypes)}.</p>')
        parts.append(_table(_CHECK_HEADERS, _check_rows(checks, section.rows)))
        passing = [c for c, (_, v) in zip(checks, section.rows) if v.word == "PASS"]
        if passing:
            parts.append(_collapsed(passing))
        runs = ("cached", "HF") if engine == "interpkv" else (f"{engine} cached", "HF")
        parts.extend(_failed_figures(checks, section.rows, figure, runs))

    if saved is not None:
        parts.extend(_saved_section(saved, sections["loaded cache"]))

    if faults:
        section = sections.get("bug zoo")
        parts.append(_section_head("Bug zoo: known cache bugs, injected and localized", section))
        parts.append(
            "<p>Each fault is injected into the cached run only (float64); <code>interpkv.compare</code> "
            "compares it (<i>cached</i>) with the uncached run (<i>uncached</i>) hook by hook, and the row "
            "PASSes when the first divergence is the site the fault documents.</p><ul>"
            + "".join(f"<li>{_fault_sentence(n)}</li>" for n in dict.fromkeys(f.fault for f in faults))
            + "</ul>"
        )
        parts.append(f'<p class="inputs">Inputs of every row: {_esc(FAULT_INPUTS)}.</p>')
        rows = [
            [("", f.fault), ("", f.model), ("site", f.expected_label), ("site", f.found_label), _verdict(v), _why(v)]
            for f, (_, v) in zip(faults, section.rows)
        ]
        parts.append(_table(["fault", "model", "expected site", "first divergence", "verdict", "why"], rows))
        for f in faults:
            if f.report is not None:
                parts.append(f"<h4>{_esc(f.fault)} on {_esc(f.model)}</h4>")
                parts.append(figure(plot.first_divergence(f.report, atol=1e-10, rtol=1e-10), f"fault:{f.fault}:{f.model}"))

    if other is not None:
        parts.extend(_other_section(other, figure, sections))

    if generation is not None:
        g = generation
        section = sections.get("generation")
        parts.append(_section_head(f"Greedy generation with the cache on and off ({g.model})", section))
        parts.append(f"<p>Prompt:</p><pre>{_esc(g.prompt)}</pre>")
        parts.append(f"<p>Cache on (cached):</p><pre>{_esc(g.cached)}</pre>")
        parts.append(f"<p>Cache off (uncached):</p><pre>{_esc(g.uncached)}</pre>")
        verdict = section.rows[0][1]
        parts.append(
            f'<p>Identical: <span class="{_CLASS[verdict.word]}" data-verdict="{verdict.word}">{verdict.word}</span></p>'
        )
        parts.append(figure(plot.generation(g.diff), f"generation:{g.model}"))

    script = ""
    if figure.count:
        from plotly.offline import get_plotlyjs  # deferred: plotly, only when a report draws a figure

        script = f'<script type="text/javascript">{get_plotlyjs()}</script>'
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{_esc(title)}</title><style>{_STYLE}</style>{script}"
        "</head><body>" + "\n".join(parts) + "</body></html>\n"
    )


def _other_section(other, figure, sections) -> List[str]:
    """The "other implementations" section: engine checks, engine faults, TransformerLens findings."""
    parts = ["<h2>Other implementations: TransformerLens's and HuggingFace's own caches</h2>"]
    section = sections.get("other engines' caches")
    if section is not None:
        parts.append(_section_head("Their own caches, cached vs uncached", section).replace("h2>", "h3>"))
        parts.append(
            "<p>The same ragged, left-padded batch fed chunk by chunk through TransformerLens's "
            "<code>past_kv_cache</code> and through each HF model's own <code>DynamicCache</code>, against the same "
            "engine run uncached; HF sites carry TransformerLens names. <i>scheme</i> names the engine's own "
            "implementation.</p>"
        )
        parts.append(f'<p class="inputs">Inputs of every number in this table: {_esc(INPUTS)}; float32.</p>')
        parts.append(_table(_CHECK_HEADERS, _check_rows(other.checks, section.rows)))
        parts.extend(_failed_figures(other.checks, section.rows, figure, lambda c: ("TransformerLens cached", "HF")))
    section = sections.get("engine faults")
    if section is not None:
        rows = [[("", f.fault), ("", f.model), ("site", f.expected_label), ("site", f.found_label), _verdict(v), _why(v)]
                for f, (_, v) in zip(other.faults, section.rows)]
        parts.append(_section_head("A stored key corrupted in each engine's cache update", section).replace("h2>", "h3>"))
        parts.append(f'<p class="inputs">Inputs of every row: {_esc(FAULT_INPUTS)}.</p>')
        parts.append(_table(["fault", "model", "expected site", "first divergence", "verdict", "why"], rows))
    section = sections.get("TransformerLens findings")
    if section is not None:
        parts.append(_section_head("TransformerLens 3.x findings, verified against HF with teacher forcing", section)
                     .replace("h2>", "h3>"))
        parts.append(f'<p class="inputs">Inputs: {_esc(findings_inputs)}.</p>')
        for f, (_, verdict) in zip(other.findings, section.rows):
            parts.append(
                f"<h4>{_esc(f.title)} ({_esc(f.model)}): {_esc(f.site_label)} "
                f'<span class="{_CLASS[verdict.word]}" data-verdict="{verdict.word}">{verdict.word}</span></h4>'
                f"<p>{_esc(f.claim)}</p>"
            )
            rows = [[("", k), _num(v)] for k, v in f.evidence.items()]
            parts.append(_table(["measured (the label names its inputs)", "value"], rows))
            # The claim is printed above: say only where it is documented (or, for a FAIL, why).
            said = f"Documented in {verdict.reference}." if verdict.word == "KNOWN UPSTREAM" else verdict.note
            parts.append(f'<p class="inputs">{_esc(said)}</p>')
            runs = getattr(f, "runs", ("cached", "uncached"))
            parts.append(figure(plot.first_divergence(f.report, atol=f.atol, rtol=f.atol, runs=runs), f"finding:{f.title}"))
    return parts


def render_provenance(path: str, saved, command: Optional[str] = None) -> str:
    """``interpkv provenance PATH --html OUT``: the provenance section alone, on a page of its own."""
    items = [("command", command or "-"), ("file", path)] + versions()
    run = _table(["", ""], [[("", k), ("site", v)] for k, v in items])
    title = f"interpkv provenance: {path}"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_esc(title)}</h1><h2>Run</h2>{run}\n{provenance_section(path, saved)}</body></html>\n"
    )


def write_provenance(out: str, path: str, saved, command: Optional[str] = None) -> str:
    """Write :func:`render_provenance`'s page to ``out`` (parent directories created); returns ``out``."""
    return _write(out, render_provenance(path, saved, command))


def _write(path: str, page: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def write(path: str, **kwargs) -> str:
    """Write :func:`render`'s page to ``path`` (parent directories created).

    Returns:
        The path written.
    """
    return _write(path, render(**kwargs))
