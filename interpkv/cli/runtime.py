"""What one ``interpkv check`` / ``interpkv demo`` run holds: its torch threads.

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

**Models.** The zoo models a run shares are
:class:`interpkv.verify.models.Models` (built once per run; ``app`` makes one).
"""

import contextlib
from typing import Iterator, Optional, Sequence

import torch

__all__ = ["torch_threads", "zoo_only"]


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
