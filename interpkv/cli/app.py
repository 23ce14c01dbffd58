"""Command line: ``interpkv check [MODEL ...] [--html PATH]`` and ``interpkv demo [--html PATH]``.

``check`` runs the cached-vs-uncached equivalence checks (and the HuggingFace
comparison where a twin exists) on zoo models or on local HF model
directories. ``demo`` runs the zoo check, the bug zoo (every known cache bug
injected and localized) and, when trained weights ship, a greedy generation
with the cache on and off. Both print rich tables and exit 0 only when every
check passes (exit 1: a check failed, 2: bad arguments or an error, reported
on one stderr line; ``--debug`` shows the traceback instead).
"""

import argparse
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
        hf = hf + "*" if r.hf_note else hf
        table.add_row(r.model, r.scheme, f"{r.max_dlogit:.2e}", hf, r.first_divergence_label, _pass(r.ok))
    return table


def _fault_table(results, title: str = "bug zoo: known cache bugs, injected and localized (float64)"):
    from rich.table import Table

    table = Table(title=title)
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


class _Failure(Exception):
    """An error already worded as the one line the user sees (exit 2)."""


def _resolve(models: Sequence[str]) -> List[str]:
    """Zoo names and HF directories as given; raises ValueError (one line) on anything else."""
    from interpkv import zoo
    from interpkv.cli.inputs import check_model_dir

    for model in models:
        if model not in zoo.names():
            check_model_dir(model, zoo.names())
    return list(models) or zoo.names()


def _run_checks(models: Sequence[str], dtype, debug: bool = False, engine: str = "interpkv", built=None) -> list:
    """Each model's check; ``built``: the run's :class:`~interpkv.verify.models.Models` (default: fresh loads)."""
    from interpkv import zoo
    from interpkv.cli.inputs import load_error, quiet_hf
    from interpkv.verify.checks import check_hf_dir, check_zoo

    def one(model: str):
        if engine != "interpkv":
            from interpkv.verify.engine_checks import check_engine

            return check_engine(model, engine, dtype=dtype, models=built)
        if model in zoo.names():
            return check_zoo([model], dtype=dtype, models=built)[0]
        try:
            with quiet_hf():
                return check_hf_dir(model, dtype=dtype)
        except Exception as exc:  # HF / TransformerLens errors run over many lines
            if debug:
                raise
            raise _Failure(load_error(model, exc)) from exc

    return _progress(models, one, "checking")


def _error(message: str) -> int:
    """Print the one-line error and return exit status 2."""
    print(f"interpkv: error: {message}", file=sys.stderr)
    return 2


def _verdict_line(console, parts: List[str], ok: bool) -> None:
    word = "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
    console.print(f"verdict: {word}: " + "; ".join(parts))


def _hf_notes(console, results) -> None:
    for r in results:
        if r.hf_note:
            console.print(f"* {r.model}: {r.hf_note}; vs HF judged on the other rows", markup=False)


def _check(
    models: Sequence[str], dtype_name: str, html: Optional[str], debug: bool = False, engine: str = "interpkv"
) -> int:
    import torch

    from interpkv.cli.inputs import check_writable

    models = _resolve(models)  # ValueError: one line, exit 2 (see main)
    if html:
        check_writable(html)  # before the checks run, not after
    dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
    console = _console()
    results = _run_checks(models, dtype, debug, engine)
    title = "interpkv" if engine == "interpkv" else f"engine {engine}"
    console.print(_check_table(results, f"{title}: cached vs uncached vs HuggingFace ({dtype_name})"))
    _hf_notes(console, results)
    if html:
        from interpkv.cli import html as report

        report.write(html, checks=results, title="interpkv check", command=_command(), dtype=dtype_name)
        console.print(f"report: {html}")
    failed = [r.model for r in results if not r.ok]
    passed = f"{len(results) - len(failed)}/{len(results)} models equivalent"
    _verdict_line(console, [passed] + ([f"failed: {', '.join(failed)}"] if failed else []), not failed)
    return 0 if not failed else 1


def _demo(html: Optional[str]) -> int:
    import torch

    from interpkv import zoo
    from interpkv.cli.inputs import check_writable
    from interpkv.verify.checks import BUG_ZOO, check_fault, check_generation
    from interpkv.verify.models import Models

    if html:
        check_writable(html)
    console = _console()
    built = Models()  # each zoo model built once, read by every section below
    checks = _run_checks(zoo.names(), torch.float32, built=built)
    console.print(_check_table(checks, "interpkv: cached vs uncached vs HuggingFace (float32)"))
    _hf_notes(console, checks)
    faults = _progress(list(BUG_ZOO), lambda pair: check_fault(*pair, models=built), "bug zoo")
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

    other = _demo_other_implementations(console, built)

    if html:
        from interpkv.cli import html as report

        report.write(
            html, checks=checks, faults=faults, generation=generation, other=other, title="interpkv demo",
            command=_command(), dtype="float32",
        )
        console.print(f"report: {html}")

    n_ok = sum(r.ok for r in checks)
    n_caught = sum(r.caught for r in faults)
    parts = [f"{n_ok}/{len(checks)} zoo models equivalent", f"{n_caught}/{len(faults)} faults caught"]
    ok = n_ok == len(checks) and n_caught == len(faults)
    console.print(other.summary)
    parts.append("other implementations pass" if other.ok else "other implementations FAIL")
    ok = ok and other.ok
    if generation is not None:
        parts.append("generation identical" if generation.identical else "generation DIFFERS")
        ok = ok and generation.identical
    _verdict_line(console, parts, ok)
    return 0 if ok else 1


_ARGV: List[str] = []


def _command() -> str:
    """The command line as typed, for the report."""
    import shlex

    return "interpkv " + " ".join(shlex.quote(a) for a in _ARGV)


def _demo_other_implementations(console, built):
    """Demo section "other implementations": TransformerLens's and HF's own caches, audited on the run's models."""
    from interpkv import zoo
    from interpkv.verify import findings as tl_findings
    from interpkv.verify.engine_checks import OtherImplementations, check_engine, engine_faults

    other = OtherImplementations()
    other.known_mismatch = {f"{n} (transformer_lens)" for n in zoo.names() if zoo.info(n)["tl_pair_note"]}
    for engine, models in (("transformer_lens", zoo.names()), ("hf", [n for n in zoo.pairs() if n in zoo.names()])):
        audit = lambda m, e=engine: check_engine(m, e, models=built)  # noqa: E731
        other.checks += _progress(list(models), audit, f"engine {engine}")
    console.print(_check_table(other.checks, "other implementations: their own caches, cached vs uncached (float32)"))
    other.faults = _progress(["engine faults"], lambda _: engine_faults(models=built), "engine faults")[0]
    console.print(_fault_table(other.faults, "engine faults: a stored key corrupted in each engine's cache update"))
    other.findings = tl_findings.all_findings(load_pair=built.pair)
    from rich.table import Table

    table = Table(title="TransformerLens 3.x cache findings, checked against HF (teacher forcing)")
    for column in ("finding", "model", "first divergence", "evidence", "verified"):
        table.add_column(column, no_wrap=column != "evidence")
    for f in other.findings:
        evidence = "; ".join(f"{k}: {v:.3g}" for k, v in f.evidence.items())
        table.add_row(f.title, f.model, f.site_label, evidence, _pass(f.explained, "yes" if f.verified else f.status, f.status))
    console.print(table)
    return other


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``interpkv`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when every check passed, 1 when one failed, 2 on
        bad arguments or an error (one line on stderr; ``--debug`` raises
        instead, showing the traceback).
    """
    from interpkv import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    parser = argparse.ArgumentParser(prog="interpkv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"interpkv {__version__}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="cached-vs-uncached equivalence checks", parents=[debug])
    check.add_argument(
        "models", nargs="*", metavar="MODEL", help="zoo model names or local HF model directories (default: every zoo model)"
    )
    check.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    check.add_argument("--html", metavar="PATH", help="write a self-contained HTML report here")
    check.add_argument(
        "--engine", choices=["interpkv", "transformer_lens", "hf"], default="interpkv",
        help="whose cache to check: interpkv's, TransformerLens's own past_kv_cache, or the HF model's",
    )
    demo = sub.add_parser("demo", help="zoo check, bug zoo and cached generation, with a report", parents=[debug])
    demo.add_argument("--html", metavar="PATH", help="write a self-contained HTML report here")
    args = parser.parse_args(argv)
    from interpkv.cli.runtime import torch_threads, zoo_only

    # Zoo models are tiny: one intra-op thread (see interpkv.cli.runtime); a user's HF directory keeps the caller's.
    threads = 1 if args.command == "demo" or zoo_only(args.models) else None
    try:
        with torch_threads(threads):
            if args.command == "check":
                return _check(args.models, args.dtype, args.html, args.debug, args.engine)
            return _demo(args.html)
    except (_Failure, ValueError) as exc:
        if args.debug:
            raise
        return _error(str(exc))
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        if args.debug:
            raise
        from interpkv.cli.inputs import one_line

        return _error(f"{one_line(exc)} (run again with --debug for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
