"""The command line answers at once where it can, says how it is used, and stays readable in logs.

- A typo'd model name or a missing directory is refused before torch,
  transformers or TransformerLens load: measured here in a fresh interpreter
  (the bound is generous for a loaded 2-core machine; docs/cli.md has the figure).
- ``--help`` texts carry examples and exit codes; ``check --help`` lists the zoo.
- Progress on a stderr that is not a terminal is plain lines, one per item.
- Upstream log noise (the ``kernels`` hub's flash-attention notices) is silenced.
"""

import io
import logging
import subprocess
import sys
import time

import pytest

from interpkv import zoo
from interpkv.cli import app as cli
from interpkv.cli.names import zoo_names, zoo_pairs

HEAVY = ("torch", "transformers", "transformer_lens", "plotly", "rich")
TYPO_BOUND = 5.0  # seconds, wall, whole interpreter start included: measured ~0.15 s (docs/cli.md)


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["check", "lama"], ["check", "./no/such/dir"], ["check", "gpt2", "lama"]],
                         ids=["typo", "missing-dir", "typo-after-a-good-name"])
def test_a_bad_model_argument_answers_before_anything_heavy_loads(argv):
    code = (
        "import sys, time\n"
        "start = time.perf_counter()\n"
        "from interpkv.cli import main\n"
        f"status = main({argv!r})\n"
        "print('elapsed', time.perf_counter() - start)\n"
        f"print('heavy', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print('status', status)\n"
    )
    start = time.perf_counter()
    done = _fresh(code)
    wall = time.perf_counter() - start
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["status"] == "2" and lines["heavy"] == "[]", done.stdout + done.stderr
    assert done.stderr.startswith("interpkv: error: ") and len(done.stderr.strip().splitlines()) == 1
    assert wall < TYPO_BOUND, f"{argv}: {wall:.2f}s wall (in-process {float(lines['elapsed']):.2f}s)"


def test_a_typo_gets_a_suggestion():
    done = _fresh("from interpkv.cli import main; main(['check', 'lama'])")
    assert "did you mean 'llama'?" in done.stderr


def test_the_zoo_names_without_imports_are_the_zoos():
    assert list(zoo_names()) == zoo.names() and list(zoo_pairs()) == zoo.pairs()


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_has_examples_and_exit_codes(capsys):
    top = _help(capsys)
    assert "examples:" in top and "interpkv check llama bloom --dtype float64" in top
    assert "exit status:" in top and "  1  a check FAILed" in top and "  2  bad arguments" in top
    assert "``" not in top  # no raw reST
    check = _help(capsys, "check")
    assert "examples:" in check and "exit status:" in check
    assert ", ".join(zoo.names()) in check  # the zoo, by name
    assert "precision of both runs" in check  # --dtype has help
    demo = _help(capsys, "demo")
    assert "bug zoo" in demo and "about 12 s of CPU" in demo and "example:" in demo


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    results = cli._progress([("stale_position_offset", "gpt2"), ("alibi_unsliced", "bloom")], lambda p: p[0],
                            "bug zoo", cli._fault_label)
    assert results == ["stale_position_offset", "alibi_unsliced"]
    assert err.getvalue().splitlines() == [
        "[1/2] bug zoo stale_position_offset on gpt2",
        "[2/2] bug zoo alibi_unsliced on bloom",
    ]


def test_upstream_log_noise_is_silenced(capsys, monkeypatch):
    monkeypatch.setattr(logging.getLogger("kernels"), "level", logging.NOTSET)
    cli._quiet_upstream_logs()
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'x'")
    finally:
        logging.getLogger().removeHandler(handler)
    assert "Skipping publisher" not in capsys.readouterr().err
