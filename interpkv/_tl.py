"""The one seam between interpkv and TransformerLens.

Every TransformerLens import in the package goes through this module.
TransformerLens renamed its cache classes between 2.x and 3.x and removed
``HookedTransformer`` in 4.0; when it moves again, this file is what changes.

Besides re-exporting names, it owns the single piece of runtime plumbing that
touches TransformerLens internals: :func:`attention_replaced`, which routes each
block's attention call to interpkv's position-aware attention for the duration
of one forward pass (and restores TransformerLens's own on exit).
"""

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import patching as tl_patching  # reference for interpkv.patching tests
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.activation_functions import apply_softcap

__all__ = [
    "HookedTransformer",
    "HookedTransformerConfig",
    "HookPoint",
    "apply_softcap",
    "tl_patching",
    "attention_replaced",
    "rotary_tables",
    "kv_head_count",
    "is_local_layer",
    "rotary_base",
]


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
def attention_replaced(
    model: HookedTransformer,
    make_forward: Callable[[int, torch.nn.Module], Callable[..., torch.Tensor]],
) -> Iterator[None]:
    """Route every block's attention through ``make_forward(layer, attn)``.

    The replacement is an instance attribute, set on entry and removed on exit
    (even on error), so TransformerLens's class is never modified and the
    model behaves exactly as before outside the ``with`` block. Nested use
    restores whatever the outer level had installed.
    """
    saved: list[Tuple[torch.nn.Module, Optional[Callable[..., torch.Tensor]]]] = []
    try:
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            saved.append((attn, attn.__dict__.get("forward")))
            attn.forward = make_forward(layer, attn)
        yield
    finally:
        for attn, previous in saved:
            if previous is None:
                attn.__dict__.pop("forward", None)
            else:
                attn.forward = previous
