"""What :func:`interpkv.forward` returns: TransformerLens's ``return_type`` and ``loss_per_token``.

``return_type`` keeps ``HookedTransformer.forward``'s meanings:

- ``"logits"`` (default): ``[batch, pos, d_vocab]``;
- ``"loss"``: the next-token cross-entropy of the given tokens, as
  TransformerLens's ``lm_cross_entropy_loss``: a scalar averaged over batch
  and positions, or ``[batch, pos - 1]`` with ``loss_per_token=True``;
- ``"both"``: ``Output(logits, loss)``;
- ``None``: nothing (the forward still runs: hooks fire, a cache is appended).

The loss covers the tokens of *this call*: the logits at column ``t`` predict
the token at column ``t + 1``. Through a cache that holds history, that is the
loss of predicting each new token after the first from the one before it; the
first new token's prediction came from the previous call's last logits, which
this call does not have, so it is not in the loss (compute it from those
logits, or feed the last cached token again in a fresh run). A pair is counted
only when both tokens are real (``attention_mask`` 1 at ``t`` and ``t + 1``),
so padding never enters the loss; per-token values there are 0, as
TransformerLens returns them.
"""

from typing import NamedTuple, Optional, Union

import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["Output", "RETURN_TYPES", "check_return_type", "lm_loss", "finish"]

RETURN_TYPES = ("logits", "loss", "both", None)


class Output(NamedTuple):
    """``return_type="both"``: logits and loss (TransformerLens's ``Output`` fields)."""

    logits: Float[Tensor, "batch pos d_vocab"]
    loss: Tensor


def check_return_type(return_type, loss_per_token: bool, logits: str, tokens: Tensor) -> None:
    """Refuse options that cannot keep their meaning, each naming the fix."""
    if return_type not in RETURN_TYPES:
        raise ValueError(
            f'return_type must be "logits", "loss", "both" or None (as TransformerLens), got {return_type!r}'
        )
    if loss_per_token and return_type not in ("loss", "both"):
        raise ValueError(
            f'loss_per_token=True shapes the loss, but return_type={return_type!r} returns none: '
            'pass return_type="loss" or "both"'
        )
    if return_type in ("loss", "both"):
        if logits != "all":
            raise ValueError(
                f'return_type={return_type!r} needs the logits of every position, but logits="last" '
                'keeps only the last: drop logits="last"'
            )
        if tokens.is_floating_point():
            raise ValueError(
                f"return_type={return_type!r} is the loss of the given token ids, but tokens are "
                "embeddings [batch, pos, d_model]: pass token ids, or take the logits and compute it"
            )
        if tokens.shape[-1] < 2:
            raise ValueError(
                f"return_type={return_type!r} needs at least 2 tokens per row (the loss predicts "
                f"token t+1 from token t), got {tokens.shape[-1]}; through a cache, the first new "
                "token is predicted by the previous call's last logits"
            )


def lm_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    per_token: bool = False,
) -> Union[Float[Tensor, ""], Float[Tensor, "batch pos_minus_1"]]:
    """Next-token cross-entropy, as TransformerLens's ``utils.lm_cross_entropy_loss``.

    Args:
        logits: ``[batch, pos, d_vocab]``.
        tokens: ``[batch, pos]``: column ``t + 1`` is the target of logits ``t``.
        mask: ``[batch, pos]``; a pair counts when both its tokens are real.
        per_token: return ``[batch, pos - 1]`` (0 at uncounted pairs) instead of the mean.

    >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    >>> float(lm_loss(logits, torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.long)))
    1.3862943649291992
    """
    log_probs = F.log_softmax(logits, dim=-1)
    predicted = log_probs[:, :-1].gather(dim=-1, index=tokens[:, 1:, None].to(logits.device))[..., 0]
    counted = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)  # (B, T-1)
    predicted = predicted.masked_fill(~counted.to(predicted.device), 0.0)
    if per_token:
        return -predicted
    return -predicted.sum() / counted.sum()


def finish(
    return_type: Optional[str],
    logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    loss_per_token: bool,
):
    """The value :func:`interpkv.forward` returns for ``return_type`` (see the module docstring)."""
    if return_type == "logits":
        return logits
    if return_type is None:
        return None
    loss = lm_loss(logits, tokens, mask, per_token=loss_per_token)
    return loss if return_type == "loss" else Output(logits, loss)
