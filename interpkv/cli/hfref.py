"""The HuggingFace reference of ``interpkv check``: HF logits, and how they are compared.

An HF twin computes the same function as the converted HookedTransformer, so
its logits on the same left-padded batch are the check's outside reference.
"""

import inspect
from typing import List, Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interpkv.core.positions import absolute_positions

__all__ = ["hf_logits", "hf_difference"]

PreTrainedModel = "transformers.PreTrainedModel"


def hf_logits(
    hf: "PreTrainedModel", tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos d_vocab"]:
    """An HF causal LM's logits on a padded batch, positions as interpkv numbers them.

    HF GPT-2 and others need explicit ``position_ids`` under left padding
    (transformers #18104); they are passed whenever the class accepts them.
    """
    kwargs = {"attention_mask": mask}
    if "position_ids" in inspect.signature(hf.forward).parameters:
        zeros = torch.zeros(tokens.shape[0], dtype=torch.long)
        kwargs["position_ids"] = absolute_positions(mask, zeros).clamp(min=0)
    with torch.no_grad():
        return hf(tokens, **kwargs).logits


def hf_difference(
    cached: Float[Tensor, "batch pos d_vocab"],
    reference: Float[Tensor, "batch pos d_vocab"],
    mask: Int[Tensor, "batch pos"],
) -> Tuple[Optional[float], List[int]]:
    """``max |cached - reference|`` over real tokens, leaving out padded rows where HF is NaN.

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
    return (cached[keep] - reference[keep]).abs().max().item(), rows
