"""The layout rules of docs/architecture.md, checked on the source tree.

What matters, not sizes (a module is as long as its one concept needs):

- **Direction.** Every module imports only modules of its own layer or a lower
  one (``LAYERS``: errors/tolerances < core, cache < diagnostics < generation,
  patching, faults, plot < zoo < verify < cli). Nothing outside ``cli/``
  imports ``interpkv.cli``.
- **No cycles**, counting imports inside functions. An import inside a
  function is allowed only to defer a heavy dependency, and says which on its
  line (``# deferred: ...``); only the command line defers interpkv modules
  (so ``interpkv --version`` answers before torch loads).
- **Seams.** Only ``core/tl.py`` imports TransformerLens, and it imports nothing
  of interpkv but its version stand-ins (``core/tl_versions.py``, ``errors.py``); only ``zoo/_sae.py`` imports SAELens.
- **Private names stay in their package**: ``_name`` defined in a module of
  package P is used only inside P.
- **Documentation.** Every module is named on docs/architecture.md, and every
  package docstring names its modules.
- Every module is importable by its dotted name as a module (no function of
  the same name shadows it); at most 15 modules and subpackages at the top.
"""

import ast
import importlib
import pkgutil
import re
import sys
import types
from pathlib import Path

import pytest

import interpkv

ROOT = Path(interpkv.__file__).parent
DOCS = ROOT.parent / "docs" / "architecture.md"
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(interpkv.__path__, "interpkv.") if not m.name.endswith("__main__")
)
PACKAGES = ["interpkv"] + sorted(m.name for m in pkgutil.walk_packages(interpkv.__path__, "interpkv.") if m.ispkg)

# Lower layers first; a module may import its own layer and those below it.
LAYERS = [
    ("interpkv.errors", "interpkv.tolerances", "interpkv._repr"),
    ("interpkv.core", "interpkv.cache"),
    ("interpkv.diagnostics",),
    ("interpkv.generation", "interpkv.patching", "interpkv.faults", "interpkv.plot"),
    ("interpkv.zoo",),
    ("interpkv.verify",),
    ("interpkv.cli", "interpkv.__main__"),
]

# Third-party packages an import inside a function may defer (import time or optional installs).
DEFERRABLE = {"transformer_lens", "transformers", "tokenizers", "sae_lens", "plotly", "pandas", "numpy", "rich", "tqdm",
              "safetensors", "torch"}


def _path(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    package = ROOT / rel / "__init__.py"
    return package if package.exists() else (ROOT / rel).with_suffix(".py")


def _is_package(name: str) -> bool:
    return _path(name).name == "__init__.py"


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _import_nodes(name: str):
    """``(node, inside_function)`` for every import of ``name`` (``if TYPE_CHECKING:`` blocks skipped)."""
    tree = ast.parse(_path(name).read_text())
    found = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            walk(child, inner)

    walk(tree, False)
    return found


def _targets(name: str, node) -> list:
    """Dotted names an import node binds (modules where they are modules)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = name.split(".") if _is_package(name) else name.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    out = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        out.append(candidate if candidate in MODULES else base)
    return out


def _interpkv_imports(name: str, *, functions: bool = True) -> set:
    found = set()
    for node, inside in _import_nodes(name):
        if inside and not functions:
            continue
        found |= {t for t in _targets(name, node) if t in MODULES and t != name}
    return found


def _layer(name: str) -> int:
    for rank, group in enumerate(LAYERS):
        if any(name == g or name.startswith(g + ".") for g in group):
            return rank
    raise AssertionError(f"{name} is in no layer of LAYERS: add it to the test and to docs/architecture.md")


def test_the_walk_finds_the_layout():
    assert {"interpkv.cache.kvcache", "interpkv.core.forward", "interpkv.diagnostics.compare",
            "interpkv.cache.persist.cachefile", "interpkv.core.routing", "interpkv.verify.checks"} <= set(MODULES)


@pytest.mark.parametrize("name", [m for m in MODULES if m != "interpkv"])
def test_dependencies_point_down(name):
    mine = _layer(name)
    upward = sorted(t for t in _interpkv_imports(name) if _layer(t) > mine)
    assert not upward, f"{name} (layer {mine}) imports {upward} from a higher layer (LAYERS, docs/architecture.md)"


@pytest.mark.parametrize("name", MODULES)
def test_only_the_cli_imports_the_cli(name):
    if name.startswith("interpkv.cli") or name == "interpkv":
        return
    cli = sorted(t for t in _interpkv_imports(name) if t.startswith("interpkv.cli"))
    assert not cli, f"{name} imports the command line {cli}; move what it needs into the library (interpkv.verify)"


def test_no_import_cycle_counting_imports_inside_functions():
    graph = {name: _interpkv_imports(name) for name in MODULES}
    # Packages import their own modules to re-export names; an edge back to an
    # ancestor package is how Python imports a submodule, not a cycle.
    for name, edges in graph.items():
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in MODULES:
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", MODULES)
def test_imports_inside_functions_only_defer_a_heavy_dependency(name):
    lines = _path(name).read_text().splitlines()
    for node, inside in _import_nodes(name):
        if not inside:
            continue
        source = lines[node.lineno - 1]
        targets = _targets(name, node)
        where = f"{name}:{node.lineno}: {source.strip()}"
        assert "# deferred:" in source, f"{where}: import at module level, or say what it defers (# deferred: ...)"
        for target in targets:
            if target.startswith("interpkv"):
                assert name.startswith("interpkv.cli"), f"{where}: only the command line defers interpkv modules"
            else:
                assert target.split(".")[0] in DEFERRABLE, f"{where}: {target} is not a heavy dependency"


@pytest.mark.parametrize("name", MODULES)
def test_transformer_lens_and_sae_lens_only_behind_their_seams(name):
    imported = set()
    for node, _ in _import_nodes(name):
        imported |= {t.split(".")[0] for t in _targets(name, node)}
    if "transformer_lens" in imported:
        assert name == "interpkv.core.tl", f"{name} imports transformer_lens: go through interpkv.core.tl"
    if "sae_lens" in imported:
        assert name == "interpkv.zoo._sae", f"{name} imports sae_lens: only interpkv.zoo._sae may"
    if name == "interpkv.core.tl":
        # the seam's one dependency: the stand-ins it binds when a TransformerLens name is missing
        # (core/tl_versions.py, which imports no TransformerLens, and the error it raises)
        assert not _interpkv_imports(name) - {"interpkv.core.tl_versions", "interpkv.errors"}, (
            "the TransformerLens seam imports nothing of interpkv but its version stand-ins"
        )


def _package_of(module: str) -> str:
    """The package a name defined in ``module`` belongs to (a package's own names: the package)."""
    return module if _is_package(module) else module.rpartition(".")[0]


@pytest.mark.parametrize("name", MODULES)
def test_private_names_stay_in_their_package(name):
    tree = ast.parse(_path(name).read_text())
    here = name if _is_package(name) else name.rpartition(".")[0]
    bound = {}  # local name -> interpkv module it is
    crossings = []
    for node, _ in _import_nodes(name):
        if isinstance(node, ast.ImportFrom):
            source = _targets(name, node)
            for alias, target in zip(node.names, source):
                if target not in MODULES:
                    continue
                if target.endswith("." + alias.name):  # a module
                    bound[alias.asname or alias.name] = target
                    if alias.name.startswith("_") and not here.startswith(_package_of(target)):
                        crossings.append(target)
                elif alias.name.startswith("_") and not here.startswith(_package_of(target)):
                    crossings.append(f"{target}.{alias.name}")
        else:
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    bound[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            module = bound[node.value.id]
            if node.attr.startswith("_") and not node.attr.startswith("__") and not here.startswith(_package_of(module)):
                crossings.append(f"{module}.{node.attr}")
    assert not crossings, f"{name} uses private names of another package: {sorted(set(crossings))}; promote them"


@pytest.mark.parametrize("name", MODULES)
def test_module_importable_by_dotted_name_as_a_module(name):
    module = importlib.import_module(name)
    if name == "interpkv":
        return
    parent, _, leaf = name.rpartition(".")
    assert isinstance(getattr(importlib.import_module(parent), leaf), types.ModuleType), (
        f"{parent}.{leaf} is not the module {name}: a name exported by {parent} shadows it"
    )
    assert isinstance(module, types.ModuleType)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_is_named_on_architecture_md(name):
    text = DOCS.read_text()
    rel = "/".join(name.split(".")[1:])
    if name == "interpkv":
        return
    wanted = f"{rel}/" if _is_package(name) else f"{rel}.py"
    assert f"`{wanted}`" in text, f"docs/architecture.md does not name `{wanted}` ({name})"


@pytest.mark.parametrize("package", PACKAGES)
def test_package_docstrings_list_their_modules(package):
    doc = importlib.import_module(package).__doc__ or ""
    children = sorted(
        m.name for m in pkgutil.iter_modules([str(_path(package).parent)], package + ".")
        if not m.name.endswith("__main__")
    )
    missing = [
        c for c in children
        if not re.search(rf"(?<![\w.]){re.escape(c)}(?![\w])|``{re.escape(c.rpartition('.')[2])}/?``", doc)
    ]
    assert not missing, f"the docstring of {package} does not name {missing}"


def test_at_most_15_top_level_modules_and_packages():
    # Modules and subpackages only: py.typed is a packaging marker, not part of the layout.
    entries = sorted(p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists())
    assert len(entries) <= 15, entries


def test_the_checks_fail_on_planted_violations(tmp_path, monkeypatch):
    """Each rule above flags a module that breaks it (so none of them passes vacuously)."""
    here = sys.modules[__name__]
    files = {
        "interpkv.core.fake_a": "import transformer_lens\n"
                                "from interpkv.diagnostics.capture import _Secret\n\n"
                                "def f():\n    from interpkv.core import fake_b\n",
        "interpkv.core.fake_b": "from interpkv.verify import checks\nfrom interpkv.core import fake_a\n",
    }
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    real = _path
    monkeypatch.setattr(here, "_path", lambda n: tmp_path / f"{n}.py" if n in files else real(n))
    monkeypatch.setattr(here, "MODULES", sorted(MODULES + list(files)))
    with pytest.raises(AssertionError, match="higher layer"):
        test_dependencies_point_down("interpkv.core.fake_b")
    with pytest.raises(AssertionError, match="deferred"):
        test_imports_inside_functions_only_defer_a_heavy_dependency("interpkv.core.fake_a")
    with pytest.raises(AssertionError, match="transformer_lens"):
        test_transformer_lens_and_sae_lens_only_behind_their_seams("interpkv.core.fake_a")
    with pytest.raises(AssertionError, match="private names"):
        test_private_names_stay_in_their_package("interpkv.core.fake_a")
    with pytest.raises(pytest.fail.Exception, match="import cycle: .*fake_a -> interpkv.core.fake_b"):
        test_no_import_cycle_counting_imports_inside_functions()
