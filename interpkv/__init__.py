"""interpkv: position-correct KV caches for TransformerLens.

Importing interpkv only defines names: no patching, no I/O, no torch. The
public names below (``KVCache``, ``forward``, ...) are imported on first
attribute access, all together, leaving the package exactly as an eager
import would (:func:`_load`); ``from interpkv import KVCache`` does that too.
So ``interpkv --version``, ``--help`` and argument errors answer at once, and
torch, transformers and TransformerLens (~5 s of imports, see
docs/performance.md) load only when a command needs them. The submodules
``zoo`` (which imports transformers), ``faults``, ``plot`` and ``patching``
are imported on their own first access.

Layout (see docs/architecture.md), lower layers first: ``errors``,
``tolerances`` and ``_repr`` (notebook summaries); ``core/`` (forward,
attention, positional schemes, per-call routing, the TransformerLens seam) and
``cache/`` (storage, window, persistence); ``diagnostics/`` (record, capture,
diff, compare, engines); ``generation/``, ``patching``, ``faults`` and
``plot``; ``zoo/``; ``verify/`` (the checks behind the CLI); ``cli/``.
No module shares its name with a function exported here.
"""

import importlib
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what _load imports, spelled out for type checkers and the API docs
    from interpkv.cache.kvcache import KVCache
    from interpkv.core.forward import forward
    from interpkv.core.hookpos import hook_positions
    from interpkv.core.positions import absolute_positions
    from interpkv.core.schemes import alibi_slopes
    from interpkv.diagnostics.capture import capture
    from interpkv.diagnostics.compare import compare
    from interpkv.diagnostics.diff import diff
    from interpkv.diagnostics.record import Record
    from interpkv.diagnostics.report import DivergenceReport, Site
    from interpkv.errors import (
        CacheFileError,
        CacheGraphWarning,
        CacheMismatchError,
        CacheSaveError,
        ProvenanceWarning,
        UnsupportedModelError,
    )
    from interpkv.generation import steering
    from interpkv.generation.compare import compare_generation
    from interpkv.generation.generate import generate
    from interpkv.generation.result import Generation, GenerationDiff
    from interpkv.generation.steering import intervention

_LAZY_SUBMODULES = ("zoo", "faults", "plot", "patching")

# Public name -> the module that defines it (the TYPE_CHECKING block above, as data).
_NAMES = {
    "KVCache": "interpkv.cache.kvcache",
    "forward": "interpkv.core.forward",
    "hook_positions": "interpkv.core.hookpos",
    "absolute_positions": "interpkv.core.positions",
    "alibi_slopes": "interpkv.core.schemes",
    "capture": "interpkv.diagnostics.capture",
    "compare": "interpkv.diagnostics.compare",
    "diff": "interpkv.diagnostics.diff",
    "Record": "interpkv.diagnostics.record",
    "DivergenceReport": "interpkv.diagnostics.report",
    "Site": "interpkv.diagnostics.report",
    "CacheFileError": "interpkv.errors",
    "CacheGraphWarning": "interpkv.errors",
    "CacheMismatchError": "interpkv.errors",
    "CacheSaveError": "interpkv.errors",
    "UnsupportedModelError": "interpkv.errors",
    "ProvenanceWarning": "interpkv.errors",
    "compare_generation": "interpkv.generation.compare",
    "generate": "interpkv.generation.generate",
    "Generation": "interpkv.generation.result",
    "GenerationDiff": "interpkv.generation.result",
    "steering": "interpkv.generation",
    "intervention": "interpkv.generation.steering",
}

__all__ = [
    "KVCache",
    "CacheMismatchError",
    "CacheFileError",
    "CacheSaveError",
    "UnsupportedModelError",
    "CacheGraphWarning",
    "ProvenanceWarning",
    "forward",
    "intervention",
    "hook_positions",
    "steering",
    "capture",
    "diff",
    "compare",
    "Record",
    "DivergenceReport",
    "Site",
    "generate",
    "Generation",
    "compare_generation",
    "GenerationDiff",
    "absolute_positions",
    "alibi_slopes",
    *_LAZY_SUBMODULES,
]
__version__ = "0.2.0"

_LOCK = threading.RLock()
_LOADED = False
_LOADING = False


def _load() -> None:
    """Import every public name, in the order the eager ``__init__`` did, and bind them here.

    Afterwards the package holds what an eager import left in it: the names,
    and the subpackages (``cache``, ``core``, ...) their imports bind.
    """
    global _LOADED, _LOADING
    with _LOCK:  # another thread waits here until the names are bound
        if _LOADED or _LOADING:  # _LOADING: a module _load imports asked this package for a name
            return
        _LOADING = True
        try:
            globals().update({name: _from_import(module, name) for name, module in _NAMES.items()})
            _LOADED = True
        finally:
            _LOADING = False


def _from_import(module: str, name: str):
    """``from module import name``: an attribute of the module, else its submodule ``name``."""
    package = importlib.import_module(module)
    try:
        return getattr(package, name)
    except AttributeError:
        return importlib.import_module(f"{module}.{name}")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"interpkv.{name}")
    if not name.startswith("__") and not _LOADED:
        _load()  # a public name, or a subpackage an eager import would have bound
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module 'interpkv' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
