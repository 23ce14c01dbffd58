"""The one table of default tolerances, per dtype, with the reason for each number.

Every entry point that judges "equal" reads its default here:

- :data:`SITE`: ``atol = rtol`` of a :class:`~interpkv.DivergenceReport` site test
  (``|a - b| > atol + rtol * max|b|``) for a cached-vs-uncached comparison.
  float32 runs differ by summation order (~1e-6 on the zoo), float64 ones by
  ~1e-14. Half precision: the largest ``max_abs / (1 + max|b|)`` of a clean
  ``compare`` on the zoo (gpt2, llama, bloom, mistral, gemma2, neox; 24 tokens,
  steps 12+1+1+1+9, fast path included) is 2.9e-3 in float16 (eps 9.8e-4) and
  2.9e-2 in bfloat16 (eps 7.8e-3): 2e-2 and 1.5e-1 leave a 5-7x margin, far
  below the O(1) errors of a real cache bug. A report reads the entry of
  its runs' dtype (the coarser of the two), so ``report.ok()`` of a float16
  model is not failed by rounding.
- :data:`CACHED_LOGITS`: max-abs logit difference, cached vs uncached forward
  (tests/integration/_parity.py measures the margins).
- :data:`HF_LOGITS`: max-abs logit difference against the HuggingFace model
  (another implementation: other summation orders, other kernels).
  Half precision (``interpkv check --dtype float16|bfloat16`` over the zoo,
  24 tokens): cached vs uncached at most 1.6e-2 (float16) / 1.3e-1 (bfloat16),
  against HF at most 6.6e-2 / 4.2e-1, except mixtral in bfloat16 at 1.56,
  where a router near-tie rounds to another expert in one implementation;
  :data:`CACHED_LOGITS` 1e-1 / 5e-1 and :data:`HF_LOGITS` 2e-1 / 2.0 sit above
  those with a 3-6x margin.
- :data:`GENERATION_LOGITS`: a generation step's logits diverged
  (:func:`interpkv.compare_generation`); half precision keeps ~3 digits.

:data:`DEFAULT_ATOL` / :data:`DEFAULT_RTOL` are float32's; ``DivergenceReport.ok``
and ``first_divergence`` default to :func:`site_tolerance` of the report's
``dtype`` (set by ``compare`` and ``diff``), these when it is unknown.
"""

from typing import Dict

import torch

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "SITE",
    "CACHED_LOGITS",
    "HF_LOGITS",
    "GENERATION_LOGITS",
    "site_tolerance",
    "coarser",
    "generation_atol",
]

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5

SITE: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: DEFAULT_ATOL,
    torch.float16: 2e-2,
    torch.bfloat16: 1.5e-1,
}
CACHED_LOGITS: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 5e-5,
    torch.float16: 1e-1,
    torch.bfloat16: 5e-1,
}
HF_LOGITS: Dict[torch.dtype, float] = {
    torch.float64: 5e-5,
    torch.float32: 1e-4,
    torch.float16: 2e-1,
    torch.bfloat16: 2.0,
}
GENERATION_LOGITS: Dict[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.float16: 5e-2,
    torch.bfloat16: 2e-1,
}


def site_tolerance(dtype: "torch.dtype | None") -> float:
    """``atol = rtol`` for a cached-vs-uncached site test in ``dtype`` (None: float32's).

    >>> site_tolerance(torch.float64), site_tolerance(torch.bfloat16)
    (1e-10, 0.15)
    """
    return SITE.get(dtype, DEFAULT_ATOL)


def coarser(*dtypes: "torch.dtype | None") -> "torch.dtype | None":
    """Of two runs' dtypes, the one with the larger site tolerance (None if none is known).

    >>> coarser(torch.float64, torch.float16)
    torch.float16
    """
    known = [d for d in dtypes if d is not None]
    return max(known, key=site_tolerance) if known else None


def generation_atol(dtype: torch.dtype) -> float:
    """The logit tolerance :func:`interpkv.compare_generation` uses for ``dtype``."""
    return GENERATION_LOGITS.get(dtype, 1e-4)
