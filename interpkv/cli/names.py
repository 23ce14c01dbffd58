"""The zoo's model names, known without importing torch, transformers or TransformerLens.

``interpkv check lama`` (a typo) must answer at once: importing
:mod:`interpkv.zoo` costs ~5 s of torch/transformers/TransformerLens imports
(7 s CPU, 50 s wall on a busy machine before this module). The names live in
``interpkv/zoo/_specs.py``, a module of plain dataclasses with no heavy
import; importing it normally would run ``interpkv/zoo/__init__.py`` (torch)
first, so it is loaded here on its own, from its file. One source of truth:
``tests/integration/test_cli_speed.py`` checks these are ``zoo.names()`` and
``zoo.pairs()``.
"""

import functools
import importlib.util
import os
import sys
from typing import Tuple

__all__ = ["zoo_names", "zoo_pairs"]

_SPECS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zoo", "_specs.py")


@functools.lru_cache(maxsize=1)
def _specs() -> dict:
    loaded = sys.modules.get("interpkv.zoo._specs")  # already imported with the zoo: use it
    if loaded is None:
        spec = importlib.util.spec_from_file_location("interpkv_cli_zoo_specs", _SPECS_FILE)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded  # dataclasses looks its module up while building the class
        try:
            spec.loader.exec_module(loaded)
        finally:
            del sys.modules[spec.name]
    return loaded.SPECS


def zoo_names() -> Tuple[str, ...]:
    """Every zoo model name, in the zoo's order (``interpkv.zoo.names()``, without its imports).

    >>> "llama" in zoo_names() and "lama" not in zoo_names()
    True
    """
    return tuple(_specs())


def zoo_pairs() -> Tuple[str, ...]:
    """Zoo models with an HF twin (``interpkv.zoo.pairs()``, without its imports)."""
    return tuple(n for n, s in _specs().items() if s.hf_config_class is not None)
