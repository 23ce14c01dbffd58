"""Every ```python block of README.md and docs/*.md runs.

Blocks of one file run top to bottom in one namespace (a later block may use
what an earlier one defined, as a reader would), offline, in a temporary
working directory so blocks that write files (``cache.save(...)``, reports)
leave the tree clean. Signatures and shell sessions belong in ```text /
```bash blocks, which are not run.
"""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)


def python_blocks(text: str):
    """``(line number, source)`` of each fenced block tagged ``python``."""
    for match in _FENCE.finditer(text):
        if match.group(1) == "python":
            line = text.count("\n", 0, match.start(2)) + 1
            yield line, match.group(2)


def test_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n\n```text\nnot run\n```\n```python\ny = x\n```\n"
    assert list(python_blocks(text)) == [(3, "x = 1\n"), (10, "y = x\n")]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    blocks = list(python_blocks(page.read_text()))
    if not blocks:
        pytest.skip(f"{page.name} has no python block")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    namespace = {"__name__": f"docs_{page.stem}"}
    for line, source in blocks:
        code = compile(source, f"{page.name}:{line}", "exec")
        try:
            exec(code, namespace)
        except Exception as exc:  # name the page and line, keep the traceback
            raise AssertionError(f"{page.relative_to(ROOT)} block at line {line} failed: {exc!r}") from exc
    assert os.getcwd() == str(tmp_path)


_INLINE_CODE = re.compile(r"`[^`\n]*`")
_TEX = re.compile(r"\$\$|\$[^$\s`][^$\n]*\$|\\(frac|theta|text|odot|langle)\b")


def test_no_tex_math_the_site_cannot_render():
    # The site builds and reads offline, without MathJax: formulas are plain
    # text in code spans or ```text blocks, never $...$ left for a renderer.
    config = (ROOT / "mkdocs.yml").read_text()
    assert "arithmatex" not in config or "extra_javascript" in config
    for page in PAGES:
        prose = _INLINE_CODE.sub("", _FENCE.sub("", page.read_text()))
        found = _TEX.search(prose)
        assert found is None, f"{page.name}: TeX {found.group(0)!r} would show raw"


def test_tex_detector_finds_tex():
    assert _TEX.search(r"angle $p\,\theta_i$ here") and _TEX.search("$$ x $$")
    assert not _TEX.search(_INLINE_CODE.sub("", "in code: `$x$`"))


def test_api_reference_lists_the_helpers_researchers_reach_for():
    api = (ROOT / "docs" / "api.md").read_text()
    for name in ("zoo.tokenizer", "zoo.trained_names", "patching.shared_prefix_length"):
        assert f"::: interpkv.{name}\n" in api, name


def test_notebook_lists_name_every_notebook():
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    for page in (ROOT / "README.md", ROOT / "docs" / "cli.md"):
        text = page.read_text()
        numbers = [n.split("_")[0] for n in notebooks]  # "01", "02", ...
        missing = [nn for nn in numbers if not re.search(rf"\b{nn}[_ ]", text)]
        assert not missing, f"{page.name} does not mention notebooks {missing}"


def test_landing_page_says_how_to_install_and_open_the_notebooks():
    # docs/index.md: an install line with and without the dev extras, and a way to open notebooks/;
    # every extra it names exists in setup.cfg (a renamed extra would make the line fail).
    import configparser

    page = (ROOT / "docs" / "index.md").read_text()
    shell = "\n".join(src for lang, src in _FENCE.findall(page) if lang == "bash")
    assert re.search(r"^pip install -e \.\s", shell, re.M), "no plain install line"
    extras = set(re.findall(r'pip install -e "\.\[(\w+)\]"', shell))
    assert {"dev", "notebooks"} <= extras, extras
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    declared = set(config["options.extras_require"])
    assert extras <= declared, f"docs/index.md names extras {extras - declared} that setup.cfg does not declare"
    assert "jupyterlab" in config["options.extras_require"]["notebooks"]
    assert "jupyter lab notebooks/" in shell
    assert len(list(python_blocks(page))) == 1, "the landing page has one example, run by test_python_blocks_run"
