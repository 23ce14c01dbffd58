"""``interpkv.hook_positions``: which absolute positions a hook is looking at.

In a cached forward a hook sees only the new positions: ``act[:, -1]`` is the
last *new* token, ``act[:, 1:]`` skips the only token of a decode step, and
``act[:, p]`` is not position ``p``. A hook written against absolute positions
means the same cached or not; this function gives them.
"""

import re
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
    return _tl_positions(found, batch, n_new, act.device, getattr(hook, "name", None) or "")


def _check(hook, act: Tensor, axis: int, batch: int, n_new: int) -> None:
    if act.ndim <= axis or act.shape[0] != batch or act.shape[axis] != n_new:
        raise ValueError(
            f"{getattr(hook, 'name', 'this hook')} has an activation of shape {tuple(act.shape)}, but this "
            f"forward has [batch={batch}, pos={n_new}] new positions (axis {axis}): this hook point has no "
            "position axis to give positions for"
        )


def _tl_positions(found: dict, batch: int, n_new: int, device, name: str = "") -> Tensor:
    """Positions as TransformerLens places them, from its forward's own locals.

    By the time any hook fires, ``attention_mask`` there is None or covers the
    cached and the new tokens (``past_kv_cache.append_attention_mask`` ran
    first); TransformerLens counts positions over its real tokens
    (``get_offset_position_ids``). None with a ``past_kv_cache`` is
    TransformerLens's own cached ``generate`` on a model without a tokenizer
    (it calls ``forward(residual, start_at_layer=0, past_kv_cache=...)`` with
    no mask): positions then continue after the cache's length before this
    call (:func:`_tl_cache_offset`), as its ``get_pos_offset`` places them.
    """
    mask = found.get("attention_mask")
    if mask is None or mask.shape[0] != batch or mask.shape[1] < n_new:
        offset = _tl_cache_offset(found, n_new, name)
        return (offset + torch.arange(n_new, device=device)).expand(batch, n_new)
    mask = mask.to(device)
    return absolute_positions(mask, mask.new_zeros(batch))[:, -n_new:]


_BEFORE_APPEND = re.compile(
    r"^blocks\.\d+\.(hook_resid_pre|ln1\.|hook_[qkv]_input|attn\.hook_[qkv]$|attn\.[qk]_norm\.)"
)
"""Hooks of a block that fire before its attention appends to TransformerLens's cache entry."""


def _tl_cache_offset(found: dict, n_new: int, name: str) -> int:
    """Tokens TransformerLens's ``past_kv_cache`` held before the running forward (0 without one).

    Each block appends its new keys to its own entry, so while block ``i``
    runs (``i`` is the forward's loop variable), entries after ``i`` still
    have the old length and entries before it the old length plus ``n_new``.
    ``input_to_embed`` computed ``pos_offset`` itself.
    """
    if "pos_offset" in found:  # input_to_embed's frame
        return int(found["pos_offset"])
    cache = found.get("past_kv_cache")
    if cache is None:
        return 0
    entries = list(getattr(cache, "entries", cache))
    lengths = [int(entry.past_keys.shape[1]) for entry in entries]
    if not lengths or getattr(cache, "frozen", False):
        return lengths[0] if lengths else 0
    layer = found.get("i")
    last = len(lengths) - 1
    if layer is None:  # no block ran yet
        return lengths[last]
    if layer < last:
        return lengths[last]  # not appended yet
    if last > 0:
        return lengths[0] - n_new  # the first block appended already
    return lengths[0] - (0 if _BEFORE_APPEND.match(name) else n_new)  # one block: before or after its append
