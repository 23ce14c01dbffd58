"""The layout rules of docs/architecture.md, checked on the source tree.

No import cycle between modules (module-level imports;
a lazy import inside a function is not a cycle), at most 15 modules and
subpackages at the package's top level, every module importable by its dotted name as a module
(no function of the same name shadows it), and the core never imports the
fault zoo, plotting, the CLI or the zoo.
"""

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

import interpkv

ROOT = Path(interpkv.__file__).parent
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(interpkv.__path__, "interpkv.") if not m.name.endswith("__main__")
)


def _path(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    package = ROOT / rel / "__init__.py"
    return package if package.exists() else (ROOT / rel).with_suffix(".py")


def _imports(name: str) -> set:
    """Modules of interpkv that ``name`` imports at module level."""
    tree = ast.parse(_path(name).read_text())
    found = set()
    for node in tree.body:  # module level only
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("interpkv.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("interpkv"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return {m for m in found if m in MODULES and m != name}


def test_the_walk_finds_the_layout():
    assert {"interpkv.cache.kvcache", "interpkv.core.forward", "interpkv.diagnostics.compare"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_importable_by_dotted_name_as_a_module(name):
    module = importlib.import_module(name)
    parent, _, leaf = name.rpartition(".")
    assert isinstance(getattr(importlib.import_module(parent), leaf), types.ModuleType), (
        f"{parent}.{leaf} is not the module {name}: a name exported by {parent} shadows it"
    )
    assert isinstance(module, types.ModuleType)


def test_no_import_cycle():
    graph = {name: _imports(name) for name in MODULES}
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


def test_at_most_15_top_level_modules_and_packages():
    # Modules and subpackages only: py.typed is a packaging marker, not part of the layout.
    entries = sorted(p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists())
    assert len(entries) <= 15, entries


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith(("interpkv.core.", "interpkv.cache."))])
def test_core_never_imports_faults_plot_cli_or_zoo(name):
    forbidden = ("interpkv.faults", "interpkv.plot", "interpkv.cli", "interpkv.zoo")
    source = _path(name).read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):  # lazy imports too
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        bad = [t for t in targets if t.startswith(forbidden)]
        assert not bad, f"{name} imports {bad}"
