"""Weight layouts derived once per parameter version, for the decode hot path.

TransformerLens rebuilds some weight layouts on every call: ``simple_attn_linear``
rearranges ``W_Q/W_K/W_V`` to ``[(head d_head), d_model]`` and ``GatedMLP`` makes
``W_gate.T``, ``W_in.T`` and ``W_out.T`` contiguous, a copy of every MLP weight per
token. Here each layout is computed once and reused while the parameter is
unchanged: the key holds the parameter's ``_version`` (bumped by any in-place
edit, e.g. an ablation ``W_O[...] = 0``), its storage pointer, dtype and device
(changed by ``model.to``), so an edited weight is never served stale. The
layouts are the same tensors TransformerLens computes, so results are bitwise
identical.

Derived layouts are used only when no gradient can flow into the parameter
(``torch.no_grad()`` or ``requires_grad=False``): a cached layout would carry
an autograd graph from the call that built it.
"""

import weakref
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["usable", "derived", "project_heads", "gated_mlp_forward"]

# id(param) -> layouts. Keyed by id, not by the tensor (a WeakKeyDictionary
# compares tensors with ==); an entry is dropped when its parameter dies.
_STORE: Dict[int, Dict[str, Tuple[tuple, Tensor]]] = {}


def usable(*params: Tensor) -> bool:
    """Whether derived layouts may replace these parameters in this call."""
    return not torch.is_grad_enabled() or not any(p.requires_grad for p in params)


def derived(param: Tensor, kind: str, make: Callable[[Tensor], Tensor]) -> Tensor:
    """``make(param)``, memoized per parameter version (see module docstring)."""
    key = (param._version, param.data_ptr(), param.dtype, param.device)
    entries = _STORE.get(id(param))
    if entries is None:
        entries = _STORE[id(param)] = {}
        weakref.finalize(param, _STORE.pop, id(param), None)
    hit = entries.get(kind)
    if hit is None or hit[0] != key:
        # Never an inference tensor: a layout memoized under torch.inference_mode()
        # could not be saved for a later backward pass.
        with torch.inference_mode(False), torch.no_grad():
            hit = (key, make(param).contiguous())
        entries[kind] = hit
    return hit[1]


def project_heads(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``simple_attn_linear``: ``[batch, pos, d_model] -> [batch, pos, head, d_head]``."""
    w = derived(W, "heads_out_by_in", lambda w: w.permute(0, 2, 1).reshape(-1, w.shape[1]))
    bias = derived(b, "flat", lambda v: v.reshape(-1))
    return F.linear(x, w, bias).reshape(x.shape[0], x.shape[1], b.shape[0], b.shape[1])


def gated_mlp_forward(mlp: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """A ``forward`` for a TransformerLens ``GatedMLP`` with its transposes kept."""
    original = type(mlp).forward

    def forward(x: Tensor) -> Tensor:
        if not usable(mlp.W_gate, mlp.W_in, mlp.W_out) or mlp.W_gate.device != x.device:
            return original(mlp, x)
        w_gate = derived(mlp.W_gate, "T", lambda w: w.T)
        w_in = derived(mlp.W_in, "T", lambda w: w.T)
        w_out = derived(mlp.W_out, "T", lambda w: w.T)
        pre_act = mlp.hook_pre(F.linear(x, w_gate))  # (B, T, d_mlp)
        pre_linear = mlp.hook_pre_linear(F.linear(x, w_in))
        post_act = mlp.hook_post(mlp.act_fn(pre_act) * pre_linear + mlp.b_in)
        return F.linear(post_act, w_out, mlp.b_out)

    return forward
