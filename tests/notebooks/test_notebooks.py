"""Every notebook in ``notebooks/`` runs top to bottom, offline, on CPU.

The kernel is this interpreter: a temporary kernelspec points ``argv`` at
``sys.executable`` (so the venv's ipykernel and the interpkv under test are
used, whatever kernels the machine has registered), with one torch thread
and the hub switched off. Committed notebooks carry no outputs.
"""

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (pip install -e '.[dev]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (pip install -e '.[dev]')")
pytest.importorskip("ipykernel", reason="ipykernel not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ALL_NOTEBOOKS = sorted((ROOT / "notebooks").rglob("*.ipynb"))  # including notebooks/pending/
TIME_LIMIT = 120  # seconds per notebook on a shared 2-core CPU (the brief's budget)
KERNEL = "interpkv-test"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, monkeypatch_module):
    """A kernelspec ``interpkv-test`` running this Python, found through JUPYTER_PATH."""
    spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "interpkv (test)",
        "language": "python",
        "env": env,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    paths = [str(spec_dir.parents[1]), os.environ.get("JUPYTER_PATH", "")]
    monkeypatch_module.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, paths)))
    return KERNEL


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:3] == ["01_quickstart.ipynb", "02_positional_schemes.ipynb", "03_bug_zoo.ipynb"]


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=[p.stem for p in ALL_NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_env):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_env,
        timeout=TIME_LIMIT,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - start
    assert elapsed < TIME_LIMIT, f"{path.name} took {elapsed:.0f}s (budget {TIME_LIMIT}s)"
    noisy = [
        i
        for i, cell in enumerate(nb.cells)
        for out in cell.get("outputs", [])
        if out.get("name") == "stderr" and re.search(r"TqdmWarning|IProgress not found|Traceback", out.get("text", ""))
    ]
    assert not noisy, f"{path.name}: cells {noisy} print warnings a reader should not see"
    ours = [
        (i, found.group(0))
        for i, cell in enumerate(nb.cells)
        for out in cell.get("outputs", [])
        if out.get("name") == "stderr" and (found := _INTERPKV_WARNING.search(out.get("text", "")))
    ]
    assert not ours, f"{path.name}: the notebook triggers interpkv's own warnings (follow their advice): {ours}"


def _interpkv_warning_names() -> list:
    """Every warning class interpkv defines (CacheGraphWarning, ...), found in its sources."""
    names = set()
    for source in (ROOT / "interpkv").rglob("*.py"):
        names.update(re.findall(r"^class (\w+Warning)\(", source.read_text(encoding="utf-8"), re.M))
    return sorted(names)


# A warning printed by warnings.showwarning: "<file>:<line>: <Category>: <message>".
_INTERPKV_WARNING = re.compile(
    r"\b(" + "|".join(_interpkv_warning_names()) + r")\b|interpkv[/\\][^\n]*:\d+: \w*Warning:"
)


def test_the_warning_detector_sees_interpkv_warnings():
    assert "CacheGraphWarning" in _interpkv_warning_names()
    line = "/tmp/ipykernel_1/123.py:7: CacheGraphWarning: forward through a cache with grad enabled\n"
    assert _INTERPKV_WARNING.search(line)
    assert _INTERPKV_WARNING.search("/x/interpkv/cache/kvcache.py:12: UserWarning: something\n")
    assert not _INTERPKV_WARNING.search("/x/transformers/utils.py:12: FutureWarning: something\n")
