"""``import interpkv`` defines names only; the first use imports them all, as an eager import would.

What ``interpkv/__init__.py`` promises: importing the package (and so
``interpkv --version``, ``--help`` and argument errors) loads none of torch,
transformers, TransformerLens, pandas, plotly or SAELens; the first access to
a public name binds every public name and the subpackages their imports bind,
from any number of threads at once. Speed is measured in docs/performance.md,
never here.
"""

import ast
import subprocess
import sys
from pathlib import Path

import interpkv

HEAVY = ("torch", "transformers", "transformer_lens", "pandas", "plotly", "sae_lens", "datasets", "rich")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_interpkv_and_the_cli_loads_nothing_heavy():
    code = (
        "import sys\n"
        "from interpkv.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert _run(code).splitlines()[-1] == "[]"


def test_first_access_from_many_threads_binds_what_an_eager_import_did():
    code = (
        "import threading, interpkv\n"
        "seen = []\n"
        "threads = [threading.Thread(target=lambda: seen.append(interpkv.KVCache)) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "from interpkv.cache.kvcache import KVCache\n"
        "print(len(seen), all(s is KVCache for s in seen))\n"
        "print(sorted(k for k in ('cache', 'core', 'diagnostics', 'generation', 'errors', 'tolerances')"
        " if k in vars(interpkv)))\n"
    )
    count, bound = _run(code).splitlines()[-2:]
    assert count == "4 True"
    assert bound == "['cache', 'core', 'diagnostics', 'errors', 'generation', 'tolerances']"


def test_every_public_name_is_the_object_its_module_defines():
    import importlib

    for name, module in interpkv._NAMES.items():
        value = getattr(interpkv, name)
        source = importlib.import_module(module)
        assert value is getattr(source, name), name
    assert set(interpkv.__all__) == set(interpkv._NAMES) | set(interpkv._LAZY_SUBMODULES)
    assert set(interpkv.__all__) <= set(dir(interpkv))


def test_the_type_checking_imports_spell_out_the_same_names():
    tree = ast.parse(Path(interpkv.__file__).read_text())
    guard = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    spelled = {a.name: node.module for node in guard.body for a in node.names}
    assert spelled == interpkv._NAMES
