"""Command line: ``interpkv check [MODEL ...] [--cache PATH] [--html PATH]``, ``interpkv demo [--html PATH]``
and ``interpkv provenance PATH [--html OUT]``.

``check`` runs the cached-vs-uncached equivalence checks (and the HuggingFace
comparison where a twin exists) on zoo models or on local HF model
directories; with ``--cache`` it also loads a saved cache into the one MODEL,
shows what wrote it and checks it (:mod:`interpkv.verify.saved_cache`).
``provenance`` shows what wrote a saved cache from its header alone. ``demo``
runs the zoo check, the bug zoo (every known cache bug injected and
localized), when trained weights ship a greedy generation with the cache on
and off, and the audit of other libraries' caches. Every row
ends in PASS, FAIL or KNOWN UPSTREAM (:mod:`interpkv.verify.verdicts`);
the last line counts them, as the HTML report's header does. Exit 0 when
nothing FAILed, 1 when a check FAILed, 2 on bad arguments or an error (one
stderr line; ``--debug`` shows the traceback instead). Arguments are checked
before torch, transformers or TransformerLens are imported.
"""

import argparse
import logging
import os
import shlex
import sys
from typing import Callable, List, Optional, Sequence

from interpkv import __version__
from interpkv.cli.inputs import check_model_dir, check_writable, load_error, one_line, quiet_hf
from interpkv.cli.names import zoo_names

__all__ = ["main"]

DTYPES = ["float32", "float64", "float16", "bfloat16"]
"""``interpkv check --dtype``: every dtype interpkv.tolerances has a tolerance for."""

# Width used when stdout is not a terminal (CI logs): wide enough that no
# column wraps; a log viewer scrolls instead of breaking hook names.
_LOG_WIDTH = 150

# The demo's generation: the trained character-level LLaMA (rotary + GQA), on a
# prompt it continues readably.
GENERATION_MODEL = "llama"
GENERATION_PROMPT = "    def __init__(self"


def _console(stderr: bool = False):
    from rich.console import Console  # deferred: rich, only when a table is printed

    stream = sys.stderr if stderr else sys.stdout
    probe = Console(file=stream)
    return Console(file=stream, width=None if probe.is_terminal else _LOG_WIDTH)


_STYLE = {"PASS": "green", "FAIL": "red", "KNOWN UPSTREAM": "yellow"}


def _word(verdict, mark: str = "") -> str:
    """A verdict word in its colour (KNOWN UPSTREAM never green), with its note marker."""
    return f"[{_STYLE[verdict.word]}]{verdict.word}[/{_STYLE[verdict.word]}]" + (f" [{mark}]" if mark else "")


class _Notes:
    """Numbered notes under a table: why a row FAILs, or which upstream bug it is (with its reference)."""

    def __init__(self):
        self.lines: List[str] = []
        self.marks = 0

    def mark(self, label: str, verdict) -> str:
        if not verdict.note:
            return ""
        self.marks += 1
        self.lines.append(f"[{self.marks}] {label}: {verdict.word}: {verdict.note}")
        return str(self.marks)

    def print(self, console) -> None:
        for line in self.lines:
            console.print(line, markup=False, highlight=False)


def _check_table(results, section, title: str, inputs: str):
    """The check rows, their notes, and the section's count."""
    from rich.table import Table  # deferred: rich, only when a table is printed

    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    table.add_column("scheme", overflow="fold")
    table.add_column("|cached-uncached|", justify="right", no_wrap=True)
    table.add_column("|cached-HF|", justify="right", no_wrap=True)
    table.add_column("first divergence", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    notes = _Notes()
    for r, (label, verdict) in zip(results, section.rows):
        hf = "-" if r.max_dlogit_hf is None else f"{r.max_dlogit_hf:.2e}"
        row = (r.model, r.scheme, f"{r.max_dlogit:.2e}", hf, r.first_divergence_label)
        table.add_row(*row, _word(verdict, notes.mark(label, verdict)))
        if r.hf_note:  # rows HF itself gives NaN on (left out of the HF column), named
            notes.lines.append(f"{r.model}: {r.hf_note}; |cached-HF| judged on the other rows")
    notes.lines.insert(0, f"inputs (every number above): {inputs}; largest |logit difference| over real tokens, "
                          "each position's logits centred over the vocabulary for HF")
    return table, notes


def _fault_table(results, section, title: str):
    from rich.table import Table  # deferred: rich, only when a table is printed

    table = Table(title=title)
    table.add_column("fault", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("expected site", no_wrap=True)
    table.add_column("first divergence", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    notes = _Notes()
    for r, (label, verdict) in zip(results, section.rows):
        table.add_row(r.fault, r.model, r.expected_label, r.found_label, _word(verdict, notes.mark(label, verdict)))
    from interpkv.verify.checks import FAULT_INPUTS  # deferred: torch, transformers (--help answers without)

    notes.lines.insert(0, f"inputs (every row above): {FAULT_INPUTS}")
    return table, notes


def _print_section(console, table_and_notes, section) -> None:
    table, notes = table_and_notes
    console.print(table)
    notes.print(console)
    console.print(f"{section.title}: {section.counts}", markup=False, highlight=False)


def _progress(items: Sequence, run: Callable, description: str, label: Callable = str) -> list:
    """``[run(item) for item in items]``, telling stderr how far it got.

    A terminal gets a transient rich progress bar; anything else (``| tee``,
    CI logs) one plain line per item, ``[i/n] description label``.
    """
    console = _console(stderr=True)
    results = []
    if not console.is_terminal:
        for i, item in enumerate(items, 1):
            print(f"[{i}/{len(items)}] {description} {label(item)}", file=sys.stderr, flush=True)
            results.append(run(item))
        return results
    from rich.progress import (  # deferred: rich, only when a table is printed
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=len(items))
        for item in items:
            progress.update(task, description=f"{description} {label(item)}")
            results.append(run(item))
            progress.advance(task)
    return results


class _Failure(Exception):
    """An error already worded as the one line the user sees (exit 2)."""


def _resolve(models: Sequence[str]) -> List[str]:
    """Zoo names and HF directories as given; raises ValueError (one line) on anything else.

    Cheap on purpose: the zoo's names come from :mod:`interpkv.cli.names`
    (no torch, transformers or TransformerLens import), so a typo answers at once.
    """

    names = zoo_names()
    for model in models:
        if model not in names:
            check_model_dir(model, names)
    return list(models)


def _run_checks(models: Sequence[str], dtype, debug: bool = False, engine: str = "interpkv", built=None) -> list:
    """Each model's check; ``built``: the run's :class:`~interpkv.verify.models.Models` (default: fresh loads)."""
    from interpkv import zoo  # deferred: torch, transformers (--version, --help answer without them)
    from interpkv.verify.checks import (  # deferred: torch, transformers (--version, --help answer without them)
        check_hf_dir,
        check_zoo,
    )

    def one(model: str):
        if engine != "interpkv":
            from interpkv.verify.engine_checks import check_engine  # deferred: torch, transformers

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


def _verdict_line(console, tally) -> None:
    """The run's last line: the one count, the same as the HTML report's header and the exit status."""
    word = tally.word
    console.print(f"verdict: [{_STYLE[word]}]{word}[/{_STYLE[word]}]" + tally.line()[len(word):], highlight=False)
    console.print(f"by section: {tally.breakdown()}", markup=False, highlight=False)


def _check_inputs(dtype_name: str) -> str:
    from interpkv.verify.checks import INPUTS  # deferred: torch, transformers

    return f"{INPUTS}; {dtype_name}"


def _cache_dtype(path: str, dtype_name: Optional[str]) -> str:
    """``check --cache``: the run's dtype, the file's (``--dtype`` may only repeat it)."""
    from interpkv.verify.saved_cache import saved_dtype  # deferred: torch (--help answers without it)

    saved = str(saved_dtype(path)).replace("torch.", "")  # CacheFileError (a ValueError): one line, exit 2
    if dtype_name is not None and dtype_name != saved:
        raise ValueError(f"--cache {path} holds a {saved} cache but --dtype is {dtype_name}: the model must run "
                         f"in the cache's dtype (omit --dtype, or pass --dtype {saved})")
    return saved


def _load_for_cache(model: str, dtype, built, debug: bool):
    """The HookedTransformer ``check --cache`` loads the cache into: the checked zoo model, or the directory's."""
    from interpkv import zoo  # deferred: torch, transformers (--version, --help answer without them)

    if model in zoo.names():
        return built.load(model, dtype)
    try:
        with quiet_hf():
            return zoo.load_hf_dir(model, dtype=dtype)
    except Exception as exc:  # HF / TransformerLens errors run over many lines
        if debug:
            raise
        raise _Failure(load_error(model, exc)) from exc


def _saved_tables(console, saved, section) -> None:
    """``check --cache``: what wrote the cache, then its rows (provenance, continuation) with their notes."""
    from rich.table import Table  # deferred: rich, only when a table is printed

    _print_provenance(console, saved.path, saved.provenance)
    table = Table(title=f"loaded cache in {saved.model}: {saved.batch_size} rows x {saved.seq_len} slots")
    table.add_column("check", overflow="fold")
    table.add_column("verdict", no_wrap=True)
    notes = _Notes()
    for label, verdict in section.rows:
        table.add_row(label, _word(verdict, notes.mark(label, verdict)))
    notes.lines.insert(0, f"continuation: {saved.inputs}")
    _print_section(console, (table, notes), section)


def _check(
    models: Sequence[str], dtype_name: Optional[str], html: Optional[str], debug: bool = False,
    engine: str = "interpkv", cache: Optional[str] = None,
) -> int:
    import torch  # deferred: torch (--version, --help and argument errors answer without it)

    from interpkv import zoo  # deferred: torch, transformers (--version, --help answer without them)
    from interpkv.verify import verdicts  # deferred: torch, transformers
    from interpkv.verify.models import Models  # deferred: torch, transformers

    if cache is not None:
        dtype_name = _cache_dtype(cache, dtype_name)
    dtype_name = dtype_name or "float32"
    dtype = getattr(torch, dtype_name)  # one of DTYPES (argparse checked it)
    console = _console()
    models = list(models) or zoo.names()
    built = Models()  # the model checked is the one the cache is loaded into
    saved = None
    if cache is not None:  # first: a file that does not fit the model fails before the checks run
        from interpkv.verify.saved_cache import check_saved_cache  # deferred: torch, transformers

        target = _load_for_cache(models[0], dtype, built, debug)
        label = models[0] if models[0] in zoo.names() else os.path.basename(os.path.normpath(models[0]))
        saved = _progress([cache], lambda path: check_saved_cache(target, path, label=label), "loading cache")[0]
    results = _run_checks(models, dtype, debug, engine, built=built)
    upstream = {}
    if engine != "interpkv":
        for model, r in zip(models, results):
            found = verdicts.upstream_for(engine, model)
            if found is not None:
                upstream[r.model] = found
    title = "interpkv" if engine == "interpkv" else f"engine {engine}"
    section_title = "checks" if engine == "interpkv" else f"engine {engine} checks"
    tally = verdicts.run_tally(checks=results, upstream=upstream, check_title=section_title, saved=saved)
    table_title = f"{title}: cached vs uncached vs HuggingFace ({dtype_name})"
    _print_section(console, _check_table(results, tally.sections[0], table_title, _check_inputs(dtype_name)),
                   tally.sections[0])
    if saved is not None:
        _saved_tables(console, saved, next(s for s in tally.sections if s.title == "loaded cache"))
    if html:
        from interpkv.cli import html as report  # deferred: torch, transformers

        report.write(html, checks=results, title="interpkv check", command=_command(), dtype=dtype_name,
                     tally=tally, engine=engine, saved=saved)
        console.print(f"report: {html}")
    _verdict_line(console, tally)
    return tally.exit_status


def _fault_label(pair) -> str:
    """``"stale_position_offset on gpt2"`` for a bug-zoo pair (not its tuple repr)."""
    fault, model = pair
    return f"{fault} on {model}"


def _demo(html: Optional[str]) -> int:
    import torch  # deferred: torch (--version, --help and argument errors answer without it)

    from interpkv import zoo  # deferred: torch, transformers (--version, --help answer without them)
    from interpkv.verify import verdicts  # deferred: torch, transformers
    from interpkv.verify.checks import (  # deferred: torch, transformers (--version, --help answer without them)
        BUG_ZOO,
        check_fault,
        check_generation,
    )
    from interpkv.verify.models import Models  # deferred: torch, transformers

    console = _console()
    built = Models()  # each zoo model built once, read by every section below
    checks = _run_checks(zoo.names(), torch.float32, built=built)
    faults = _progress(list(BUG_ZOO), lambda pair: check_fault(*pair, models=built), "bug zoo", _fault_label)
    generation = None
    if GENERATION_MODEL in zoo.trained_names():
        generation = check_generation(GENERATION_MODEL, GENERATION_PROMPT, max_new_tokens=60)
    other = _demo_other_implementations(built)
    tally = verdicts.run_tally(checks=checks, faults=faults, generation=generation, other=other)
    sections = {s.title: s for s in tally.sections}

    zoo_check = sections["zoo check"]
    _print_section(console, _check_table(checks, zoo_check, "interpkv: cached vs uncached vs HuggingFace (float32)",
                                         _check_inputs("float32")), zoo_check)
    _print_section(console, _fault_table(faults, sections["bug zoo"],
                                         "bug zoo: known cache bugs, injected and localized (float64)"),
                   sections["bug zoo"])
    if generation is not None:
        console.print(f"\n[bold]greedy generation, {generation.model}[/bold], prompt {generation.prompt!r}")
        console.print(f"cache on : {generation.prompt + generation.cached!r}", markup=False)
        console.print(f"cache off: {generation.prompt + generation.uncached!r}", markup=False)
        console.print("generation:", _word(sections["generation"].rows[0][1]))
    else:
        console.print("\n(no trained zoo model ships yet: generation demo skipped)")
    _print_other_implementations(console, other, sections)

    if html:
        from interpkv.cli import html as report  # deferred: torch, transformers

        report.write(
            html, checks=checks, faults=faults, generation=generation, other=other, title="interpkv demo",
            command=_command(), dtype="float32", tally=tally,
        )
        console.print(f"report: {html}")
    _verdict_line(console, tally)
    return tally.exit_status


_ARGV: List[str] = []


def _command() -> str:
    """The command line as typed, for the report."""

    return "interpkv " + " ".join(shlex.quote(a) for a in _ARGV)


def _demo_other_implementations(built):
    """Demo section "other implementations": TransformerLens's and HF's own caches, audited on the run's models."""
    from interpkv import zoo  # deferred: torch, transformers (--version, --help answer without them)
    from interpkv.verify import findings as tl_findings  # deferred: torch, transformers
    from interpkv.verify import verdicts  # deferred: torch, transformers
    from interpkv.verify.engine_checks import (  # deferred: torch, transformers (--version, --help answer without them)
        OtherImplementations,
        check_engine,
        engine_faults,
    )

    other = OtherImplementations()
    for engine, models in (("transformer_lens", zoo.names()), ("hf", [n for n in zoo.pairs() if n in zoo.names()])):
        audit = lambda m, e=engine: check_engine(m, e, models=built)  # noqa: E731
        checked = _progress(list(models), audit, f"engine {engine}")
        other.checks += checked
        for model, r in zip(models, checked):
            found = verdicts.upstream_for(engine, model)
            if found is not None:
                other.upstream[r.model] = found
    other.faults = _progress(["engine faults"], lambda _: engine_faults(models=built), "running")[0]
    other.findings = _progress(["TransformerLens findings"], lambda _: tl_findings.all_findings(load_pair=built.pair),
                               "running")[0]
    return other


def _print_other_implementations(console, other, sections) -> None:
    from rich.table import Table  # deferred: rich, only when a table is printed

    from interpkv.verify import findings as tl_findings  # deferred: torch, transformers

    s = sections.get("other engines' caches")
    if s is not None:
        title = "other implementations: their own caches, cached vs uncached (float32)"
        _print_section(console, _check_table(other.checks, s, title, _check_inputs("float32")), s)
    s = sections.get("engine faults")
    if s is not None:
        title = "engine faults: a stored key corrupted in each engine's cache update"
        _print_section(console, _fault_table(other.faults, s, title), s)
    s = sections.get("TransformerLens findings")
    if s is None:
        return
    table = Table(title="TransformerLens 3.x cache findings, checked against HF (teacher forcing)")
    for column in ("finding", "model", "first divergence", "evidence", "verdict"):
        table.add_column(column, no_wrap=not column.startswith("evidence"))
    notes = _Notes()
    for f, (label, verdict) in zip(other.findings, s.rows):
        evidence = "; ".join(f"{k}: {v:.3g}" for k, v in f.evidence.items())
        table.add_row(f.title, f.model, f.site_label, evidence, _word(verdict, notes.mark(label, verdict)))
    notes.lines.insert(0, f"inputs: {tl_findings.INPUTS}")
    _print_section(console, (table, notes), s)


_DESCRIPTION = """\
Check that KV-cached runs compute what uncached runs compute, on tiny built-in
models (the zoo: no download) or on a HuggingFace model directory of yours.
Every row ends in PASS, FAIL or KNOWN UPSTREAM (another library's documented
bug, shown with its reason and reference; it does not fail the run).
"""

_EXAMPLES = """\
examples:
  interpkv check                        every zoo model, float32
  interpkv check llama bloom --dtype float64
  interpkv check ./my-model             a directory written by model.save_pretrained(dir)
  interpkv check gpt2 bloom6 --engine transformer_lens
  interpkv check gpt2 --cache prompt.safetensors   a saved cache: what wrote it, and its continuation
  interpkv provenance prompt.safetensors           what wrote a saved cache (header only, no model)
  interpkv demo --html report.html      everything, with an HTML report

exit status:
  0  nothing FAILed (KNOWN UPSTREAM rows included)
  1  a check FAILed
  2  bad arguments or an error: one line on stderr (--debug shows the traceback)
"""


def _parser():

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="interpkv", description=_DESCRIPTION, epilog=_EXAMPLES, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"interpkv {__version__}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="on an error, show the full traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{check,demo,provenance}")
    check = sub.add_parser(
        "check", help="check models: cached vs uncached vs HuggingFace", parents=[debug], formatter_class=raw,
        description=(
            "For each MODEL, run a left-padded batch (3 rows x 24 tokens) through a KV cache in chunks and\n"
            "uncached, and compare the logits, every hook point, and (with an HF twin) the HF model's logits."
        ),
        epilog=(
            "zoo models (tiny, random weights, built offline):\n  " + ", ".join(zoo_names()) + "\n\n"
            "examples:\n"
            "  interpkv check                        every zoo model, float32\n"
            "  interpkv check llama bloom --dtype float64\n"
            "  interpkv check ./my-model             a directory written by model.save_pretrained(dir)\n"
            "  interpkv check gpt2 bloom6 --engine transformer_lens\n"
            "  interpkv check llama --html report.html\n"
            "  interpkv check gpt2 --cache prompt.safetensors --html report.html\n"
            "      load a cache saved from gpt2: what wrote it (FAIL when it was written under interventions\n"
            "      gpt2 does not have here, e.g. a steering hook), and, when the file's metadata holds its\n"
            "      tokens (cache.save(path, metadata={'tokens': tokens.tolist()})), its continuation vs uncached\n\n"
            + _EXAMPLES.split("\n\n")[1]
        ),
    )
    check.add_argument(
        "models", nargs="*", metavar="MODEL",
        help="a zoo model name (listed below) or a local HF model directory (default: every zoo model)",
    )
    check.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help="precision of both runs (default float32, with --cache the file's; float64 holds the cache to 1e-10; "
        "float16/bfloat16 are judged at their measured tolerances, see interpkv.tolerances)",
    )
    check.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report (opens offline)")
    check.add_argument(
        "--cache", metavar="PATH",
        help=(
            "also load this saved cache (KVCache.save) into the one MODEL: show what wrote it, FAIL when it was "
            "written under interventions MODEL does not have here, and continue it against an uncached run "
            "when the file's metadata holds its tokens"
        ),
    )
    check.add_argument(
        "--engine", choices=["interpkv", "transformer_lens", "hf", "transformer_bridge"], default="interpkv",
        help=(
            "whose cache to check: interpkv's (default), TransformerLens's own past_kv_cache (both need "
            "transformer-lens 3), the HF model's, or a TransformerBridge's own HF cache (transformer-lens 4 or 3.9)"
        ),
    )
    demo = sub.add_parser(
        "demo", help="the whole demo: zoo check, bug zoo, generation, other libraries' caches", parents=[debug],
        formatter_class=raw,
        description=(
            "Runs, offline on CPU (about 12 s of CPU: 15-60 s wall on 2 cores, depending on load):\n"
            "  1. the zoo check of every zoo model (float32), as `interpkv check`;\n"
            "  2. the bug zoo: each known KV-cache bug injected and localized to its hook and position;\n"
            "  3. a greedy generation with the cache on and off (trained character-level llama);\n"
            "  4. TransformerLens's and HF's own caches audited the same way, and TransformerLens findings.\n"
            "Prints one table per section and a final verdict line."
        ),
        epilog="example:\n  interpkv demo --html reports/interpkv-report.html\n\n" + _EXAMPLES.split("\n\n")[1],
    )
    demo.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report (opens offline)")
    shown = sub.add_parser(
        "provenance", help="what wrote a saved KV cache: its provenance, read from the file header (no tensors)",
        parents=[debug], formatter_class=raw,
        description=(
            "Prints, for each span of a saved cache's slots, its positions and the interventions active when it\n"
            "was written (hooks that edited, SAEs, faults, the model's own hooks), and the weights fingerprint.\n"
            "Reads the file header only: no tensor is read and no model is built."
        ),
        epilog=(
            "examples:\n"
            "  interpkv provenance prompt.safetensors\n"
            "  interpkv provenance prompt.safetensors --html provenance.html\n"
            "  interpkv check gpt2 --cache prompt.safetensors   load it into gpt2 and check it\n\n"
            "exit status:\n  0  printed\n  2  not a cache file, or an error: one line on stderr\n"
        ),
    )
    shown.add_argument("path", help="a file written by KVCache.save")
    shown.add_argument("--html", metavar="OUT", help="also write the table as a self-contained HTML page")
    return parser


def _check_cache_arguments(args) -> None:
    """``check --cache PATH``: one MODEL, interpkv's own engine, a file that exists (one line each, before torch)."""
    if len(args.models) != 1:
        raise ValueError(f"--cache {args.cache}: name the one model the cache was saved from "
                         f"(interpkv check MODEL --cache {args.cache}), got {len(args.models)} models")
    if args.engine != "interpkv":
        raise ValueError(f"--cache loads an interpkv KVCache: it runs with --engine interpkv, not {args.engine}")
    if not os.path.exists(args.cache):
        raise ValueError(f"--cache {args.cache}: does not exist (give a file written by cache.save(path))")
    if not os.path.isfile(args.cache):
        raise ValueError(f"--cache {args.cache}: is not a file (give a file written by cache.save(path))")


def _quiet_upstream_logs() -> None:
    """Silence log noise that is not the user's business (the ``kernels`` hub's flash-attention notices on CPU)."""

    for name in ("kernels",):
        logging.getLogger(name).setLevel(logging.ERROR)


def _print_provenance(console, path: str, saved) -> None:
    """What wrote each span of a saved cache (``saved``: its Provenance, None when saved without one)."""
    from rich.table import Table  # deferred: rich, only when a table is printed

    if saved is None:
        console.print(f"{path}: saved without provenance (an earlier interpkv): what wrote it is unknown",
                      markup=False, highlight=False)
        return
    table = Table(title=f"{path}: what wrote each span")
    for column in saved.COLUMNS:
        table.add_column(column, overflow="fold")
    for row in saved.rows():
        table.add_row(*row)
    console.print(table)
    console.print(f"weights fingerprint: {saved.weights}", markup=False, highlight=False)


def _provenance(path: str, html: Optional[str] = None) -> int:
    """Print what wrote a saved cache: its provenance, read from the header (no tensor, no model)."""
    from interpkv.cache import persist  # deferred: torch (--help answers without it)

    saved = persist.read_provenance(path)  # CacheFileError (a ValueError): one line, exit 2
    console = _console()
    _print_provenance(console, path, saved)
    if html:
        from interpkv.cli import html as report  # deferred: torch, transformers

        report.write_provenance(html, path, saved, command=_command())
        console.print(f"report: {html}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``interpkv`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when nothing FAILed, 1 when a check FAILed, 2 on
        bad arguments or an error (one line on stderr; ``--debug`` raises
        instead, showing the traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    args = _parser().parse_args(argv)
    try:
        # Arguments first, before torch/transformers/TransformerLens load: a typo answers at once.
        if args.command == "check":
            _resolve(args.models)
            if args.cache is not None:
                _check_cache_arguments(args)
        if args.html:

            check_writable(args.html)
        if args.command == "provenance":
            return _provenance(args.path, args.html)
    except ValueError as exc:  # CacheFileError too: one line, exit 2
        if args.debug:
            raise
        return _error(str(exc))
    _quiet_upstream_logs()
    from interpkv.cli.runtime import torch_threads, zoo_only  # deferred: runtime imports torch

    # Zoo models are tiny: one intra-op thread (see interpkv.cli.runtime); a user's HF directory keeps the caller's.
    threads = 1 if args.command == "demo" or zoo_only(args.models) else None
    try:
        with torch_threads(threads):
            if args.command == "check":
                return _check(args.models, args.dtype, args.html, args.debug, args.engine, args.cache)
            return _demo(args.html)
    except (_Failure, ValueError) as exc:
        if args.debug:
            raise
        return _error(str(exc))
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        if args.debug:
            raise

        return _error(f"{one_line(exc)} (run again with --debug for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
