"""``interpkv.hook_positions``: which absolute positions a hook is looking at.

In a cached forward a hook sees only the new positions: ``act[:, -1]`` is the
last *new* token, ``act[:, 1:]`` skips the only token of a decode step, and
``act[:, p]`` is not position ``p``. A hook written against absolute positions
means the same cached or not; this function gives them.
"""

from typing import Optional

import torch
from jaxtyping import Int
from torch import Tensor

from interpkv.core import calls
from interpkv.core import tl as _tl
from interpkv.core.axes import is_attention_hook
from interpkv.core.positions import absolute_positions

__all__ = ["hook_positions"]

def _pos_axis(hook) -> int:
    """1, or 2 for ``[batch, head_index, pos, kv_pos]`` hooks (their query axis)."""
    return 2 if is_attention_hook(getattr(hook, "name", None) or "") else 1


def hook_positions(hook, act: Optional[Tensor] = None) -> Int[Tensor, "batch pos"]:
    """Absolute position of each entry of the activation's ``pos`` axis, ``-1`` for padding.

    Call it inside a hook function. In an interpkv call (:func:`interpkv.forward`,
    ``generate``, ``capture``, ``compare``, ``compare_generation``,
    ``patching.patch``), cached or not, windowed or not, it is the position the
    cache gave each new token (padding takes none); ``act`` is optional and, if
    given, checked against it. In a plain TransformerLens call
    (``model(tokens)``, ``run_with_hooks``, ``model.generate``) pass ``act``: the
    positions are ``0..T-1``, offset by TransformerLens's own ``past_kv_cache``
    and counted over real tokens of its ``attention_mask``, as TransformerLens
    places them. For ``hook_attn_scores`` / ``hook_pattern`` (``[batch, head_index,
    pos, kv_pos]``) the positions are the queries'.

    Inside interpkv calls it allocates nothing: every hook of one forward gets
    the same tensor (do not modify it).

    Args:
        hook: the HookPoint the hook function was called with.
        act: the activation (needed in a plain TransformerLens call).

    Returns:
        ``[batch, pos]`` int64 positions.

    Raises:
        RuntimeError: called outside any forward.
        ValueError: ``act`` has no ``[batch, pos]`` axes matching this call, or
            is missing in a plain TransformerLens call.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("gpt2")
    >>> def steer_from_3(act, hook):  # positions >= 3, whatever the cache holds
    ...     return act + (interpkv.hook_positions(hook) >= 3)[..., None] * 0.5
    >>> g = interpkv.generate(model, torch.tensor([[1, 2]]), max_new_tokens=3,
    ...                       fwd_hooks=[("blocks.0.hook_resid_post", steer_from_3)])
    >>> g.tokens.shape
    torch.Size([1, 5])
    """
    axis = _pos_axis(hook)
    q_pos = calls.current_positions()
    if q_pos is not None:
        if act is not None:
            _check(hook, act, axis, q_pos.shape[0], q_pos.shape[1])
        return q_pos
    found = _tl.forward_locals()
    if found is None:
        raise RuntimeError(
            "interpkv.hook_positions(hook) is only meaningful inside a hook function while a forward "
            "runs (interpkv.forward/generate/capture/compare, or a TransformerLens call)"
        )
    if act is None:
        raise ValueError(
            "inside a plain TransformerLens call hook_positions needs the activation to know its "
            "length: call interpkv.hook_positions(hook, act)"
        )
    batch, n_new = act.shape[0], act.shape[axis]
    return _tl_positions(found, batch, n_new, act.device)


def _check(hook, act: Tensor, axis: int, batch: int, n_new: int) -> None:
    if act.ndim <= axis or act.shape[0] != batch or act.shape[axis] != n_new:
        raise ValueError(
            f"{getattr(hook, 'name', 'this hook')} has an activation of shape {tuple(act.shape)}, but this "
            f"forward has [batch={batch}, pos={n_new}] new positions (axis {axis}): this hook point has no "
            "position axis to give positions for"
        )


def _tl_positions(found: dict, batch: int, n_new: int, device) -> Tensor:
    """Positions as TransformerLens places them, from its forward's own locals.

    By the time any hook fires, ``attention_mask`` there is None (no cache, no
    padding: positions ``0..T-1``) or covers the cached and the new tokens
    (``past_kv_cache.append_attention_mask`` ran first); TransformerLens counts
    positions over its real tokens (``get_offset_position_ids``).
    """
    mask = found.get("attention_mask")
    if mask is None or mask.shape[0] != batch or mask.shape[1] < n_new:
        return torch.arange(n_new, device=device).expand(batch, n_new)
    mask = mask.to(device)
    return absolute_positions(mask, mask.new_zeros(batch))[:, -n_new:]
