"""Command line: ``interpkv check [MODEL ...] [--html PATH]`` and ``interpkv demo [--html PATH]``.

``check`` runs the cached-vs-uncached equivalence checks (and the HuggingFace
comparison where a twin exists) on zoo models or on local HF model
directories. ``demo`` runs the zoo check, the bug zoo (every known cache bug
injected and localized) and, when trained weights ship, a greedy generation
with the cache on and off. Both print rich tables and exit 0 only when every
check passes (exit 1: a check failed, 2: bad arguments).
"""

import argparse
import os
import sys
from typing import Callable, List, Optional, Sequence

__all__ = ["main"]

# Width used when stdout is not a terminal (CI logs): wide enough that no
# column wraps; a log viewer scrolls instead of breaking hook names.
_LOG_WIDTH = 130

# The demo's generation: the trained character-level LLaMA (rotary + GQA), on a
# prompt it continues readably.
GENERATION_MODEL = "llama"
GENERATION_PROMPT = "    def __init__(self"


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    probe = Console(file=stream)
    return Console(file=stream, width=None if probe.is_terminal else _LOG_WIDTH)


def _pass(ok: bool, yes: str = "PASS", no: str = "FAIL") -> str:
    return f"[green]{yes}[/green]" if ok else f"[red]{no}[/red]"


def _check_table(results, title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    table.add_column("scheme", overflow="fold")
    table.add_column("max |dlogit|", justify="right", no_wrap=True)
    table.add_column("vs HF", justify="right", no_wrap=True)
    table.add_column("first divergence", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for r in results:
        hf = "-" if r.max_dlogit_hf is None else f"{r.max_dlogit_hf:.2e}"
        table.add_row(r.model, r.scheme, f"{r.max_dlogit:.2e}", hf, r.first_divergence_label, _pass(r.ok))
    return table


def _fault_table(results):
    from rich.table import Table

    table = Table(title="bug zoo: known cache bugs, injected and localized (float64)")
    table.add_column("fault", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("first divergence", no_wrap=True)
    table.add_column("caught", no_wrap=True)
    for r in results:
        found = r.found_label if r.caught else f"{r.found_label} (expected {r.expected_label})"
        table.add_row(r.fault, r.model, found, _pass(r.caught, "yes", "no"))
    return table


def _progress(items: Sequence, run: Callable, description: str) -> list:
    """``[run(item) for item in items]`` with a progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=len(items))
        for item in items:
            progress.update(task, description=f"{description} {item}")
            results.append(run(item))
            progress.advance(task)
    return results


def _resolve(models: Sequence[str]) -> List[str]:
    """Zoo names and HF directories as given; raises ValueError on anything else."""
    from interpkv import zoo

    bad = [m for m in models if m not in zoo.names() and not os.path.isdir(m)]
    if bad:
        raise ValueError(
            f"unknown model(s) {bad}: give zoo names ({', '.join(zoo.names())}) or local "
            "HuggingFace model directories (written by model.save_pretrained(dir))"
        )
    return list(models) or zoo.names()


def _run_checks(models: Sequence[str], dtype) -> list:
    from interpkv import zoo
    from interpkv.cli.checks import check_hf_dir, check_zoo

    def one(model: str):
        if model in zoo.names():
            return check_zoo([model], dtype=dtype)[0]
        return check_hf_dir(model, dtype=dtype)

    return _progress(models, one, "checking")


def _verdict_line(console, parts: List[str], ok: bool) -> None:
    word = "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
    console.print(f"verdict: {word}: " + "; ".join(parts))


def _check(models: Sequence[str], dtype_name: str, html: Optional[str]) -> int:
    import torch

    try:
        models = _resolve(models)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
    console = _console()
    try:
        results = _run_checks(models, dtype)
    except ValueError as exc:  # e.g. a directory without config.json
        print(exc, file=sys.stderr)
        return 2
    console.print(_check_table(results, f"interpkv: cached vs uncached vs HuggingFace ({dtype_name})"))
    if html:
        from interpkv.cli import html as report

        report.write(html, checks=results, title="interpkv check")
        console.print(f"report: {html}")
    failed = [r.model for r in results if not r.ok]
    passed = f"{len(results) - len(failed)}/{len(results)} models equivalent"
    _verdict_line(console, [passed] + ([f"failed: {', '.join(failed)}"] if failed else []), not failed)
    return 0 if not failed else 1


def _demo(html: Optional[str]) -> int:
    import torch

    from interpkv import zoo
    from interpkv.cli.checks import BUG_ZOO, check_fault, check_generation

    console = _console()
    checks = _run_checks(zoo.names(), torch.float32)
    console.print(_check_table(checks, "interpkv: cached vs uncached vs HuggingFace (float32)"))
    faults = _progress(list(BUG_ZOO), lambda pair: check_fault(*pair), "bug zoo")
    console.print(_fault_table(faults))

    generation = None
    if GENERATION_MODEL in zoo.trained_names():
        generation = check_generation(GENERATION_MODEL, GENERATION_PROMPT, max_new_tokens=60)
        console.print(f"\n[bold]greedy generation, {generation.model}[/bold], prompt {generation.prompt!r}")
        console.print(f"cache on : {generation.prompt + generation.cached!r}", markup=False)
        console.print(f"cache off: {generation.prompt + generation.uncached!r}", markup=False)
        console.print("identical:", _pass(generation.identical, "yes", "no"))
    else:
        console.print("\n(no trained zoo model ships yet: generation demo skipped)")

    if html:
        from interpkv.cli import html as report

        report.write(html, checks=checks, faults=faults, generation=generation, title="interpkv demo")
        console.print(f"report: {html}")

    n_ok = sum(r.ok for r in checks)
    n_caught = sum(r.caught for r in faults)
    parts = [f"{n_ok}/{len(checks)} zoo models equivalent", f"{n_caught}/{len(faults)} faults caught"]
    ok = n_ok == len(checks) and n_caught == len(faults)
    if generation is not None:
        parts.append("generation identical" if generation.identical else "generation DIFFERS")
        ok = ok and generation.identical
    _verdict_line(console, parts, ok)
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``interpkv`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when every check passed, 1 when one failed, 2 on
        bad arguments.
    """
    parser = argparse.ArgumentParser(prog="interpkv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="cached-vs-uncached equivalence checks")
    check.add_argument(
        "models", nargs="*", metavar="MODEL", help="zoo model names or local HF model directories (default: every zoo model)"
    )
    check.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    check.add_argument("--html", metavar="PATH", help="write a self-contained HTML report here")
    demo = sub.add_parser("demo", help="zoo check, bug zoo and cached generation, with a report")
    demo.add_argument("--html", metavar="PATH", help="write a self-contained HTML report here")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.models, args.dtype, args.html)
    return _demo(args.html)


if __name__ == "__main__":
    sys.exit(main())
