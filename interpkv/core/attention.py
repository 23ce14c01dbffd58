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

from interpkv.cache.kvcache import KVCache, Slots
from interpkv.cache.window import in_window
from interpkv.core import calls, prepared
from interpkv.core import tl as _tl
from interpkv.core.schemes import PositionalScheme
from interpkv.core.stephooks import StepHooks

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
        all_real: whether every new column is a real token, if the caller
            knows it on the host (no mask, or a mask read on the host); None:
            unknown. Decode steps read nothing back for it: without it,
            padding queries are zeroed on the device.
    """

    def __init__(
        self,
        cache: KVCache,
        scheme: PositionalScheme,
        slots: Slots,
        hooks: Optional[StepHooks] = None,
        *,
        all_real: Optional[bool] = None,
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
        self._empty_rows: Dict[Optional[int], Optional[Tensor]] = {}
        # Every query real, no step hooks: each query may attend at least its own key.
        self.no_empty_rows = all_real is True and hooks is None
        self._bias: Dict[torch.dtype, Optional[Tensor]] = {}
        self._additive: Dict[tuple, Tensor] = {}
        # The whole call is one causal block (empty cache, no padding, no window,
        # no step hooks): the fused kernel needs no mask at all.
        self.causal_only = (
            slots.start == 0
            and cache.window is None
            and hooks is None
            and (all_real if all_real is not None else bool((slots.q_pos >= 0).all()))  # a device mask: one read
        )

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

    def bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        """The scheme's additive score bias (ALiBi) for this call, built once for every layer."""
        if dtype not in self._bias:
            self._bias[dtype] = self.scheme.score_bias(self.bias_q_pos, self.k_pos, dtype)
        return self._bias[dtype]

    def empty_rows(self, local_window: Optional[int]) -> Optional[Tensor]:
        """``[batch, 1, pos, 1]``: queries that may attend no key (padding); None when there can be none.

        Decided on the host (:attr:`no_empty_rows`), never by reading the mask back.
        """
        if self.no_empty_rows:
            return None
        if local_window not in self._empty_rows:
            self._empty_rows[local_window] = ~self.mask(local_window).any(dim=-1, keepdim=True)
        return self._empty_rows[local_window]

    def attention_for(self, layer: int, attn: torch.nn.Module) -> Callable[..., Tensor]:
        """A replacement ``forward`` for ``attn`` (layer ``layer``) bound to this step."""
        cfg = attn.cfg
        local_window = cfg.window_size if _tl.is_local_layer(attn) else None
        softcap = bool(cfg.attn_scores_soft_cap and cfg.attn_scores_soft_cap > 0)
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
            # Scores and pattern are only materialised when something reads them.
            if softcap or calls.has_hooks(attn.hook_attn_scores) or calls.has_hooks(attn.hook_pattern):
                z = step._explicit(attn, layer, local_window, q, keys, values)
            else:
                z = step._fused(attn, local_window, q, keys, values)
            z = attn.hook_z(z)
            return _output(attn, z)

        return forward

    def _explicit(self, attn, layer, local_window, q, keys, values) -> Tensor:
        """Attention with ``hook_attn_scores`` and ``hook_pattern`` as TransformerLens computes them."""
        cfg = attn.cfg
        batch, n_q, n_heads, d_head = q.shape
        kv_heads, n_k = keys.shape[1], keys.shape[2]
        group = n_heads // kv_heads
        # Query head h reads kv head h // group (TransformerLens's repeat_interleave).
        q_grouped = q.permute(0, 2, 1, 3).reshape(batch, kv_heads, group * n_q, d_head)
        scores = (q_grouped @ keys.transpose(-1, -2)).view(batch, n_heads, n_q, n_k)
        scores = scores / attn.attn_scale
        scores = _tl.apply_softcap(scores, cfg.attn_scores_soft_cap)
        bias = self.bias(scores.dtype)
        if bias is not None:
            scores = scores + bias
        scores = torch.where(self.mask(local_window), scores, attn.IGNORE.to(scores.dtype))
        scores = attn.hook_attn_scores(scores)  # (B, H, T, S)

        pattern = F.softmax(scores, dim=-1)
        # Padding queries see no key at all: their row is 0, as in TransformerLens.
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        pattern = attn.hook_pattern(pattern).to(values.dtype)
        z = pattern.reshape(batch, kv_heads, group * n_q, n_k) @ values  # (B, kvh, g*T, d)
        return z.view(batch, n_heads, n_q, d_head).transpose(1, 2)  # (B, T, H, d)

    def _fused_mask(self, local_window: Optional[int], bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """The fused kernel's additive mask: 0 (or ALiBi's bias) where allowed, -inf elsewhere.

        Built once per call (every layer of a call shares it). A boolean mask
        would be turned into this same tensor by the kernel in every layer.
        """
        key = (local_window, dtype)
        if key not in self._additive:
            allowed = self.mask(local_window)
            if bias is None:
                zero = torch.zeros((), dtype=dtype, device=allowed.device)
                self._additive[key] = zero.masked_fill(~allowed, float("-inf"))  # (B, 1, T, S)
            else:
                self._additive[key] = bias.masked_fill(~allowed, float("-inf"))
        return self._additive[key]

    def _fused(self, attn, local_window, q, keys, values) -> Tensor:
        """The same attention through ``F.scaled_dot_product_attention`` (no score tensor kept).

        Equal to :meth:`_explicit` up to rounding (another summation order).
        """
        batch, n_q, n_heads, d_head = q.shape
        kv_heads = keys.shape[1]
        group = n_heads // kv_heads
        scale = 1.0 / float(attn.attn_scale)
        bias = self.bias(q.dtype)
        if bias is None and self.causal_only and local_window is None:
            mask, causal = None, True
        else:
            mask, causal = self._fused_mask(local_window, bias, q.dtype), False  # (B, 1 or H, T, S)
        q_heads = q.transpose(1, 2)  # (B, H, T, d)
        if n_q == 1 and group > 1 and (mask is None or mask.shape[1] == 1):
            # One query: every head of a group reads the same keys, so a group's
            # queries are rows of one product (no GQA repetition, no mask copy).
            q_grouped = q_heads.reshape(batch, kv_heads, group, d_head)
            z = F.scaled_dot_product_attention(
                q_grouped, keys, values, attn_mask=mask, is_causal=False, scale=scale
            ).view(batch, n_heads, 1, d_head)
        else:
            z = F.scaled_dot_product_attention(
                q_heads, keys, values, attn_mask=mask, is_causal=causal, scale=scale,
                enable_gqa=group > 1,
            )  # (B, H, T, d)
        empty = self.empty_rows(local_window) if mask is not None else None
        if empty is not None:  # padding queries: 0, as TransformerLens's pattern rows
            z = z.masked_fill(empty, 0.0)
        return z.transpose(1, 2)  # (B, T, H, d)


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
