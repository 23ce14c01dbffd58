"""Plots carry the report's numbers and render to self-contained HTML."""

import math
import sys

import numpy as np
import pytest
import torch

import interpkv
from interpkv import faults
from interpkv import plot
from interpkv import zoo
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
    assert list(trace.y) == ["L0", "L1"]
    stats = faulty_report.stats["blocks.1.attn.hook_rot_q"]
    worst = stats["max_abs"].max(dim=0).values.numpy()  # worst row per position
    np.testing.assert_allclose(np.asarray(trace.customdata)[1, :, 0], worst)
    assert [t.visible for t in fig.data].count(True) == 1
    assert len(fig.layout.updatemenus[0].buttons) == len(fig.data)


def test_first_divergence_marks_the_first_divergent_hook(faulty_report):
    fig = plot.first_divergence(faulty_report, **TOL64)
    bar = fig.data[0]
    assert list(bar.x) == faulty_report.hooks
    expected = faulty_report.hook_max_abs()
    assert list(bar.y) == [expected[h] for h in faulty_report.hooks]
    site = faulty_report.first_divergence(**TOL64)
    marked = [h for h, c in zip(bar.x, bar.marker.color) if c == "crimson"]
    assert marked == [site.hook] == ["blocks.0.attn.hook_rot_q"]
    assert all(c == "steelblue" for c in bar.marker.color[: list(bar.x).index(site.hook)])


def test_generation_plot():
    diff = GenerationDiff(
        logits_max_abs=[0.0, 1e-12, 0.5, 2.0],
        kl=[0.0, 0.0, 0.01, 0.3],
        top1_agree=[True, True, True, False],
        first_divergent_step=2,
    )
    fig = plot.generation(diff)
    traces = {t.name: t for t in fig.data}
    assert list(traces["logits_max_abs"].y) == diff.logits_max_abs
    assert list(traces["kl"].y) == diff.kl
    assert list(traces["top1_agree"].y) == [1, 1, 1, 0]
    assert [shape.x0 for shape in fig.layout.shapes] == [2, 2, 2]
    assert "first divergent step: 2" in fig.layout.title.text


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
    assert fig.layout.title.text == "max |a-b|: attn.hook_rot_q"
