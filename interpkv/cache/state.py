"""Checks that a cache's public state fits a model, for :meth:`KVCache.from_state`.

The state is what any cache exposes: per layer ``keys`` / ``values``
``[batch, kv_head, kv_pos, d_head]`` (``cache.layers[i].view(cache.seq_len)``),
``positions`` ``[batch, kv_pos]`` and ``next_positions`` ``[batch]``.
"""

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interpkv.cache.layer import LayerCache
from interpkv.core import tl as _tl
from interpkv.errors import CacheMismatchError

if TYPE_CHECKING:
    import interpkv

__all__ = ["check_state", "build_from_state"]


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


def build_from_state(
    cls,
    model: "_tl.HookedTransformer",
    keys: Sequence[Float[Tensor, "batch kv_head kv_pos d_head"]],
    values: Sequence[Float[Tensor, "batch kv_head kv_pos d_head"]],
    positions: Int[Tensor, "batch kv_pos"],
    next_positions: Int[Tensor, " batch"],
    *,
    window: Optional[int] = None,
    sinks: int = 0,
    copy: bool = True,
) -> "interpkv.KVCache":
    """``KVCache.from_state``: a cache holding the given stored slots, e.g. a cache's public state.

    The inverse of reading ``cache.layers[i].view(cache.seq_len)``,
    ``cache.positions`` and ``cache.next_positions``: every shape, dtype and
    device is checked against ``model``, so a cache built here is one the
    forward pass accepts. Positions are not checked against
    ``next_positions`` (a file loader does that, naming the file).

    Args:
        model: the model the cache is for.
        keys: one tensor per layer, ``[batch, kv_head, kv_pos, d_head]``,
            keys after rotary, at ``n_key_value_heads`` heads.
        values: one tensor per layer, same shape as ``keys``.
        positions: absolute position of each slot, ``-1`` for padding (int64).
        next_positions: position of each row's next token (int64).
        window, sinks: as in :meth:`for_model`.
        copy: copy the tensors (default). ``False`` adopts them as storage,
            so later forwards and crops may write into them.

    Returns:
        A new :class:`KVCache` with ``seq_len == positions.shape[1]``.

    Raises:
        CacheMismatchError: a count, shape, dtype or device that does not fit
            ``model`` (the message names what was given and what was expected).
        ValueError: an impossible ``window`` / ``sinks``.

    >>> state = [layer.view(cache.seq_len) for layer in cache.layers]
    >>> same = interpkv.KVCache.from_state(model, [k for k, _ in state], [v for _, v in state],
    ...                                    cache.positions, cache.next_positions)
    """
    check_state(model, keys, values, positions, next_positions)
    cache = cls(model, positions.shape[0], window=window, sinks=sinks, capacity=1)
    if copy:
        keys = [k.clone() for k in keys]
        values = [v.clone() for v in values]
    layers = [LayerCache.from_tensors(k, v) for k, v in zip(keys, values)]
    cache._install(layers, positions, next_positions)
    return cache
