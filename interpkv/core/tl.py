"""The one seam between interpkv and TransformerLens.

Every TransformerLens import in the package goes through this module.
TransformerLens renamed its cache classes between 2.x and 3.x and removed
``HookedTransformer`` in 4.0; when it moves again, this file is what changes.

Besides re-exporting names, it holds the small adapters that read
TransformerLens internals whose names or layouts have moved between releases
(kv-head counts, the kv projection under GQA, rotary tables and bases, ALiBi
slopes, local layers, the frames of a running TransformerLens forward). What
a call routes where is policy, and lives in :mod:`interpkv.core.routing`.
"""

from types import FrameType
from typing import Optional, Tuple, Union

import torch
from torch.overrides import TorchFunctionMode
from transformer_lens import ActivationCache, HookedTransformer, HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.components.abstract_attention import AbstractAttention
from transformer_lens.components.layer_norm_pre import LayerNormPre
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.components.mlps.mlp import MLP
from transformer_lens.components.rms_norm_pre import RMSNormPre
from transformer_lens.components.unembed import Unembed
from transformer_lens.hook_points import HookPoint
from transformer_lens.loading_from_pretrained import (
    get_pretrained_model_config,
    get_pretrained_state_dict,
)
from transformer_lens.utilities import get_act_name
from transformer_lens.utilities.activation_functions import apply_softcap
from transformer_lens.weight_processing import ProcessWeights

__all__ = [
    "ActivationCache",
    "get_act_name",
    "HookedTransformer",
    "HookedTransformerConfig",
    "HookPoint",
    "TransformerLensKeyValueCache",
    "TransformerLensKeyValueCacheEntry",
    "apply_softcap",
    "ProcessWeights",
    "get_pretrained_model_config",
    "get_pretrained_state_dict",
    "alibi_multipliers",
    "rotary_tables",
    "rotary_frequencies",
    "kv_head_count",
    "is_local_layer",
    "rotary_base",
    "kv_projection",
    "LayerNormPre",
    "RMSNormPre",
    "GatedMLP",
    "MLP",
    "Unembed",
]


def kv_projection(attn: torch.nn.Module):
    """``(W_K, b_K, W_V, b_V)`` as ``calculate_qkv_matrices`` uses them (kv heads under GQA)."""
    if getattr(attn, "repeat_kv_heads", None) is not None and not attn.cfg.ungroup_grouped_query_attention:
        return attn._W_K, attn._b_K, attn._W_V, attn._b_V
    return attn.W_K, attn.b_K, attn.W_V, attn.b_V


def alibi_multipliers(n_heads: int) -> torch.Tensor:
    """TransformerLens's ALiBi head slopes ``2^(-8i/n)``, i = 1..n (float32, as it computes them)."""
    return AbstractAttention.create_alibi_multipliers(n_heads)


def kv_head_count(cfg: HookedTransformerConfig) -> int:
    """Number of key/value heads that ``calculate_qkv_matrices`` returns."""
    if cfg.n_key_value_heads is not None and not cfg.ungroup_grouped_query_attention:
        return int(cfg.n_key_value_heads)
    return int(cfg.n_heads)


def is_local_layer(attn: torch.nn.Module) -> bool:
    """Whether a TransformerLens attention module is a local (windowed) layer."""
    return getattr(attn, "attn_type", "global") == "local"


def rotary_base(attn: torch.nn.Module) -> Union[int, float]:
    """The rotary base of one layer (Gemma-style models use another for local layers)."""
    return attn._rotary_base()


def rotary_tables(
    attn: torch.nn.Module, n_positions: int, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sin and cos tables ``[n_positions, rotary_dim]`` for one attention layer.

    Computed by TransformerLens's own ``calculate_sin_cos_rotary`` so that every
    rotary variant it supports (rotate-half or adjacent pairs, partial
    ``rotary_dim``, per-layer ``rotary_base``, Llama-3 NTK-by-parts, YaRN) is
    reproduced bit for bit. Row ``p`` depends only on ``p``, never on the table
    size, so growing a table never changes an earlier row.
    """
    cfg = attn.cfg
    sin, cos = attn.calculate_sin_cos_rotary(
        cfg.rotary_dim, n_positions, base=rotary_base(attn), dtype=dtype
    )
    return sin, cos


class _DivisorOf(TorchFunctionMode):
    """Records the divisor of the first ``[n, 1] / [1, d]`` division it sees."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.found: Optional[Tuple[torch.dtype, torch.Tensor]] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (
            self.found is None
            and getattr(func, "__name__", "") in ("__truediv__", "div")
            and len(args) == 2
            and all(isinstance(a, torch.Tensor) for a in args)
            and tuple(args[0].shape) == (self.n, 1)
            and args[1].ndim == 2
            and args[1].shape[0] == 1
        ):
            self.found = (args[0].dtype, args[1][0].detach().clone())
        return out


def rotary_frequencies(
    attn: torch.nn.Module, dtype: torch.dtype
) -> Optional[Tuple[torch.dtype, torch.Tensor]]:
    """``(position dtype, freq [rotary_dim])`` with which ``calculate_sin_cos_rotary`` builds its table.

    TransformerLens computes row ``p`` of its sin/cos tables as
    ``sin(p / freq)`` (``cos`` alike) in float32 (float64 for float64 models),
    then casts to ``dtype``; ``freq`` holds every variant (rotate-half or
    adjacent pairs, per-layer base, linear scaling, Llama-3 NTK-by-parts,
    YaRN). It is read off TransformerLens's own computation (the divisor of
    its ``pos[:, None] / freq[None, :]``, and the dtype of ``pos``), so rows
    for any positions can be computed without a table from 0:
    ``positions.to(pos_dtype)[..., None] / freq``. Returns None if that division is not
    found, or if rows from ``freq`` do not equal TransformerLens's table bit
    for bit (e.g. YaRN's attention factor, which scales the rows afterwards):
    the caller then uses :func:`rotary_tables`.
    """
    cfg = attn.cfg
    n = 3
    with torch.inference_mode(False), torch.no_grad():
        probe = _DivisorOf(n)
        with probe:
            attn.calculate_sin_cos_rotary(cfg.rotary_dim, n, base=rotary_base(attn), dtype=dtype)
        if probe.found is None:
            return None
        pos_dtype, freq = probe.found
        if freq.shape != (cfg.rotary_dim,) or not freq.is_floating_point() or not pos_dtype.is_floating_point:
            return None
        check = 257
        sin, cos = rotary_tables(attn, check, dtype)
        angles = torch.arange(check).to(pos_dtype)[:, None] / freq
        if not (torch.equal(angles.sin().to(dtype), sin) and torch.equal(angles.cos().to(dtype), cos)):
            return None
    return pos_dtype, freq


_TL_FRAMES = (HookedTransformer.forward.__code__, HookedTransformer.input_to_embed.__code__)


def forward_locals(max_depth: int = 64):
    """Locals of the innermost TransformerLens ``forward``/``input_to_embed`` frame running now, or None.

    How :func:`interpkv.hook_positions` learns, inside a plain TransformerLens
    call, what TransformerLens itself was given (``past_kv_cache``,
    ``attention_mask``): the hook function is called with neither.
    """
    import sys

    frame: Optional[FrameType] = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        if frame.f_code in _TL_FRAMES:
            return frame.f_locals
        frame = frame.f_back
    return None
