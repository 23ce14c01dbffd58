"""What a cache is bound to: the model's signature, and the compatibility check of a forward."""

import torch

from interpkv.core import tl as _tl
from interpkv.core.schemes import scheme_for
from interpkv.errors import CacheMismatchError

__all__ = ["model_signature", "describe", "check_compatible"]


def model_signature(model: "_tl.HookedTransformer") -> dict:
    """The architecture fields that decide a cache's layout and meaning."""
    cfg = model.cfg
    return {
        "architecture": str(cfg.original_architecture),
        "n_layers": int(cfg.n_layers),
        "n_heads": int(cfg.n_heads),
        "kv_heads": _tl.kv_head_count(cfg),
        "d_head": int(cfg.d_head),
        "d_model": int(cfg.d_model),
        "n_ctx": int(cfg.n_ctx),
        "positional": scheme_for(model).describe(),
    }


def describe(sig: dict) -> str:
    return (
        f"{sig['architecture']} ({sig['n_layers']} layers, {sig['kv_heads']} kv heads x "
        f"d_head {sig['d_head']}, {sig['positional']})"
    )


def check_compatible(cache, model: "_tl.HookedTransformer", batch: int, device) -> None:
    """Raise :class:`CacheMismatchError` unless this cache fits ``model`` and ``batch``."""
    bound = cache.model
    if bound is not model:
        theirs = model_signature(model)
        if theirs != cache.signature:
            raise CacheMismatchError(
                f"this KVCache was made for {describe(cache.signature)} but the model "
                f"passed is {describe(theirs)}; create a cache with "
                "interpkv.KVCache.for_model(model)."
            )
        raise CacheMismatchError(
            "this KVCache was made for another HookedTransformer object (same "
            f"architecture, {describe(theirs)}, possibly different weights); its keys "
            "mean nothing to this model: create a cache with interpkv.KVCache.for_model(model)."
        )
    if model.cfg.dtype != cache.dtype:
        raise CacheMismatchError(
            f"cache dtype is {cache.dtype} but the model now runs in {model.cfg.dtype}; "
            "make a new cache after changing the model's dtype."
        )
    if batch != cache.batch_size:
        raise CacheMismatchError(
            f"the cache holds {cache.batch_size} rows but the tokens have batch {batch}; "
            "use cache.select(indices) or cache.repeat(n) to reshape the cache, or make "
            f"one with KVCache.for_model(model, batch_size={batch})."
        )
    if torch.device(device).type != cache.device.type:
        raise CacheMismatchError(
            f"the cache lives on {cache.device} but the tokens are on {device}; "
            "move the tokens (or make the cache on the model's device)."
        )
