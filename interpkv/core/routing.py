"""Per-call routing: for one interpkv call, which module of the model runs which forward.

A call never changes the shared model: it runs a per-call *view* of it
(:func:`interpkv.core.overlay.overlay`) in which some modules run another
``forward``. :func:`routes` is the one place that decides which, for one call,
and returns every route:

- **attention**: each block's ``attn`` runs interpkv's position-aware attention
  over the call's cache (:meth:`interpkv.core.attention.Step.attention_for`);
- **fast modules** (:func:`fast_modules`): TransformerLens's ``LayerNormPre``,
  ``LayerNorm``, ``RMSNormPre`` and the ``MLP`` of a one-kernel activation
  (GPT-2's ``gelu_new``, Bloom's ``gelu_fast``, ``relu``, ...) run as single kernels
  (:mod:`interpkv.core.fused`, only while their inner hook points are idle),
  ``GatedMLP`` and ``Unembed`` without per-call weight copies
  (:mod:`interpkv.core.prepared`). So on this path norms, MLPs and the
  unembedding do *not* run TransformerLens's own ``forward``: they compute the
  same function, and fire the same hook points;
- **SAE wrappers** of a SAELens ``HookedSAETransformer``
  (:func:`interpkv.core.sae_lens.wrapper_routes`): run on a per-call copy.

Everything else (embeddings, blocks, hook points) is TransformerLens's own
code. A module whose instance already has its own ``forward`` (a caller's
monkeypatch) keeps it.
"""

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from interpkv.core import tl as _tl
from interpkv.core.fused import MLP_ACTIVATIONS, mlp_forward, norm_forward
from interpkv.core.prepared import gated_mlp_forward, unembed_forward
from interpkv.core.sae_lens import wrapper_routes

__all__ = ["Route", "routes", "attention_routes", "fast_modules"]

Route = Tuple[Tuple[str, ...], Callable]
"""``(path, forward)``: the module at ``path`` (names from the model down) runs ``forward``."""


def routes(
    model: "_tl.HookedTransformer",
    attention_for: Callable[[int, torch.nn.Module], Callable[..., Tensor]],
    ids: Optional[Tensor],
    *,
    last_logits_only: bool = False,
) -> List[Route]:
    """Every route of one call: attention, fast modules, SAE wrappers.

    Args:
        model: the HookedTransformer (or HookedSAETransformer) the call runs.
        attention_for: ``(layer, attn) -> forward`` for each block's attention
            (the call's :meth:`~interpkv.core.attention.Step.attention_for`).
        ids: the call's new token ids ``[batch, pos]``, or None for embeddings
            (SAEs that exclude special tokens need ids).
        last_logits_only: the unembedding computes the last position only
            (unless something hooks its ``hook_out``).

    Returns:
        ``(path, forward)`` pairs for :func:`interpkv.core.overlay.overlay`.
    """
    return (
        attention_routes(model, attention_for)
        + fast_modules(model, last_logits_only=last_logits_only)
        + wrapper_routes(model, ids)
    )


def attention_routes(
    model: "_tl.HookedTransformer",
    make_forward: Callable[[int, torch.nn.Module], Callable[..., torch.Tensor]],
) -> List[Route]:
    """``(path, make_forward(layer, attn))`` for every block's attention.

    This route replaces only what attention computes; the block around it, its
    hook points and the other routes (:func:`fast_modules`, SAE wrappers) are
    untouched by it.
    """
    return [
        (("blocks", str(layer), "attn"), make_forward(layer, block.attn))
        for layer, block in enumerate(model.blocks)
    ]


def fast_modules(model: "_tl.HookedTransformer", *, last_logits_only: bool = False) -> List[Route]:
    """``(path, forward)`` pairs for modules with a cheaper equivalent forward.

    TransformerLens's plain ``GatedMLP`` (not SoLU's layer-norm activation) and
    ``Unembed`` skip their per-call weight copies (:mod:`interpkv.core.prepared`);
    ``LayerNormPre``, ``LayerNorm`` (the blocks', the final and the embedding's),
    ``RMSNormPre`` and an ``MLP`` whose activation is one kernel run as single
    kernels (:mod:`interpkv.core.fused`). Every other module, and any module
    whose instance already has its own ``forward``, runs its own forward.
    ``last_logits_only``: the unembedding computes the last position only
    (unless something hooks its ``hook_out``).
    """
    cfg = model.cfg
    pairs = []
    last_norm = [None, None, None]  # one memo slot for every norm of this call
    norms = [
        (("blocks", str(layer), name), getattr(block, name, None))
        for layer, block in enumerate(model.blocks)
        for name in ("ln1", "ln2")
    ]
    norms += [(("ln_final",), getattr(model, "ln_final", None)), (("embed", "ln"), getattr(model.embed, "ln", None))]
    for path, norm in norms:
        kind = type(norm)
        if kind is _tl.LayerNormPre or kind is _tl.RMSNormPre or kind is _tl.LayerNorm:
            forward = norm_forward(norm, rms=kind is _tl.RMSNormPre, last=last_norm, affine=kind is _tl.LayerNorm)
            pairs.append((path, norm, forward))
    for layer, block in enumerate(model.blocks):
        mlp = getattr(block, "mlp", None)
        path = ("blocks", str(layer), "mlp")
        if type(mlp) is _tl.GatedMLP and not cfg.is_layer_norm_activation():
            pairs.append((path, mlp, gated_mlp_forward(mlp)))
        elif type(mlp) is _tl.MLP and cfg.act_fn in MLP_ACTIVATIONS and mlp.W_in.ndim == 2:
            pairs.append((path, mlp, mlp_forward(mlp)))
    if type(model.unembed) is _tl.Unembed:
        pairs.append((("unembed",), model.unembed, unembed_forward(model.unembed, last_only=last_logits_only)))
    # A forward the caller installed on the instance (a monkeypatched module) wins.
    return [(path, forward) for path, module, forward in pairs if "forward" not in module.__dict__]
