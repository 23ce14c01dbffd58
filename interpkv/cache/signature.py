"""The architecture fields that decide a cache's layout and meaning.

Shared by :class:`~interpkv.cache.KVCache` (which refuses a model of another
architecture) and :mod:`~interpkv.cache.persist` (which records it in a file).
"""

from interpkv.core import tl as _tl
from interpkv.core.schemes import scheme_for

__all__ = ["model_signature"]


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
