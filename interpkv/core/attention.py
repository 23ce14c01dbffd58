"""Position-aware attention for one forward pass through a :class:`KVCache`.

:class:`Step` holds what every layer of one call shares: the absolute
positions of the new queries and of every key (stored + new), and the boolean
"may attend" masks, built once per call from positions alone (never an O(n^2)
matrix kept between calls). :meth:`Step.attention_for` returns, for one
TransformerLens attention module, a drop-in ``forward`` that

1. computes q, k, v with the module's own weights (``hook_q/k/v`` fire),
2. rotates them at their absolute positions (``hook_rot_q/k`` fire on the new
   positions only, since stored keys are already rotated),
3. writes the new keys and values into the cache (no GQA repetition),
4. attends over stored + new keys with the scheme's bias (ALiBi) and the mask
   (``hook_attn_scores``, ``hook_pattern``, ``hook_z``, ``hook_result`` fire with
   TransformerLens's shapes: ``[batch, head_index, pos, kv_pos]`` for scores).

Cached and uncached calls run exactly this code; an uncached call just uses a
fresh cache.
"""

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor


from interpkv.core import tl as _tl

from interpkv.core import prepared
from interpkv.cache.kvcache import KVCache, Slots
from interpkv.cache.window import in_window
from interpkv.core.stephooks import StepHooks
from interpkv.core.schemes import PositionalScheme

__all__ = ["Step", "allowed_keys"]


def allowed_keys(
    q_pos: Int[Tensor, "batch pos"],
    k_pos: Int[Tensor, "batch kv_pos"],
    *,
    local_window: Optional[int] = None,
    cache_window: Optional[int] = None,
    sinks: int = 0,
) -> Bool[Tensor, "batch 1 pos kv_pos"]:
    """Which keys each query may attend to, from absolute positions alone.

    A key is allowed when it is real (position >= 0), not in the future, inside
    a local layer's window (``q - k < local_window``) and, for a windowed cache,
    one of the first ``sinks`` positions or inside the cache window.

    >>> allowed_keys(torch.tensor([[2]]), torch.tensor([[0, 1, 2, -1]]))[0, 0].tolist()
    [[True, True, True, False]]
    """
    q = q_pos[:, :, None]  # (B, T, 1)
    k = k_pos[:, None, :]  # (B, 1, S)
    allowed = (k >= 0) & (k <= q)
    if local_window is not None:
        allowed &= k > q - local_window
    if cache_window is not None:
        allowed &= in_window(k, q, cache_window, sinks)
    return allowed[:, None]  # (B, 1, T, S)


class Step:
    """Shared state of one forward call through a cache (see module docstring).

    Args:
        cache: the cache the call reads and writes.
        scheme: the model's positional scheme.
        slots: what :meth:`KVCache.begin` returned for this call.
        hooks: step hooks installed on the model (:mod:`interpkv.core.stephooks`),
            None for the plain path.
    """

    def __init__(
        self,
        cache: KVCache,
        scheme: PositionalScheme,
        slots: Slots,
        hooks: Optional[StepHooks] = None,
    ):
        self.cache = cache
        self.scheme = scheme
        self.slots = slots
        self.q_pos = slots.q_pos
        self.k_pos = slots.k_pos
        self.start = slots.start
        self.end = slots.end
        self.hooks = hooks
        self.bias_q_pos = hooks.bias_positions(cache, slots.q_pos) if hooks else slots.q_pos
        self._masks: Dict[Optional[int], Tensor] = {}

    def mask(self, local_window: Optional[int]) -> Tensor:
        if local_window not in self._masks:
            mask = allowed_keys(
                self.q_pos,
                self.k_pos,
                local_window=local_window,
                cache_window=self.cache.window,
                sinks=self.cache.sinks,
            )
            if self.hooks:
                mask = self.hooks.allowed(self.cache, self.slots, mask)
            self._masks[local_window] = mask
        return self._masks[local_window]

    def attention_for(self, layer: int, attn: torch.nn.Module) -> Callable[..., Tensor]:
        """A replacement ``forward`` for ``attn`` (layer ``layer``) bound to this step."""
        cfg = attn.cfg
        local_window = cfg.window_size if _tl.is_local_layer(attn) else None
        scheme = self.scheme
        step = self

        def forward(query_input, key_input, value_input, *args, **kwargs) -> Tensor:
            q, k, v = _qkv(attn, query_input, key_input, value_input)
            if scheme.rotates:
                q = attn.hook_rot_q(scheme.rotate(layer, q, step.q_pos))
                k = attn.hook_rot_k(scheme.rotate(layer, k, step.q_pos))
            layer_cache = step.cache.layers[layer]
            if step.hooks:
                k, v = step.hooks.stored_kv(layer_cache, k, v)
            layer_cache.write(step.start, k, v)
            keys, values = layer_cache.view(step.end)  # (B, kvh, S, d)

            batch, n_q, n_heads, d_head = q.shape
            kv_heads, n_k = keys.shape[1], keys.shape[2]
            group = n_heads // kv_heads
            # Query head h reads kv head h // group (TransformerLens's repeat_interleave).
            q_grouped = q.permute(0, 2, 1, 3).reshape(batch, kv_heads, group * n_q, d_head)
            scores = (q_grouped @ keys.transpose(-1, -2)).view(batch, n_heads, n_q, n_k)
            scores = scores / attn.attn_scale
            scores = _tl.apply_softcap(scores, cfg.attn_scores_soft_cap)
            bias = scheme.score_bias(step.bias_q_pos, step.k_pos, scores.dtype)
            if bias is not None:
                scores = scores + bias
            scores = torch.where(step.mask(local_window), scores, attn.IGNORE.to(scores.dtype))
            scores = attn.hook_attn_scores(scores)  # (B, H, T, S)

            pattern = F.softmax(scores, dim=-1)
            # Padding queries see no key at all: their row is 0, as in TransformerLens.
            pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
            pattern = attn.hook_pattern(pattern).to(values.dtype)
            z = pattern.reshape(batch, kv_heads, group * n_q, n_k) @ values  # (B, kvh, g*T, d)
            z = z.view(batch, n_heads, n_q, d_head).transpose(1, 2)  # (B, T, H, d)
            z = attn.hook_z(z)
            return _output(attn, z)

        return forward


def _qkv(attn: torch.nn.Module, query_input: Tensor, key_input: Tensor, value_input: Tensor):
    """q, k, v as ``attn.calculate_qkv_matrices`` computes them (hooks fire).

    The common case (one residual input, no Q/K norm, unquantised weights) skips
    TransformerLens's per-call weight rearrangement (:mod:`interpkv.core.prepared`:
    the same products, no weight copy); anything else runs TransformerLens's own.
    """
    cfg = attn.cfg
    if cfg.use_split_qkv_input or cfg.use_attn_in or cfg.use_qk_norm or cfg.load_in_4bit:
        return attn.calculate_qkv_matrices(query_input, key_input, value_input)
    W_K, b_K, W_V, b_V = _tl.kv_projection(attn)
    q = attn.hook_q(prepared.project_heads(query_input, attn.W_Q, attn.b_Q))
    k = attn.hook_k(prepared.project_heads(key_input, W_K, b_K))
    v = attn.hook_v(prepared.project_heads(value_input, W_V, b_V))
    return q, k, v


def _output(attn: torch.nn.Module, z: Tensor) -> Tensor:
    """Project ``z`` through ``W_O`` exactly as TransformerLens does."""
    batch, n_q, n_heads, d_head = z.shape
    if attn.cfg.use_attn_result:
        w = attn.W_O[None, None]  # (1, 1, H, d, d_model)
        result = attn.hook_result((z[..., None] * w).sum(-2))  # (B, T, H, d_model)
        return result.sum(dim=2) + attn.b_O
    w = attn.W_O.reshape(n_heads * d_head, -1).T  # (d_model, H*d)
    return F.linear(z.reshape(batch, n_q, n_heads * d_head), w, attn.b_O)
