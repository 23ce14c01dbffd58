"""Plots carry the report's numbers and render to self-contained HTML."""

import math
import sys

import numpy as np
import pytest
import torch

import interpkv
from interpkv import faults, plot, zoo
from interpkv.generation.result import GenerationDiff

TOL64 = dict(atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def faulty_report():
    model = zoo.load("llama", dtype=torch.float64)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with faults.inject(model, "stale_position_offset"):
        return interpkv.compare(model, tokens, steps=[8, 1, 7])


def test_importing_interpkv_does_not_import_plotly():
    import subprocess

    code = "import interpkv, sys; print('plotly' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_divergence_heatmap_shows_the_reports_numbers(faulty_report):
    fig = plot.divergence_heatmap(faulty_report)
    by_family = {trace.name: trace for trace in fig.data}
    assert "attn.hook_rot_q" in by_family and "logits" in by_family
    trace = by_family["attn.hook_rot_q"]
    assert list(trace.y) == ["layer 0", "layer 1"]
    stats = faulty_report.stats["blocks.1.attn.hook_rot_q"]
    worst = stats["max_abs"].max(dim=0).values.numpy()  # worst row per position
    np.testing.assert_allclose(np.asarray(trace.customdata)[1, :, 0], worst)
    assert [t.visible for t in fig.data].count(True) == 1
    assert len(fig.layout.updatemenus[0].buttons) == len(fig.data)


def test_first_divergence_marks_the_first_divergent_hook(faulty_report):
    fig = plot.first_divergence(faulty_report, **TOL64)
    bar = fig.data[0]
    assert bar.orientation == "h" and list(bar.y) == faulty_report.hooks  # names read unrotated
    expected = faulty_report.hook_max_abs()
    assert list(bar.customdata) == [expected[h] for h in faulty_report.hooks]
    site = faulty_report.first_divergence(**TOL64)
    marked = [h for h, c in zip(bar.y, bar.marker.color) if c == "crimson"]
    assert marked == [site.hook] == ["blocks.0.attn.hook_rot_q"]
    assert all(c == "steelblue" for c in bar.marker.color[: list(bar.y).index(site.hook)])


def test_generation_plot():
    diff = GenerationDiff(
        logits_max_abs=[0.0, 1e-12, 0.5, 2.0],
        kl=[0.0, 0.0, 0.01, 0.3],
        top1_agree=[True, True, True, False],
        first_divergent_step=2,
    )
    fig = plot.generation(diff)
    error, _, kl, top1 = fig.data
    assert list(error.customdata) == diff.logits_max_abs
    assert list(error.y) == [1e-14, 1e-12, 0.5, 2.0]  # the exact zero at the axis's end, labelled
    assert list(error.text) == ["exact 0", "", "", ""]
    assert fig.layout.yaxis.ticktext[0] == "exact 0" and fig.layout.yaxis.tickvals[0] == 1e-14
    assert list(kl.y) == diff.kl
    assert list(top1.y) == [1, 1, 1, 0]
    lines = [s for s in fig.layout.shapes if s.line.color == "crimson"]
    assert [shape.x0 for shape in lines] == [2, 2, 2]
    assert "first divergent step 2" in fig.layout.title.text


def test_figures_render_to_self_contained_html(faulty_report):
    gen = GenerationDiff.from_step_logits([torch.zeros(1, 4)] * 3, [torch.zeros(1, 4)] * 3)
    for fig in (plot.divergence_heatmap(faulty_report), plot.first_divergence(faulty_report), plot.generation(gen)):
        html = fig.to_html(include_plotlyjs=True)
        assert "<script" in html and 'src="https://cdn.plot.ly' not in html
        assert len(html) > 1_000_000  # plotly.js itself is embedded


def test_heatmap_opens_on_the_family_of_the_first_divergence(faulty_report):
    fig = plot.divergence_heatmap(faulty_report)
    visible = [trace.name for trace in fig.data if trace.visible]
    site = faulty_report.first_divergence()
    assert visible == ["attn.hook_rot_q"] and site.hook.endswith("attn.hook_rot_q")
    assert fig.layout.title.text == "largest |cached - uncached| per layer and position: attn.hook_rot_q"


def test_heatmap_dropdown_shows_the_family_drawn(faulty_report):
    fig = plot.divergence_heatmap(faulty_report)
    menu = fig.layout.updatemenus[0]
    drawn = [i for i, trace in enumerate(fig.data) if trace.visible]
    assert menu.active == drawn[0] != 0  # not the first button (hook_embed)
    assert menu.buttons[menu.active].label == "attn.hook_rot_q"


@pytest.mark.parametrize(
    "values, y, text, log",
    [
        ([1e-3, 0.0, float("inf")], [1e-3, 1e-5, 1e-2], ["", "exact 0", "inf"], True),
        ([0.0, 0.0], [0.0, 0.0], ["exact 0", "exact 0"], False),
        ([float("inf"), 0.0], [1.0, 1e-20], ["inf", "exact 0"], True),
        ([2.0, float("nan")], [2.0, float("nan")], ["", ""], True),
    ],
    ids=["mixed", "all-zero", "inf-and-zero", "nan-gap"],
)
def test_log_series(values, y, text, log):
    drawn = plot.log_series(values)
    np.testing.assert_allclose(drawn["y"], y)
    assert drawn["text"] == text and drawn["log"] is log


def test_infinite_error_bar_is_drawn_capped_and_marked(faulty_report):
    per_hook = faulty_report.hook_max_abs()
    inf_hook = "blocks.0.attn.hook_attn_scores"
    assert per_hook[inf_hook] == math.inf  # stored keys score -inf in one run only
    bar = plot.first_divergence(faulty_report, **TOL64).data[0]
    i = list(bar.y).index(inf_hook)
    finite = [v for v in per_hook.values() if math.isfinite(v)]
    assert bar.x[i] == pytest.approx(10 * max(finite)) and bar.text[i] == "inf"


def _zero_report():
    from interpkv.diagnostics.report import DivergenceReport

    zeros = torch.zeros(1, 3, dtype=torch.float64)
    stats = {h: {"max_abs": zeros, "rel": zeros, "cos": zeros + 1, "scale": zeros + 1} for h in ("hook_embed", "logits")}
    return DivergenceReport(["hook_embed", "logits"], stats, zeros)


def test_all_zero_errors_are_drawn_on_a_linear_axis():
    fig = plot.first_divergence(_zero_report(), **TOL64)
    assert fig.layout.xaxis.type == "linear" and list(fig.data[0].x) == [0.0, 0.0]
    assert list(fig.data[0].text) == ["exact 0", "exact 0"]
    assert fig.layout.title.text == "cached vs uncached: no hook past the tolerance"
    gen = plot.generation(GenerationDiff([0.0] * 4, [0.0] * 4, [True] * 4, None))
    assert gen.layout.yaxis.type == "linear" and list(gen.data[0].y) == [0.0] * 4
    assert any(a.text == "every step exactly 0" for a in gen.layout.annotations)


def test_error_plots_draw_the_tolerance(faulty_report):
    fig = plot.first_divergence(faulty_report, atol=1e-7, rtol=1e-7)
    lines = [s for s in fig.layout.shapes if s.x0 == s.x1 == 1e-7]
    assert len(lines) == 1 and fig.layout.xaxis.type == "log"
    label = [a for a in fig.layout.annotations if a.text == "atol 1e-07"]
    assert len(label) == 1 and label[0].x == pytest.approx(-7)  # annotations use log10 on a log axis
    gen = plot.generation(GenerationDiff([1e-6, 1e-3], [0.0, 0.0], [True, True], 1, atol=1e-4))
    assert [s.y0 for s in gen.layout.shapes if s.y0 == s.y1] == [1e-4]


def test_an_exact_zero_is_drawn_as_zero_below_the_tolerance():
    # stale_position_offset on gpt2: hook_embed is exactly 0 (the token embedding does not see positions).
    # It was drawn at min(positive)/10, 3.9e7x above the 1e-10 tolerance line.
    from interpkv.cli import checks

    report = checks.check_fault("stale_position_offset", "gpt2").report
    assert report.hook_max_abs()["hook_embed"] == 0.0
    fig = plot.first_divergence(report, **TOL64)
    bar = fig.data[0]
    i = list(bar.y).index("hook_embed")
    axis = fig.layout.xaxis
    assert bar.text[i] == "exact 0" and bar.x[i] < TOL64["atol"]
    # The bar has no length: it ends where the axis starts, and the axis says "exact 0" there.
    assert axis.range[0] == pytest.approx(math.log10(bar.x[i])) and axis.tickvals[0] == bar.x[i]
    assert axis.ticktext[0] == "exact 0"


def _figures(report):
    gen = GenerationDiff([0.0, 1e-6, 2e-5], [0.0, 1e-12, 3e-12], [True, True, True], None, atol=1e-4)
    return {
        "heatmap": plot.divergence_heatmap(report, atol=1e-10),
        "first_divergence": plot.first_divergence(report, **TOL64),
        "generation": plot.generation(gen),
        "position_error": plot.position_error([0.0, 2e-5, 3.0], atol=1e-4),
    }


def _axes(fig):
    layout = fig.layout.to_plotly_json()
    return {k: v for k, v in layout.items() if k.startswith(("xaxis", "yaxis"))}


def test_every_figure_reads_in_words_and_plain_numbers(faulty_report):
    for name, fig in _figures(faulty_report).items():
        axes = _axes(fig)
        # Plain scientific notation: plotly's default SI prefixes (10f, 1p, 1μ) never appear.
        for key, axis in axes.items():
            plain = axis.get("exponentformat") in ("e", "power") or "ticktext" in axis or axis.get("type") == "category"
            assert plain, f"{name}.{key}: {axis}"
        titled = [k for k, a in axes.items() if (a.get("title") or {}).get("text")]
        assert any(k.startswith("xaxis") for k in titled) and any(k.startswith("yaxis") for k in titled), name
        if name != "heatmap":  # the heatmap's colour bar is its legend
            legend = [t for t in fig.data if t.showlegend is not False and t.name]
            assert fig.layout.showlegend is not False and legend, name
            assert any("tolerance" in t.name for t in legend), name  # the dotted line, named
        text = fig.to_json()
        assert "cached" in text and ("uncached" in text or "HF" in text), name


def test_generation_panels_are_tall_enough_and_titled():
    fig = plot.generation(GenerationDiff([1e-6, 1e-3], [0.0, 0.0], [True, True], 1, atol=1e-4))
    assert fig.layout.height >= 600
    for key in ("yaxis", "yaxis2", "yaxis3"):
        domain = fig.layout[key].domain
        assert (domain[1] - domain[0]) * fig.layout.height >= 80, key  # pixels of the panel, before margins
        assert fig.layout[key].title.text, key


def test_runs_are_named(faulty_report):
    fig = plot.first_divergence(faulty_report, runs=("TransformerLens cached", "HF"), **TOL64)
    assert fig.layout.xaxis.title.text == "largest |TransformerLens cached - HF| over positions and rows"
    gen = plot.generation(GenerationDiff([1e-6, 1e-3], [0.0, 0.0], [True, True], 1, atol=1e-4))
    assert "cached" in gen.layout.annotations[0].text and "uncached" in gen.layout.annotations[0].text


def test_heatmap_colour_bar_says_exact_zero_and_the_tolerance(faulty_report):
    bar = plot.divergence_heatmap(faulty_report, atol=1e-10).data[0].colorbar
    assert bar.ticktext[0] == "exact 0" and bar.tickvals[0] == -20
    assert "atol 1e-10" in bar.ticktext and "cached - uncached" in bar.title.text


def test_position_error_marks_what_is_past_the_tolerance():
    fig = plot.position_error([0.0, 2e-5, 3.0, float("nan")], atol=1e-4, runs=("TransformerLens cached", "HF"))
    bar = fig.data[0]
    assert list(bar.customdata)[:3] == [0.0, 2e-5, 3.0] and list(bar.marker.color)[:3] == [
        "steelblue", "steelblue", "crimson"]
    assert "1 of 4 positions" in fig.layout.title.text and "HF" in fig.layout.yaxis.title.text


def test_heatmap_can_open_on_the_family_that_failed(faulty_report):
    fig = plot.divergence_heatmap(faulty_report, family="logits")
    assert [t.name for t in fig.data if t.visible] == ["logits"]
    assert fig.layout.updatemenus[0].buttons[fig.layout.updatemenus[0].active].label == "logits"
