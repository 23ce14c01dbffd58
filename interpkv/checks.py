"""Equivalence checks behind ``interpkv check``: cached vs uncached vs HuggingFace.

One :class:`CheckResult` per model: the largest logit difference between a
cached run (a left-padded ragged batch fed as a prefill, single tokens and a
random chunk) and an uncached run, and, where the zoo has an HF twin, between
the cached run and the HF model under the same mask.
"""

import dataclasses
import inspect
from typing import List, Optional, Sequence

import torch

from . import _tl
from .cache import KVCache
from .forward import forward
from .positions import absolute_positions

HookedTransformer = _tl.HookedTransformer
PreTrainedModel = "transformers.PreTrainedModel"

__all__ = ["CheckResult", "check_model", "check_zoo", "CACHED_TOL", "HF_TOL"]

# See tests/integration/_parity.py for why these numbers.
CACHED_TOL = {torch.float64: 1e-10, torch.float32: 5e-5}
HF_TOL = {torch.float64: 5e-5, torch.float32: 1e-4}


@dataclasses.dataclass
class CheckResult:
    """Outcome of checking one model.

    Attributes:
        model: zoo name (or a label for a user model).
        scheme: positional scheme description.
        dtype: dtype the check ran in.
        max_dlogit: max |cached - uncached| logit over real positions.
        max_dlogit_hf: max |cached - HF| logit, or None without an HF twin.
        splits: the chunk sizes the cached run used.
    """

    model: str
    scheme: str
    dtype: torch.dtype
    max_dlogit: float
    max_dlogit_hf: Optional[float]
    splits: List[int]

    @property
    def ok(self) -> bool:
        if not self.max_dlogit < CACHED_TOL[self.dtype]:
            return False
        return self.max_dlogit_hf is None or self.max_dlogit_hf < HF_TOL[self.dtype]

    @property
    def verdict(self) -> str:
        return "PASS" if self.ok else "FAIL"


def _inputs(d_vocab: int, length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (3, length), generator=gen)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, : length // 2] = 0
    return tokens, mask


def _hf_logits(hf, tokens, mask):
    kwargs = {"attention_mask": mask}
    if "position_ids" in inspect.signature(hf.forward).parameters:
        zeros = torch.zeros(tokens.shape[0], dtype=torch.long)
        kwargs["position_ids"] = absolute_positions(mask, zeros).clamp(min=0)
    with torch.no_grad():
        return hf(tokens, **kwargs).logits


def check_model(
    model: "HookedTransformer",
    *,
    label: str,
    hf: "Optional[PreTrainedModel]" = None,
    length: int = 24,
    seed: int = 0,
    splits: Sequence[int] = (),
) -> CheckResult:
    """Check one HookedTransformer (and its HF twin, if given).

    Args:
        model: the HookedTransformer.
        label: name shown in reports.
        hf: an HF model computing the same function, or None.
        length: tokens per row.
        seed: seed for the tokens.
        splits: chunk sizes for the cached run (default: a prefill of half,
            three single tokens, then the rest in one chunk).

    Returns:
        A :class:`CheckResult`.
    """
    from .schemes import scheme_for

    tokens, mask = _inputs(model.cfg.d_vocab, length, seed)
    if not splits:
        half = length // 2
        splits = [half, 1, 1, 1, length - half - 3]
    cache = KVCache.for_model(model, tokens.shape[0])
    pieces, start = [], 0
    with torch.no_grad():
        for size in splits:
            end = start + size
            pieces.append(forward(model, tokens[:, start:end], cache=cache, attention_mask=mask[:, start:end]))
            start = end
        cached = torch.cat(pieces, dim=1)
        uncached = forward(model, tokens, attention_mask=mask)
    real = mask.bool()
    max_hf = None
    if hf is not None:
        max_hf = (cached[real] - _hf_logits(hf, tokens, mask)[real]).abs().max().item()
    return CheckResult(
        model=label,
        scheme=scheme_for(model).describe(),
        dtype=model.cfg.dtype,
        max_dlogit=(cached[real] - uncached[real]).abs().max().item(),
        max_dlogit_hf=max_hf,
        splits=list(splits),
    )


def check_zoo(names: Sequence[str] = (), *, dtype: torch.dtype = torch.float32) -> List[CheckResult]:
    """Check the named zoo models (default: all of them)."""
    from . import zoo

    results = []
    for name in names or zoo.names():
        if name in zoo.pairs():
            model, hf = zoo.load_pair(name, dtype=dtype)
        else:
            model, hf = zoo.load(name, dtype=dtype), None
        results.append(check_model(model, label=name, hf=hf))
    return results
