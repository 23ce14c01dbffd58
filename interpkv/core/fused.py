"""Fused equivalents of TransformerLens modules, used while their inner hook points are idle.

TransformerLens spells some functions out op by op so that every intermediate
can be hooked: ``LayerNormPre`` (centre, square, mean, add, sqrt, divide:
six passes over the residual stream, ``hook_scale`` and ``hook_normalized``
in between; a block normalises the same residual three times, for queries,
keys and values), ``LayerNorm`` (the same, then ``* w + b``), ``RMSNormPre``,
GPT-2's ``gelu_new`` (``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``,
eight passes over ``[batch, pos, d_mlp]``) and Bloom's ``gelu_fast`` (the
same function with ``sqrt(2/pi)`` written as ``0.7978845608``). HF runs each as
one kernel. The forwards here do the same: :func:`torch.nn.functional.layer_norm`,
``rms_norm`` and ``gelu(approximate="tanh")`` compute the same functions
(equal to rounding, not bit for bit; ``gelu_fast``'s shortened constant is
3.6e-12 relative from ``sqrt(2/pi)``: below float32's rounding, and in float64
an output difference of at most about 1e-12, inside the 1e-10 float64 tolerance),
and a norm called again on the very tensor object it just normalised returns
the same result. The forwards are made per call and
reached through that call's view of the model (:mod:`interpkv.core.overlay`), so nothing
is kept between calls. A norm whose ``hook_scale`` or ``hook_normalized`` has a
hook at call time runs TransformerLens's own forward, so those hooks fire
with TransformerLens's values; MLP hook points fire either way.
"""

import functools
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from interpkv.core.calls import has_hooks

__all__ = ["norm_forward", "mlp_forward", "MLP_ACTIVATIONS"]

_EXACT = (torch.float32, torch.float64)


def norm_forward(norm: torch.nn.Module, *, rms: bool, last: list, affine: bool = False) -> Callable[[Tensor], Tensor]:
    """A ``forward`` for ``LayerNormPre`` (``rms=False``), ``RMSNormPre`` (``rms=True``) or ``LayerNorm`` (``affine=True``).

    ``last``: a ``[input, output, norm]`` slot shared by every norm of one call, so at
    most one pair is kept alive (one slot per norm kept each block's residual
    and its normalisation until the end of the call: +270 MB at 2,048 tokens).
    """
    original = type(norm).forward
    fused = F.rms_norm if rms else F.layer_norm

    def forward(x: Tensor) -> Tensor:
        if x.dtype not in _EXACT or has_hooks(norm.hook_scale) or has_hooks(norm.hook_normalized):
            return original(norm, x)
        # A block normalises its residual once each for queries, keys and values:
        # the same tensor object three times in a row. Computed once.
        if last[0] is x and last[2] is norm:
            return last[1]
        if affine:  # TransformerLens's LayerNorm: normalised * w + b
            out = F.layer_norm(x, x.shape[-1:], norm.w, norm.b, eps=norm.eps)
        else:
            out = fused(x, x.shape[-1:], eps=norm.eps).to(norm.cfg.dtype)
        last[:] = [x, out, norm]
        return out

    return forward


MLP_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_fast": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}
"""TransformerLens ``act_fn`` names whose function is one kernel here (see the module docstring)."""


def mlp_forward(mlp: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """A ``forward`` for a TransformerLens ``MLP`` whose ``act_fn`` is in :data:`MLP_ACTIVATIONS`."""
    activation = MLP_ACTIVATIONS[mlp.cfg.act_fn]

    def forward(x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (B*T, d_model)
        pre_act = mlp.hook_pre(torch.addmm(mlp.b_in, flat, mlp.W_in).view(*x.shape[:-1], -1))
        post_act = mlp.hook_post(activation(pre_act))  # (B, T, d_mlp)
        out = torch.addmm(mlp.b_out, post_act.reshape(-1, post_act.shape[-1]), mlp.W_out)
        return out.view(*x.shape[:-1], -1)

    return forward
