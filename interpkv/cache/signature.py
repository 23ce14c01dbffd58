"""What a cache is bound to: the architecture fields of a model (:func:`model_signature`), pure.

Read by :class:`~interpkv.cache.kvcache.KVCache` (its binding and
:meth:`~interpkv.cache.kvcache.KVCache.check_compatible`) and by persistence
(a file names the model it was saved from).
"""

from interpkv.core import tl as _tl
from interpkv.core.schemes import scheme_for

__all__ = ["model_signature", "describe"]


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
