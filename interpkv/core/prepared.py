"""Linear maps on TransformerLens's weights in their own layouts: no copy, nothing kept.

TransformerLens rebuilds some weight layouts on every call: ``simple_attn_linear``
rearranges ``W_Q/W_K/W_V`` to ``[(head d_head), d_model]``, ``GatedMLP`` makes
``W_gate.T``, ``W_in.T`` and ``W_out.T`` contiguous and ``Unembed`` makes
``W_U.T`` contiguous (154 MB per call at GPT-2's vocabulary): a copy of those
weights per token. The functions here compute the same products reading the
parameters where they are (a batched matmul over heads for ``[head, d_model,
d_head]``, ``x @ W`` for ``[d_in, d_out]``), so nothing is copied and nothing
is kept between calls.

Nothing is memoized on purpose: an edit through ``.data`` (``W.data[0] = 0``,
``W.data.copy_(...)``) does not bump ``param._version``, so no cheap key can
tell a stale copy from a fresh one. Reading the parameter itself on every call
sees every edit by every route, and works the same with and without autograd
(no tensor made under ``torch.inference_mode`` or ``no_grad`` outlives its call).

Results equal TransformerLens's to rounding (the products are summed in another
order, ~1 ulp per element), not bit for bit.
"""

from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from interpkv.core.calls import has_hooks

__all__ = ["project_heads", "gated_mlp_forward", "unembed_forward"]


def project_heads(
    x: Float[Tensor, "batch pos d_model"],
    W: Float[Tensor, "head_index d_model d_head"],
    b: Float[Tensor, "head_index d_head"],
) -> Float[Tensor, "batch pos head_index d_head"]:
    """``simple_attn_linear``, copying whichever of ``x`` and ``W`` is smaller.

    A product per head over ``W``'s own ``[head, d_model, d_head]`` layout
    needs ``x`` once per head (``batch * pos * d_model * head`` elements
    copied); one product over all heads needs ``W`` as ``[d_model, (head
    d_head)]`` (``head * d_model * d_head`` copied, what TransformerLens does
    every call). A decode step (``batch * pos < d_head``) takes the first, a
    prompt or a wide batch the second. Broadcasting ``W`` over the batch
    instead would copy it once per row (8 copies of every q/k/v weight per
    step at batch 8).

    Returns ``[batch, pos, head, d_head]`` (a view).
    """
    batch, n, d_model = x.shape
    heads, _, d_head = W.shape
    if batch * n < d_head:
        rows = x.reshape(1, batch * n, d_model).expand(heads, batch * n, d_model)  # a view, no copy
        out = torch.baddbmm(b[:, None, :], rows, W)  # (H, B*T, d): bias and product in one op
        return out.view(heads, batch, n, d_head).permute(1, 2, 0, 3)
    w = W.permute(1, 0, 2).reshape(d_model, heads * d_head)  # the one copy: (d_model, H*d)
    out = torch.addmm(b.reshape(-1), x.reshape(batch * n, d_model), w)  # (B*T, H*d)
    return out.view(batch, n, heads, d_head)


def gated_mlp_forward(mlp: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """A ``forward`` for a TransformerLens ``GatedMLP`` with no per-call weight copy."""
    original = type(mlp).forward

    def forward(x: Tensor) -> Tensor:
        if mlp.W_gate.device != x.device:
            return original(mlp, x)
        pre_act = mlp.hook_pre(torch.matmul(x, mlp.W_gate))  # (B, T, d_mlp)
        pre_linear = mlp.hook_pre_linear(torch.matmul(x, mlp.W_in))
        # addcmul(b, a, c) is b + a * c, rounded as TransformerLens's (a * c) + b (no fused multiply-add on a CPU)
        post_act = mlp.hook_post(torch.addcmul(mlp.b_in, mlp.act_fn(pre_act), pre_linear))
        out = torch.addmm(mlp.b_out, post_act.reshape(-1, post_act.shape[-1]), mlp.W_out)  # (B*T, d_model)
        return out.view(*post_act.shape[:-1], -1)

    return forward


def unembed_forward(unembed: torch.nn.Module, *, last_only: bool = False) -> Callable[[Tensor], Tensor]:
    """A ``forward`` for TransformerLens's ``Unembed`` with no copy of ``W_U``.

    ``last_only``: logits of the last position only (``[batch, 1, d_vocab]``),
    as HF's ``logits_to_keep=1``; ``hook_in`` still sees every position, and
    when something hooks ``hook_out`` every position is computed for it.
    """
    def forward(residual: Tensor) -> Tensor:
        residual = unembed.hook_in(residual)
        if last_only and not has_hooks(unembed.hook_out):
            residual = residual[:, -1:]
        flat = residual.reshape(-1, residual.shape[-1])  # (B*T, d_model)
        logits = torch.addmm(unembed.b_U, flat, unembed.W_U)  # (B*T, d_vocab)
        return unembed.hook_out(logits.view(*residual.shape[:-1], -1))

    return forward
