"""interpkv: position-correct KV caches for TransformerLens.

Importing interpkv only defines names: no patching, no I/O, no plotly. The
submodules ``zoo`` (which imports transformers), ``faults``, ``plot`` and
``patching`` are imported on first attribute access.

Layout (see docs/architecture.md): ``cache/`` (storage, window, persistence),
``core/`` (forward, attention, positional schemes, the TransformerLens seam),
``diagnostics/`` (record, capture, diff, compare), ``generation/``, ``cli/``,
``zoo/``, plus ``errors``, ``tolerances``, ``faults``, ``patching`` and ``plot``.
No module shares its name with a function exported here.
"""

import importlib

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
    UnsupportedModelError,
)
from interpkv.generation.compare import compare_generation
from interpkv.generation.generate import generate
from interpkv.generation.result import Generation, GenerationDiff
from interpkv.generation import steering

_LAZY_SUBMODULES = ("zoo", "faults", "plot", "patching")

__all__ = [
    "KVCache",
    "CacheMismatchError",
    "CacheFileError",
    "CacheSaveError",
    "UnsupportedModelError",
    "CacheGraphWarning",
    "forward",
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


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"interpkv.{name}")
    raise AttributeError(f"module 'interpkv' has no attribute {name!r}")
