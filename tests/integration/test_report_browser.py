"""The HTML report renders in a real browser: headless Chromium, no network.

Chromium loads the report from a ``file://`` URL with background networking
off, runs its JavaScript under a virtual-time budget and dumps the DOM. Every
figure div must then hold plotly's ``svg.main-svg`` (plotly.js ran from the
inline copy and drew the figure) and no script may have thrown: a marker
script inserted before everything else records uncaught errors on ``<html>``,
and Chromium's console log is searched for "Uncaught".

Chromium comes from the Debian package ``chromium`` (``make test`` installs it
when running as root with apt); without it these tests skip.
"""

import dataclasses
import os
import re
import shutil
import subprocess

import pytest
import torch

from interpkv import zoo
from interpkv.cli import html as report
from interpkv.verify import checks

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (apt-get install chromium; `make test` does it as root)",
)

_ERROR_MARKER = (
    "<script>window.addEventListener('error', function (e) {"
    " var h = document.documentElement;"
    " h.setAttribute('data-js-errors', (h.getAttribute('data-js-errors') || '') + '|' + e.message); });"
    "</script>"
)
_LOADED_MARKER = "<script>document.documentElement.setAttribute('data-loaded', 'yes');</script>"


def render_in_chromium(html_path, tmp_path):
    """Dump the DOM after Chromium ran ``html_path`` (with the error markers added)."""
    page = html_path.read_text(encoding="utf-8")
    page = page.replace("<head>", "<head>" + _ERROR_MARKER, 1).replace("</body>", _LOADED_MARKER + "</body>", 1)
    probe = tmp_path / "probe.html"
    probe.write_text(page, encoding="utf-8")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def figures(dom):
    """``{data-figure name: number of svg.main-svg inside}`` for every figure div."""
    pieces = re.split(r'<div class="figure" data-figure="([^"]*)"', dom)
    return {name: body.count('class="main-svg"') for name, body in zip(pieces[1::2], pieces[2::2])}


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    """A report with every kind of figure: heatmaps, a fault bar chart, a generation plot."""
    model = zoo.load("gpt2", dtype=torch.float64)
    prompt = torch.arange(4)[None]
    new_a, new_b, diff = checks.greedy_pair(model, prompt, 5)
    generation = checks.GenerationResult("gpt2 (random)", "0 1 2 3", str(new_a.tolist()), str(new_b.tolist()), diff)
    path = tmp_path_factory.mktemp("report") / "report.html"
    gpt2, bloom = checks.check_zoo(["gpt2", "bloom"])
    # Passing models collapse to one line: make bloom fail so a heatmap is drawn, and gpt2 fail
    # against HF so its logit difference per position is.
    bloom = dataclasses.replace(bloom, first_divergence=bloom.report.site("hook_embed", 0))
    gpt2 = dataclasses.replace(gpt2, max_dlogit_hf=1.0, hf_by_position=[0.0, 1e-6] + [1.0] * 22)
    report.write(
        str(path),
        checks=[gpt2, bloom],
        faults=[checks.check_fault("stale_position_offset", "llama")],
        generation=generation,
    )
    return path


def test_every_figure_renders_without_js_errors(report_path, tmp_path):
    page = report_path.read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page), "the report must not load scripts"
    dom, log = render_in_chromium(report_path, tmp_path)
    html_tag = re.search(r"<html[^>]*>", dom).group(0)
    assert 'data-loaded="yes"' in html_tag, "the page did not finish running its scripts"
    assert "data-js-errors" not in html_tag, html_tag
    assert "Uncaught" not in log
    drawn = figures(dom)
    assert set(drawn) == {
        "vs-hf:gpt2",
        "heatmap:bloom",
        "fault:stale_position_offset:llama",
        "generation:gpt2 (random)",
    }
    assert all(n >= 1 for n in drawn.values()), drawn


def test_the_probe_sees_a_broken_page(tmp_path):
    # The checks above can fail: a figure whose script throws is reported,
    # and its div holds no plotly SVG.
    page = tmp_path / "broken.html"
    page.write_text(
        '<html><head></head><body><div class="figure" data-figure="broken"><div id="x"></div>'
        "<script>Plotly.newPlot('x', [])</script></div></body></html>"
    )
    dom, _ = render_in_chromium(page, tmp_path)
    html_tag = re.search(r"<html[^>]*>", dom).group(0)
    assert 'data-loaded="yes"' in html_tag
    assert "Plotly is not defined" in html_tag
    assert figures(dom) == {"broken": 0}
