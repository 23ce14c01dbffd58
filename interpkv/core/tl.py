"""The one seam between interpkv and TransformerLens.

Every TransformerLens import in the package goes through this module.
TransformerLens renamed its cache classes between 2.x and 3.x and removed
``HookedTransformer`` in 4.0; when it moves again, this file is what changes.

Besides re-exporting names, it owns the single piece of runtime plumbing that
touches TransformerLens internals: :func:`forwards_replaced`, which routes each
block's attention call to interpkv's position-aware attention for the duration
of one forward pass (and restores TransformerLens's own on exit).
"""

import contextlib
from typing import Callable, Iterator, List, Tuple

import torch
from transformer_lens import ActivationCache, HookedTransformer, HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.components.abstract_attention import AbstractAttention
from transformer_lens.components.layer_norm_pre import LayerNormPre
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.components.mlps.mlp import MLP
from transformer_lens.components.rms_norm_pre import RMSNormPre
from transformer_lens.components.unembed import Unembed
from transformer_lens.utilities import get_act_name
from transformer_lens.hook_points import HookPoint
from transformer_lens.loading_from_pretrained import (
    get_pretrained_model_config,
    get_pretrained_state_dict,
)
from transformer_lens.weight_processing import ProcessWeights
from transformer_lens.utilities.activation_functions import apply_softcap

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
    "attention_pairs",
    "alibi_multipliers",
    "rotary_tables",
    "kv_head_count",
    "is_local_layer",
    "rotary_base",
    "kv_projection",
    "fast_modules",
    "forwards_replaced",
    "has_hooks",
    "temporary_hooks",
]


@contextlib.contextmanager
def temporary_hooks(model: HookedTransformer, fwd_hooks) -> Iterator[None]:
    """``model.hooks(fwd_hooks=...)`` that touches only the hook points it hooks.

    Same semantics as TransformerLens's context (``(name or filter, hook)``
    pairs, added at a new context level, removed on exit, hooks of other levels
    and permanent ones kept), but the exit visits only the points this call
    hooked instead of resetting every hook point of the model (~1 ms per call
    at GPT-2 size, paid on every generated token).
    """
    model.context_level += 1
    level = model.context_level
    touched = []
    try:
        for name, hook in fwd_hooks:
            if isinstance(name, str):
                points = [model.mod_dict[name]]
            else:
                points = [point for point_name, point in model.hook_dict.items() if name(point_name)]
            for point in points:
                point.add_hook(hook, dir="fwd", level=level)
                touched.append(point)
        yield
    finally:
        for point in dict.fromkeys(touched):
            point.remove_hooks("fwd", including_permanent=False, level=level)
        model.context_level -= 1


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether anything is registered on ``module`` (a HookPoint) right now.

    TransformerLens's ``add_hook`` registers through torch's module hooks, so
    this sees hooks added by TransformerLens, by ``model.hooks(...)`` and by
    plain ``register_forward_hook`` alike, forward or backward, and torch's
    global module hooks.
    """
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or torch.nn.modules.module._global_forward_hooks
        or torch.nn.modules.module._global_forward_pre_hooks
        or torch.nn.modules.module._global_backward_hooks
        or torch.nn.modules.module._global_backward_pre_hooks
    )


def kv_projection(attn: torch.nn.Module):
    """``(W_K, b_K, W_V, b_V)`` as ``calculate_qkv_matrices`` uses them (kv heads under GQA)."""
    if getattr(attn, "repeat_kv_heads", None) is not None and not attn.cfg.ungroup_grouped_query_attention:
        return attn._W_K, attn._b_K, attn._W_V, attn._b_V
    return attn.W_K, attn.b_K, attn.W_V, attn.b_V


def fast_modules(model: HookedTransformer, *, last_logits_only: bool = False):
    """``(module, forward)`` pairs for modules with a cheaper equivalent forward.

    TransformerLens's plain ``GatedMLP`` (not SoLU's layer-norm activation) and
    ``Unembed`` skip their per-call weight copies (:mod:`interpkv.core.prepared`);
    ``LayerNormPre``, ``RMSNormPre`` and GPT-2's ``gelu_new`` ``MLP`` run as single
    kernels (:mod:`interpkv.core.fused`). Every other module, and any module
    whose instance already has its own ``forward``, runs its own forward.
    ``last_logits_only``: the unembedding computes the last position only
    (unless something hooks its ``hook_out``).
    """
    from interpkv.core.fused import gelu_new_mlp_forward, norm_forward
    from interpkv.core.prepared import gated_mlp_forward, unembed_forward

    cfg = model.cfg
    pairs = []
    last_norm = [None, None, None]  # one memo slot for every norm of this call
    norms = [getattr(block, name, None) for block in model.blocks for name in ("ln1", "ln2")]
    for norm in norms + [getattr(model, "ln_final", None)]:
        if type(norm) is LayerNormPre or type(norm) is RMSNormPre:
            pairs.append((norm, norm_forward(norm, rms=type(norm) is RMSNormPre, last=last_norm)))
    for block in model.blocks:
        mlp = getattr(block, "mlp", None)
        if type(mlp) is GatedMLP and not cfg.is_layer_norm_activation():
            pairs.append((mlp, gated_mlp_forward(mlp)))
        elif type(mlp) is MLP and cfg.act_fn == "gelu_new" and mlp.W_in.ndim == 2:
            pairs.append((mlp, gelu_new_mlp_forward(mlp)))
    if type(model.unembed) is Unembed:
        pairs.append((model.unembed, unembed_forward(model.unembed, last_only=last_logits_only)))
    # A forward the caller installed on the instance (a monkeypatched module) wins.
    return [(module, forward) for module, forward in pairs if "forward" not in module.__dict__]


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


def rotary_base(attn: torch.nn.Module) -> float:
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


@contextlib.contextmanager
def forwards_replaced(pairs) -> Iterator[None]:
    """Route each ``module``'s calls to ``forward`` for the duration of the block.

    Instance attributes only, restored on exit (even on error); nested use
    restores whatever the outer level installed.
    """
    saved = []
    try:
        for module, forward in pairs:
            # Straight into the instance dict: what nn.Module.__setattr__ ends up
            # doing for a plain function, without its checks (~50 modules per call).
            saved.append((module, module.__dict__.get("forward")))
            module.__dict__["forward"] = forward
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous


def attention_pairs(
    model: HookedTransformer,
    make_forward: Callable[[int, torch.nn.Module], Callable[..., torch.Tensor]],
) -> List[Tuple[torch.nn.Module, Callable[..., torch.Tensor]]]:
    """``(attn, make_forward(layer, attn))`` for every block, for :func:`forwards_replaced`.

    Routing each block's attention call this way replaces only what attention
    computes; TransformerLens's blocks, norms, MLPs and hook points run as they are.
    """
    return [(block.attn, make_forward(layer, block.attn)) for layer, block in enumerate(model.blocks)]
