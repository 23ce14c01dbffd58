"""Render every kind of report figure to PNG with headless Chromium, to look at them.

    python scripts/figure_pngs.py OUTDIR [--only NAME ...]

Each figure is written to ``OUTDIR/<name>.html`` (plotly.js inline, offline) and
screenshotted by Chromium to ``OUTDIR/<name>.png`` at the figure's own height.
kaleido is not needed. Chromium: the Debian package (``make browser``).
Figures: the bug zoo's first-divergence bars (a zero hook among them), a
failing model's divergence heatmap, a greedy generation, a TransformerLens
finding (TL cached vs HF), an engine row's cached-vs-uncached bars and its
failing vs-HF logits per position (the quantity that failed).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def screenshot(fig, path_png: str, width: int = 1000) -> str:
    """Write ``fig`` next to ``path_png`` as HTML and screenshot it there."""
    height = int(fig.layout.height or 450) + 40
    html = path_png[: -len(".png")] + ".html"
    fig.write_html(html, include_plotlyjs=True, full_html=True, config={"staticPlot": True})
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
                f"--window-size={width},{height}", "--virtual-time-budget=5000",
                f"--screenshot={os.path.abspath(path_png)}", "file://" + os.path.abspath(html),
            ],
            check=True, capture_output=True, timeout=120,
        )
    return path_png


def figures(only=()):
    """``(name, figure)`` of each kind of figure the report draws, on the demo's inputs."""
    import torch

    from interpkv import plot, zoo
    from interpkv.verify import checks

    def want(name):
        return not only or any(o in name for o in only)

    for fault, model in (("stale_position_offset", "gpt2"), ("stale_position_offset", "llama")):
        name = f"fault-{fault}-{model}"
        if want(name):
            r = checks.check_fault(fault, model)
            yield name, plot.first_divergence(r.report, atol=1e-10, rtol=1e-10)
    if want("heatmap"):
        r = checks.check_fault("stale_position_offset", "llama")
        yield "heatmap-stale-llama", plot.divergence_heatmap(r.report, atol=1e-10)
    if want("generation") and "llama" in zoo.trained_names():
        g = checks.check_generation("llama", "    def __init__(self", max_new_tokens=60)
        yield "generation-llama", plot.generation(g.diff)
    if want("finding"):
        from interpkv.verify import findings

        f = findings.alibi_slopes_not_power_of_two()
        yield "finding-alibi", plot.first_divergence(f.report, atol=f.atol, rtol=f.atol, runs=f.runs)
    if want("engine"):
        from interpkv.verify.engine_checks import check_engine

        c = check_engine("bloom6", "transformer_lens")
        yield "engine-bloom6-tl", plot.first_divergence(c.report, atol=1e-5, rtol=1e-5)
        yield "engine-bloom6-tl-vs-hf", plot.position_error(
            c.hf_by_position, atol=checks.HF_TOL[torch.float32], runs=("TransformerLens cached", "HF"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--only", nargs="*", default=())
    args = parser.parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    for name, fig in figures(args.only):
        print(screenshot(fig, os.path.join(args.outdir, f"{name}.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
