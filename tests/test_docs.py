"""The documentation site builds with ``mkdocs build --strict``.

Strict mode turns every warning into a failure: a broken link, a page missing
from the nav, an API entry (``::: interpkv.x``) naming something that does not
exist, a docstring mkdocstrings cannot parse. Built into a temporary directory
so the tree stays clean.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mkdocs", reason="mkdocs not installed (pip install -e '.[docs]')")
pytest.importorskip("mkdocstrings", reason="mkdocstrings not installed (pip install -e '.[docs]')")


def nav_pages(nav):
    for entry in nav:
        for value in entry.values():
            if isinstance(value, list):
                yield from nav_pages(value)
            else:
                yield value


def load_mkdocs_yml():
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may use !!python/name tags (pymdownx options); ignore them here.
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def test_every_page_is_in_the_nav():
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == set(nav_pages(load_mkdocs_yml()["nav"]))


def test_every_public_name_has_an_api_entry():
    import interpkv

    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: interpkv\.(\w+)", api, flags=re.M))
    modules = {"zoo", "faults", "plot", "patching"}
    missing = [n for n in interpkv.__all__ if n not in documented and n not in modules]
    assert not missing, f"add '::: interpkv.<name>' entries to docs/api.md for {missing}"
    for module in modules & set(interpkv.__all__):
        assert f"::: interpkv.{module}." in api, f"docs/api.md documents nothing of interpkv.{module}"


def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env["NO_MKDOCS_2_WARNING"] = "1"
    mkdocs = [sys.executable, "-m", "mkdocs"]
    done = subprocess.run(
        mkdocs + ["build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "cli" / "index.html").exists()
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert 'id="interpkv.compare"' in api and 'id="interpkv.verify.checks.check_model"' in api
