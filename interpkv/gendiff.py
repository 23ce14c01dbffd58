"""``GenerationDiff``: per-step agreement of two generations of the same prompt.

Produced by :func:`interpkv.compare_generation` (cached against uncached greedy
generation) and consumed by ``interpkv.plot.generation``. A plain dataclass,
so any generation loop can build one.

NOTE: placeholder written on branch ``generation`` because the version owned
by branch ``capture`` was not on main yet. Same four fields; when the two
meet, keep ``capture``'s file (``compare_generation`` only relies on the
four fields below, passed by keyword).
"""

from dataclasses import dataclass
from typing import List, Optional

__all__ = ["GenerationDiff"]


@dataclass
class GenerationDiff:
    """Per generated step (step 0 is the first new token), worst row of the batch.

    Attributes:
        logits_max_abs: ``max |a - b|`` over the step's next-token logits.
        kl: ``KL(softmax(b) || softmax(a))`` of the step's next-token
            distribution, ``b`` being the reference.
        top1_agree: True when every row's argmax token is the same in both.
        first_divergent_step: first step whose ``logits_max_abs`` passed the
            tolerance it was computed with, or whose top-1 tokens differ; None
            if there is none.
    """

    logits_max_abs: List[float]
    kl: List[float]
    top1_agree: List[bool]
    first_divergent_step: Optional[int]

    def ok(self, atol: float = 1e-5) -> bool:
        """True when every step's logits agree within ``atol`` and every top-1 token agrees."""
        return all(m <= atol for m in self.logits_max_abs) and all(self.top1_agree)
