"""The zoo models of one verification run, each built once and shared by the checks that only read them.

:class:`Models` builds each ``(zoo name, dtype)`` model once per
run and hands the same objects to every section that only *reads* them (the
zoo check, the bug zoo, the engine audits, the engine faults, the findings).
Everything those sections do leaves a model as it was: interpkv calls change
nothing (contract, round 3), a fault (:func:`interpkv.faults.inject`,
:func:`interpkv.verify.engine_faults.inject`) is undone when its block
exits, and TransformerLens runs restore its memoized ALiBi state
(:func:`~interpkv.diagnostics.engines.transformer_lens.isolated_state`). A
section that changes a model on purpose (the stale-ALiBi finding calls it on
a long input first) loads its own with :func:`interpkv.zoo.load`.
``Models(shared=False)`` loads fresh models on every call: what the check
functions use when no run hands them one.
"""

from typing import Dict, Optional, Tuple

import torch

from interpkv import zoo

__all__ = ["Models"]


class Models:
    """Zoo models of one command run, each ``(name, dtype)`` built once (``shared=True``).

    Hand these only to code that leaves a model as it found it (see the module
    docstring); anything that changes a model loads its own.

    >>> models = Models()
    >>> models.load("llama") is models.pair("llama")[0]
    True
    >>> Models(shared=False).load("llama") is Models(shared=False).load("llama")
    False
    """

    def __init__(self, shared: bool = True):
        self.shared = shared
        self._built: Dict[Tuple[str, torch.dtype], tuple] = {}

    def with_twin(self, name: str, dtype: torch.dtype = torch.float32) -> tuple:
        """``(HookedTransformer, HF twin or None)`` of zoo model ``name``."""
        key = (name, dtype)
        if key not in self._built:
            built = zoo.load_pair(name, dtype=dtype) if name in zoo.pairs() else (zoo.load(name, dtype=dtype), None)
            if not self.shared:
                return built
            self._built[key] = built
        return self._built[key]

    def pair(self, name: str, dtype: torch.dtype = torch.float32) -> tuple:
        """``(HookedTransformer, HF model)`` of zoo model ``name`` (as :func:`interpkv.zoo.load_pair`)."""
        if name not in zoo.pairs():
            return zoo.load_pair(name, dtype=dtype)  # raises the zoo's own error
        return self.with_twin(name, dtype)

    def load(self, name: str, dtype: torch.dtype = torch.float32):
        """The HookedTransformer of zoo model ``name`` (the pair's own where it has one)."""
        return self.with_twin(name, dtype)[0]

    @staticmethod
    def of(models: "Optional[Models]") -> "Models":
        """``models``, or fresh loads when a caller hands none (what the check functions default to)."""
        return Models(shared=False) if models is None else models
