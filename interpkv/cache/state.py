"""Checks that a cache's public state fits a model, for :meth:`KVCache.from_state`.

The state is what any cache exposes: per layer ``keys`` / ``values``
``[batch, kv_head, kv_pos, d_head]`` (``cache.layers[i].view(cache.seq_len)``),
``positions`` ``[batch, kv_pos]`` and ``next_positions`` ``[batch]``.
"""

from typing import Sequence

import torch
from torch import Tensor

from interpkv.core import tl as _tl
from interpkv.errors import CacheMismatchError

__all__ = ["check_state"]


def _describe(t) -> str:
    if not isinstance(t, Tensor):
        return f"a {type(t).__name__}"
    return f"{t.dtype} {list(t.shape)} on {t.device}"


def check_state(
    model: "_tl.HookedTransformer",
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    positions: Tensor,
    next_positions: Tensor,
) -> None:
    """Raise :class:`CacheMismatchError` unless the state fits ``model``.

    Every message names what was given, what ``model`` needs, and the fix.
    """
    cfg = model.cfg
    device = torch.device(cfg.device) if cfg.device is not None else torch.device("cpu")
    if not (isinstance(positions, Tensor) and positions.dtype == torch.long and positions.ndim == 2
            and positions.shape[0] >= 1):
        raise CacheMismatchError(
            f"positions must be an int64 [batch, kv_pos] tensor with batch >= 1, got "
            f"{_describe(positions)}; pass cache.positions"
        )
    batch, length = positions.shape
    if not (isinstance(next_positions, Tensor) and next_positions.dtype == torch.long
            and tuple(next_positions.shape) == (batch,)):
        raise CacheMismatchError(
            f"next_positions must be an int64 [{batch}] tensor (one per row of positions), "
            f"got {_describe(next_positions)}; pass cache.next_positions"
        )
    if len(keys) != cfg.n_layers or len(values) != cfg.n_layers:
        raise CacheMismatchError(
            f"{len(keys)} key and {len(values)} value tensors for a {cfg.n_layers}-layer model; "
            "pass one of each per layer"
        )
    shape = (batch, _tl.kv_head_count(cfg), length, int(cfg.d_head))
    for layer, pair in enumerate(zip(keys, values)):
        for what, t in zip(("keys", "values"), pair):
            if not (isinstance(t, Tensor) and tuple(t.shape) == shape and t.dtype == cfg.dtype):
                raise CacheMismatchError(
                    f"layer {layer} {what} are {_describe(t)} but this model and positions "
                    f"{list(positions.shape)} need {cfg.dtype} {list(shape)} "
                    "([batch, kv_head, kv_pos, d_head], keys after rotary, kv heads not repeated)"
                )
            if t.device.type != device.type:
                raise CacheMismatchError(
                    f"layer {layer} {what} are on {t.device} but the model runs on {device}; "
                    f"move them with .to({str(device)!r})"
                )
    for what, t in (("positions", positions), ("next_positions", next_positions)):
        if t.device.type != device.type:
            raise CacheMismatchError(
                f"{what} are on {t.device} but the model runs on {device}; "
                f"move them with .to({str(device)!r})"
            )
