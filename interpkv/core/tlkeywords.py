"""TransformerLens's forward keywords on ``interpkv.forward`` and ``interpkv.capture``.

A TransformerLens user passes ``model(tokens, stop_at_layer=2)`` or
``run_with_cache(..., remove_batch_dim=True)`` out of habit. Each keyword
either keeps its meaning or is refused with one line naming the interpkv form
(never a bare ``TypeError: unexpected keyword argument``):

- ``stop_at_layer`` (forward): run the blocks before it and return the
  residual stream ``[batch, pos, d_model]``, as TransformerLens does (probing,
  early exit). Through a cache only while it is frozen (``with
  cache.freeze():``) or without one: the later layers would store no keys.
- ``start_at_layer`` (forward): ``tokens`` is the residual stream entering
  that block; the blocks from it on run, through the cache's keys when one is
  given (frozen, for the same reason: earlier layers would store nothing).
- everything else in :data:`REFUSED` is refused with its interpkv form.
"""

from typing import Dict, Optional, Tuple

__all__ = ["REFUSED", "CAPTURE_REFUSED", "forward_layers", "refuse"]

REFUSED: Dict[str, str] = {
    "past_kv_cache": "interpkv keeps its own cache: pass cache=interpkv.KVCache.for_model(model, batch_size)",
    "bwd_hooks": "wrap the call in `with model.hooks(bwd_hooks=[...]):` (interpkv.forward keeps the graph)",
    "prepend_bos": "tokenize first: model.to_tokens(text, prepend_bos=...) and pass the ids",
    "padding_side": "pass ids padded on either side with attention_mask= (padding takes no position)",
    "remove_batch_dim": "interpkv keeps the batch axis: index [0] (record[name][0] for a capture)",
    "shortformer_pos_embed": "interpkv computes the positional embedding from the cache's positions itself",
    "tokens": "pass the ids as the second positional argument: interpkv.forward(model, tokens, ...)",
    "input": "pass the ids as the second positional argument: interpkv.forward(model, tokens, ...)",
}

CAPTURE_REFUSED: Dict[str, str] = {
    **REFUSED,
    "stop_at_layer": "capture runs every layer: select hooks with names=[...], or get the residual "
    "with interpkv.forward(model, tokens, stop_at_layer=L)",
    "start_at_layer": "capture starts from tokens; run interpkv.forward(model, resid, start_at_layer=L, "
    "fwd_hooks=[...]) to start from a residual",
    "return_type": "capture returns a Record: its logits are record.logits",
    "incl_bwd": "capture records forward activations; use torch hooks (model.hooks(bwd_hooks=...)) for gradients",
    "return_cache_object": "capture returns a Record; record.to_activation_cache(model) is the ActivationCache",
}


def refuse(function: str, kwargs: dict, table: Dict[str, str]) -> None:
    """Raise a one-line ``TypeError`` for the first keyword in ``kwargs`` (naming the interpkv form if known)."""
    for name in kwargs:
        if name in table:
            raise TypeError(f"{function} does not take TransformerLens's {name}=: {table[name]}")
        raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")


def forward_layers(
    n_layers: int, start_at_layer: Optional[int], stop_at_layer: Optional[int], cache, caller_cache: bool
) -> Tuple[int, Optional[int]]:
    """``(start, stop)`` block indices for TransformerLens's keywords, checked (negative ones count from the end).

    Raises:
        ValueError: a layer out of range, an empty range, or a live (unfrozen)
            caller's cache with a partial range (the message says to freeze it).
    """
    def index(value: Optional[int], name: str, default):
        if value is None:
            return default
        value = int(value)
        if not -n_layers <= value <= n_layers:
            raise ValueError(f"{name}={value} is outside the model's {n_layers} layers")
        return value % n_layers if value < 0 else value

    start = index(start_at_layer, "start_at_layer", 0)
    stop = index(stop_at_layer, "stop_at_layer", None)
    if stop is not None and stop < start:
        raise ValueError(f"stop_at_layer={stop_at_layer} is before start_at_layer={start_at_layer}: no block runs")
    partial = start > 0 or (stop is not None and stop < n_layers)
    if partial and caller_cache and not cache.frozen:
        raise ValueError(
            f"start_at_layer/stop_at_layer run blocks {start}..{(stop or n_layers) - 1} only, so a cache would "
            "store no keys for the other layers: read a cache with `with cache.freeze(): interpkv.forward(...)`, "
            "or run without one"
        )
    return start, stop
