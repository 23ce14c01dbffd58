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
