"""The one table of default tolerances, per dtype, with the reason for each number.

Every entry point that judges "equal" reads its default here:

- :data:`SITE`: ``atol = rtol`` of a :class:`~interpkv.DivergenceReport` site test
  (``|a - b| > atol + rtol * max|b|``) for a cached-vs-uncached comparison.
  float32 runs differ by summation order (~1e-6 on the zoo), float64 ones by
  ~1e-14.
- :data:`CACHED_LOGITS`: max-abs logit difference, cached vs uncached forward
  (tests/integration/_parity.py measures the margins).
- :data:`HF_LOGITS`: max-abs logit difference against the HuggingFace model
  (another implementation: other summation orders, other kernels).
- :data:`GENERATION_LOGITS`: a generation step's logits diverged
  (:func:`interpkv.compare_generation`); half precision keeps ~3 digits.

:data:`DEFAULT_ATOL` / :data:`DEFAULT_RTOL` are the defaults of
``DivergenceReport.ok`` and ``first_divergence`` (float32 parity); pass 1e-10
for float64 runs, or use :func:`site_tolerance`.
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
    "generation_atol",
]

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5

SITE: Dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: DEFAULT_ATOL}
CACHED_LOGITS: Dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 5e-5}
HF_LOGITS: Dict[torch.dtype, float] = {torch.float64: 5e-5, torch.float32: 1e-4}
GENERATION_LOGITS: Dict[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.float16: 5e-2,
    torch.bfloat16: 2e-1,
}


def site_tolerance(dtype: torch.dtype) -> float:
    """``atol = rtol`` for a cached-vs-uncached site test in ``dtype``."""
    return SITE.get(dtype, DEFAULT_ATOL)


def generation_atol(dtype: torch.dtype) -> float:
    """The logit tolerance :func:`interpkv.compare_generation` uses for ``dtype``."""
    return GENERATION_LOGITS.get(dtype, 1e-4)
