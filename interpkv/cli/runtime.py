"""What one ``interpkv check`` / ``interpkv demo`` run holds: its torch threads and its zoo models.

**Threads.** Zoo models are tiny (d_model <= 256, two or three layers): an
intra-op thread pool only adds hand-off and OpenMP spin-wait time to each
small matmul. On this project's shared 2-core machine, two threads made a
tiny forward 5x slower than one under load, and a whole ``interpkv demo``
took anywhere from 12 s to 110 s depending on what else ran (one thread:
~10 s, steady). :func:`torch_threads` runs a command's zoo models on one
thread and gives the caller's setting back afterwards (``main()`` is also
called in-process, by tests and notebooks). A local HuggingFace directory
can hold a real model, which does use the threads: a run that names one
keeps the caller's setting. One thread is also the most reproducible setting:
a reduction's order does not depend on how a pool splits it.

**Models.** :class:`Models` builds each ``(zoo name, dtype)`` model once per
run and hands the same objects to every section that only *reads* them (the
zoo check, the bug zoo, the engine audits, the engine faults, the findings).
Everything those sections do leaves a model as it was: interpkv calls change
nothing (contract, round 3), a fault (:func:`interpkv.faults.inject`,
:func:`interpkv.diagnostics.engines.faults.inject`) is undone when its block
exits, and TransformerLens runs restore its memoized ALiBi state
(:func:`~interpkv.diagnostics.engines.transformer_lens.isolated_state`). A
section that changes a model on purpose (the stale-ALiBi finding calls it on
a long input first) loads its own with :func:`interpkv.zoo.load`.
``Models(shared=False)`` loads fresh models on every call: what the check
functions use when no run hands them one.
"""

import contextlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

__all__ = ["torch_threads", "zoo_only", "Models"]


def zoo_only(models: Sequence[str]) -> bool:
    """Whether every name is a zoo model (an empty list means the whole zoo).

    >>> zoo_only(["gpt2", "llama"]), zoo_only(["gpt2", "./my-model"]), zoo_only([])
    (True, False, True)
    """
    from interpkv.cli.names import zoo_names

    return all(m in zoo_names() for m in models)


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: leave them), then restore the caller's count."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


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
        from interpkv import zoo

        key = (name, dtype)
        if key not in self._built:
            built = zoo.load_pair(name, dtype=dtype) if name in zoo.pairs() else (zoo.load(name, dtype=dtype), None)
            if not self.shared:
                return built
            self._built[key] = built
        return self._built[key]

    def pair(self, name: str, dtype: torch.dtype = torch.float32) -> tuple:
        """``(HookedTransformer, HF model)`` of zoo model ``name`` (as :func:`interpkv.zoo.load_pair`)."""
        from interpkv import zoo

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
