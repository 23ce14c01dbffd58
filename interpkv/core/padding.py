"""Token ids with pad runs and no mask: the mask TransformerLens would use, or None.

TransformerLens's ``model(tokens)`` computes an attention mask from the
tokenizer when none is given (``utils.get_attention_mask``): the leading run
of pad ids of each row when the tokenizer pads on the left (keeping the last
one as BOS where pad == BOS and the model prepends BOS), the trailing run when
it pads on the right. interpkv does the same for ids that start a
computation (no cache, or an empty one), so a tensor from
``model.to_tokens([...])`` is never read with its pads as text. A chunk that
continues a cache is never guessed at: its leading pad ids are tokens of the
text (an inferred mask there would need a host sync per decode step too).
Without a tokenizer there is no pad id, and ids are ids.
"""

from typing import Optional

from jaxtyping import Int
from torch import Tensor

__all__ = ["inferred_mask"]


def inferred_mask(model, ids: Int[Tensor, "batch pos"]) -> Optional[Int[Tensor, "batch pos"]]:
    """The mask TransformerLens infers for ``ids``, or None when every id counts as real.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("llama", trained=True)  # pads on the left with id 96
    >>> inferred_mask(model, torch.tensor([[96, 96, 5], [4, 96, 5]])).tolist()
    [[0, 0, 1], [1, 1, 1]]
    >>> inferred_mask(model, torch.tensor([[4, 5, 6]])) is None
    True
    """
    tokenizer = getattr(model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        return None
    is_pad = ids == pad  # (B, T)
    if not bool(is_pad.any()):
        return None
    if getattr(tokenizer, "padding_side", "left") == "right":
        padding = is_pad.flip(-1).long().cumprod(-1).flip(-1).bool()  # trailing run
    else:
        padding = is_pad.long().cumprod(-1).bool()  # leading run
        if getattr(model.cfg, "default_prepend_bos", False) and getattr(tokenizer, "bos_token_id", None) == pad:
            # The last pad of the run is the row's BOS (TransformerLens keeps it).
            rows = padding.any(-1).nonzero().flatten()
            padding[rows, padding[rows].sum(-1) - 1] = False
    if not bool(padding.any()):
        return None
    return (~padding).long()
