"""The training text of the trained zoo models: Python standard-library docstrings.

The text is on every machine that has Python, so training needs no download.
It is built by *parsing* (never importing) every ``.py`` file under
``sysconfig.get_paths()["stdlib"]``, in sorted path order, skipping
``site-packages`` and test packages (any path part named ``test``, ``tests``
or ``idle_test``). For each module, class and function with a docstring it
emits one entry, separated by blank lines::

    # module os.path
    def splitext(p):
        \"\"\"Split the extension from a pathname.
        ...\"\"\"

A module is in the validation split when the first byte of
``sha256(relative path)`` is below 13 (about 5% of modules), so adding or
removing a module in another Python version does not move the others, and no
module contributes to both splits.

Caveat: the text depends on the Python version (docstrings change between
releases, and ``ast.unparse`` of signatures may too). The shipped weights
record the version and the sha256 of both splits; ``tests/data`` keeps a copy
of the validation split so that the recorded loss can be checked on any
Python.
"""

import ast
import hashlib
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["build", "describe", "sha256"]

_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
VALID_THRESHOLD = 13
"""A module is in the validation split when ``sha256(relpath)[0] < VALID_THRESHOLD``."""


def _header(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}:"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
        return f"{prefix} {node.name}({ast.unparse(node.args)}):"
    raise TypeError(type(node).__name__)


def _indent(doc: str) -> str:
    lines = doc.split("\n")
    return "\n".join(("    " + line) if line else "" for line in lines)


def _entries(source: str, module: str) -> List[str]:
    tree = ast.parse(source)
    out = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        out.append(f"# module {module}\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(f'{_header(node)}\n{_indent(chr(34) * 3 + doc + chr(34) * 3)}')
    return out


def _module_files(root: Path) -> List[Tuple[str, Path]]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_PARTS.intersection(rel.parts):
            continue
        files.append((rel.as_posix(), path))
    return sorted(files)


def is_valid_module(relpath: str) -> bool:
    """Whether a stdlib file (path relative to the stdlib root) is in the validation split."""
    return hashlib.sha256(relpath.encode()).digest()[0] < VALID_THRESHOLD


def build(root: Optional[Path] = None) -> Dict[str, str]:
    """Build the corpus from the running Python's standard library.

    Args:
        root: Standard-library directory (default: this interpreter's).

    Returns:
        ``{"train": text, "valid": text}``. Deterministic for a given
        standard library.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    splits: Dict[str, List[str]] = {"train": [], "valid": []}
    for rel, path in _module_files(root):
        try:
            source = path.read_text(encoding="utf-8")
            entries = _entries(source, rel[:-3].replace("/", "."))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # e.g. lib2to3 fixtures in old syntax
        splits["valid" if is_valid_module(rel) else "train"].extend(entries)
    return {k: "\n\n".join(v) + "\n" for k, v in splits.items()}


def sha256(text: str) -> str:
    """Hex sha256 of a text (utf-8), to record which corpus a model saw."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe() -> str:
    """One line saying where the corpus comes from (stored in the weights' json)."""
    v = sys.version_info
    return (
        f"docstrings (ast.get_docstring, clean) of modules, classes and functions parsed from "
        f"the Python {v.major}.{v.minor}.{v.micro} standard library (sorted paths; skipping "
        f"site-packages and test packages), with def/class headers; validation split = modules "
        f"whose sha256(relative path)[0] < {VALID_THRESHOLD}"
    )
