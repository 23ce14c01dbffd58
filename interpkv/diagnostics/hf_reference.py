"""The HuggingFace reference: an HF causal LM's uncached logits as interpkv numbers positions.

:func:`hf_logits` is the one HF reference of the package and its tests
(:func:`interpkv.verify.checks.check_model`, ``zoo.from_hf``'s conversion check,
the TransformerLens findings, the parity tests); :func:`hf_difference` is how
``interpkv check`` compares against it. It sits with the diagnostics, below
the zoo (whose conversion check reads it) and the verification checks.
"""

import contextlib
import inspect
from typing import Iterator, List, Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interpkv.core.positions import absolute_positions

__all__ = ["hf_logits", "hf_difference", "hf_difference_by_position"]

PreTrainedModel = "transformers.PreTrainedModel"


def hf_logits(
    hf: "PreTrainedModel", tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos d_vocab"]:
    """An HF causal LM's logits on a padded batch, positions as interpkv numbers them.

    HF GPT-2 and others need explicit ``position_ids`` under left padding
    (transformers #18104); they are passed whenever the class accepts them.
    Several HF classes in float64 turn a left-padded row into NaN (0 * NaN
    from fully masked padding queries in ``pattern @ V``): such a row is run
    again alone on its real tokens. MoE experts run eagerly (transformers'
    default ``grouped_mm`` has no float64 kernel).
    """
    with torch.no_grad(), _eager_experts(hf):
        logits = _hf_logits(hf, tokens, mask)
        for row in range(tokens.shape[0]):
            real = mask[row].bool()
            if torch.isnan(logits[row, real]).any():
                alone = tokens[row, real][None]
                logits[row, real] = _hf_logits(hf, alone, torch.ones_like(alone))[0]
    return logits


def _hf_logits(hf, tokens: Tensor, mask: Tensor) -> Tensor:
    kwargs = {"attention_mask": mask}
    if "position_ids" in inspect.signature(hf.forward).parameters:
        zeros = torch.zeros(tokens.shape[0], dtype=torch.long)
        kwargs["position_ids"] = absolute_positions(mask, zeros).clamp(min=0)
    return hf(tokens, **kwargs).logits


@contextlib.contextmanager
def _eager_experts(hf) -> Iterator[None]:
    """Run HF MoE experts eagerly inside the block; the model's setting is restored."""
    experts = getattr(hf.config, "_experts_implementation_internal", None)
    if experts in (None, "eager"):
        yield
        return
    hf.config._experts_implementation_internal = "eager"  # the config every expert reads
    try:
        yield
    finally:
        hf.config._experts_implementation_internal = experts


def hf_difference(
    cached: Float[Tensor, "batch pos d_vocab"],
    reference: Float[Tensor, "batch pos d_vocab"],
    mask: Int[Tensor, "batch pos"],
) -> Tuple[Optional[float], List[int]]:
    """``max |cached - reference|`` over real tokens, leaving out padded rows where HF is NaN.

    Each position's logits are centred over the vocabulary first:
    TransformerLens's ``center_unembed`` (``from_pretrained``'s default) shifts
    them by a constant, which no probability sees.

    A left-padded row whose reference is not finite at a real token is left
    out (returned in the list): HF float64 eager attention gives a fully
    masked padding query NaN, which reaches the row's real tokens through
    zero attention weights (``0 * NaN``). A row *without* padding is never left out, so
    a NaN there still shows (as NaN, failing the check).

    Returns:
        ``(max difference or None when no row is left, left-out rows)``.

    >>> ref = torch.tensor([[[1.0]], [[float("nan")]]])
    >>> hf_difference(torch.ones(2, 1, 1), ref, torch.tensor([[1], [1]]))[1]   # row 1 has no padding
    []
    """
    real = mask.bool()
    broken = (real & ~torch.isfinite(reference).all(dim=-1)).any(dim=1)  # (B,)
    padded = (~real).any(dim=1)
    excused = broken & padded
    keep = real & ~excused[:, None]
    rows = excused.nonzero().flatten().tolist()
    if not keep.any():
        return None, rows
    return (_centred(cached[keep]) - _centred(reference[keep])).abs().max().item(), rows


def _centred(logits: Tensor) -> Tensor:
    return logits - logits.mean(dim=-1, keepdim=True)


def hf_difference_by_position(
    cached: Float[Tensor, "batch pos d_vocab"],
    reference: Float[Tensor, "batch pos d_vocab"],
    mask: Int[Tensor, "batch pos"],
) -> List[float]:
    """:func:`hf_difference` per absolute position (real tokens counted from 0 in each row).

    The largest centred ``|cached - reference|`` over the rows that have a
    token at that position and over the vocabulary; a NaN stays NaN. What a
    failing ``vs HF`` row plots (:func:`interpkv.plot.position_error`).

    >>> hf_difference_by_position(torch.zeros(1, 2, 2), torch.tensor([[[0.0, 0.0], [1.0, -1.0]]]), torch.ones(1, 2))
    [0.0, 1.0]
    """
    real = mask.bool()
    gap = (_centred(cached) - _centred(reference)).abs().amax(dim=-1)  # (B, P)
    by_position: List[float] = []
    for row in range(gap.shape[0]):
        for pos, value in enumerate(gap[row][real[row]].tolist()):  # real tokens in order: positions 0, 1, ...
            if pos == len(by_position):
                by_position.append(value)
            elif not value <= by_position[pos]:  # larger, or NaN (kept)
                by_position[pos] = value if by_position[pos] == by_position[pos] else by_position[pos]
    return by_position
