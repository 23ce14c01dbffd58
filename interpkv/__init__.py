"""interpkv: position-correct KV caches for TransformerLens.

Importing interpkv only defines names: no patching, no I/O, no plotly. The
submodules ``zoo`` (which imports transformers) and the optional extras are
imported on first attribute access.
"""

import importlib

from .cache import CacheMismatchError, KVCache
from .capture import capture
from .diff import DivergenceReport, Site, compare, diff
from .forward import forward
from .gendiff import GenerationDiff
from .generate import Generation, generate
from .generation_diff import compare_generation
from .record import Record
from .positions import absolute_positions
from .schemes import UnsupportedModelError, alibi_slopes

_LAZY_SUBMODULES = ("zoo", "faults", "plot", "patching")

__all__ = [
    "KVCache",
    "CacheMismatchError",
    "UnsupportedModelError",
    "forward",
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
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'interpkv' has no attribute {name!r}")
