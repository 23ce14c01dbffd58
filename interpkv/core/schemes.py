"""Positional schemes: the one factory that reads ``cfg.positional_embedding_type``.

:func:`scheme_for` inspects a model's config once and returns a strategy
object; nothing else in interpkv branches on the scheme string. Every strategy
reads the absolute positions produced by :func:`interpkv.core.positions.absolute_positions`:

- :class:`LearnedPositions` (GPT-2, OPT, and Shortformer, which adds them to
  queries and keys only): embedding rows at each token's absolute position.
- :class:`Rotary` (RoPE, Su et al. 2021, "RoFormer"): queries and keys rotated by
  their absolute positions; keys are rotated once, before they are stored.
- :class:`ALiBi` (Press et al. 2021, "Train Short, Test Long"): a per-head bias
  ``slope[h] * (key_pos - query_pos)`` built from absolute positions, never by
  slicing a precomputed matrix.
"""

import math
import weakref
from typing import Dict, Optional, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

from interpkv.core import tl as _tl
from interpkv.errors import UnsupportedModelError

__all__ = [
    "PositionalScheme",
    "LearnedPositions",
    "Rotary",
    "ALiBi",
    "scheme_for",
    "alibi_slopes",
    "alibi_rule",
    "ALIBI_RULES",
    "UnsupportedModelError",
]


class PositionalScheme:
    """Base strategy: no positional information (subclasses add their own)."""

    name = "none"
    #: Whether the forward reads ``model.pos_embed`` (TransformerLens allocates
    #: ``pos_embed.W_pos`` for ALiBi models too, uninitialised, and never reads it).
    reads_pos_embed = False

    def embed(
        self, model: "_tl.HookedTransformer", embed: Tensor, positions: Tensor
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Return ``(residual, shortformer_pos_embed)`` for the new tokens."""
        return embed, None

    def rotate(self, layer: int, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate queries or keys ``[batch, pos, head, d_head]`` (identity here)."""
        return x

    @property
    def rotates(self) -> bool:
        return False

    def score_bias(
        self, q_pos: Tensor, k_pos: Tensor, dtype: torch.dtype
    ) -> Optional[Float[Tensor, "batch head_index pos kv_pos"]]:
        """Additive bias for attention scores, or None."""
        return None

    def max_positions(self) -> Optional[int]:
        """Largest supported number of positions (None: unbounded)."""
        return None

    def describe(self) -> str:
        return self.name


class LearnedPositions(PositionalScheme):
    """Learned absolute position embeddings (``W_pos``) at absolute positions.

    Args:
        shortformer: add them to queries and keys only (Shortformer) instead of
            to the residual stream (GPT-2).
        n_ctx: rows in ``W_pos``; a position at or past it raises.
    """

    reads_pos_embed = True

    def __init__(self, n_ctx: int, shortformer: bool):
        self.n_ctx = n_ctx
        self.shortformer = shortformer
        self.name = "shortformer" if shortformer else "learned absolute"

    def embed(self, model, embed, positions):
        W_pos = model.pos_embed.W_pos  # (n_ctx, d_model)
        pos_embed = model.hook_pos_embed(W_pos[positions.clamp(min=0)])  # (B, T, d_model)
        if self.shortformer:
            return embed, pos_embed
        return embed + pos_embed, None

    def max_positions(self):
        return self.n_ctx


class Rotary(PositionalScheme):
    """Rotary position embedding applied at absolute positions (Su et al. 2021).

    Sin and cos rows are computed for the positions a call uses, from the
    frequencies TransformerLens's own per-layer computation divides by
    (:func:`interpkv.core.tl.rotary_frequencies`), equal bit for bit to its
    table rows. No table from position 0 is kept, so a windowed cache at
    position 2^22 costs what one at position 22 does, and no host read of
    the positions is needed. A variant whose rows cannot be reproduced that
    way (checked against TransformerLens's table) falls back to tables from
    :func:`interpkv.core.tl.rotary_tables`, grown on demand.
    """

    def __init__(self, model: "_tl.HookedTransformer", rotary_dim: int, adjacent_pairs: bool):
        self.rotary_dim = rotary_dim
        self.adjacent_pairs = adjacent_pairs
        self._attn = [block.attn for block in model.blocks]
        # Layers whose tables are equal share one: they differ only by base and
        # local/global type (Gemma-style per-layer bases and scalings).
        self._kind = [(_tl.rotary_base(a), _tl.is_local_layer(a)) for a in self._attn]
        self._freqs: Dict[tuple, Optional[Tuple[torch.dtype, Tensor]]] = {}
        self._tables: Dict[tuple, Tuple[Tensor, Tensor]] = {}
        self._last: Optional[tuple] = None  # (positions, key, sin rows, cos rows) of the latest call
        self.name = "rotary"

    @property
    def rotates(self) -> bool:
        return True

    def _frequencies(self, layer: int, dtype, device) -> Optional[Tuple[torch.dtype, Tensor]]:
        key = (self._kind[layer], dtype, device)
        if key not in self._freqs:
            found = _tl.rotary_frequencies(self._attn[layer], dtype)  # checked on the CPU
            self._freqs[key] = None if found is None else (found[0], found[1].to(device))
        return self._freqs[key]

    def _table(self, layer: int, needed: int, dtype, device) -> Tuple[Tensor, Tensor]:
        key = (self._kind[layer], dtype, device)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < needed:
            size = max(needed, 2 * (table[0].shape[0] if table is not None else 512))
            # Kept across calls: never an inference tensor (a table built under
            # torch.inference_mode() could not be saved for a later backward).
            with torch.inference_mode(False), torch.no_grad():
                sin, cos = _tl.rotary_tables(self._attn[layer], size, dtype)
                table = (sin.to(device).clone(), cos.to(device).clone())
            self._tables[key] = table
        return table

    def _rotation_rows(self, layer: int, positions: Tensor, dtype, device) -> Tuple[Tensor, Tensor]:
        """Signed sin rows and cos rows at ``positions``, ``[batch, pos, 1, rotary_dim]`` (see :meth:`rotate`).

        Every layer of one call (queries and keys) rotates by the same positions
        tensor: the rows are computed once per call and table kind, not per use.
        """
        key = (self._kind[layer], dtype, device)
        last = self._last
        if last is not None and last[0] is positions and last[1] == key:
            return last[2], last[3]
        sin, cos = self._rows(layer, positions, dtype, device)
        # The sign of the rotation moves from the swapped coordinates to sin, once per
        # call: each rotation is then swap, multiply, multiply-add (-a * s == a * -s exactly).
        if self.adjacent_pairs:  # GPT-J: pairs (0,1), (2,3), ...: the first of each pair
            signed = torch.stack((-sin[..., ::2], sin[..., 1::2]), dim=-1).flatten(-2)
        else:  # GPT-NeoX / Llama: pairs (i, i + rotary_dim/2): the first half
            half = self.rotary_dim // 2
            signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        self._last = (positions, key, signed, cos)
        return signed, cos

    def _rows(self, layer: int, positions: Tensor, dtype, device) -> Tuple[Tensor, Tensor]:
        """Sin and cos rows at ``positions``, ``[batch, pos, 1, rotary_dim]`` (TransformerLens's table rows)."""
        index = positions.clamp(min=0)
        found = self._frequencies(layer, dtype, device)
        if found is not None:
            pos_dtype, freq = found
            angles = index.to(pos_dtype)[..., None] / freq  # (B, T, rotary_dim), as TransformerLens's rows
            sin, cos = angles.sin().to(dtype), angles.cos().to(dtype)
        else:  # a table from position 0 (reads the largest position back to the host)
            needed = int(positions.max()) + 1 if positions.numel() else 1
            table_sin, table_cos = self._table(layer, needed, dtype, device)
            sin, cos = table_sin[index], table_cos[index]
        return sin[:, :, None, :], cos[:, :, None, :]  # (B, T, 1, rotary_dim)

    def rotate(self, layer, x, positions):
        signed_sin, cos = self._rotation_rows(layer, positions, x.dtype, x.device)
        dim = self.rotary_dim
        x_rot = x if dim == x.shape[-1] else x[..., :dim]
        if self.adjacent_pairs:  # (x1, x0, x3, x2, ...)
            swapped = torch.stack((x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
        else:  # (second half, first half)
            half = dim // 2
            swapped = torch.cat((x_rot[..., half:], x_rot[..., :half]), dim=-1)
        # addcmul(a, b, c) is a + b * c, rounded as the two ops (no fused multiply-add on a CPU)
        rotated = torch.addcmul(x_rot * cos, swapped, signed_sin)
        return rotated if dim == x.shape[-1] else torch.cat((rotated, x[..., dim:]), dim=-1)

    def describe(self):
        style = "adjacent pairs" if self.adjacent_pairs else "rotate-half"
        return f"rotary ({style}, rotary_dim {self.rotary_dim})"


ALIBI_RULES = ("bloom", "transformer_lens")
"""Slope rules of :func:`alibi_slopes`: the one a model was defined with."""

_BLOOM_ARCHITECTURES = ("BloomForCausalLM", "BloomModel")
"""``cfg.original_architecture`` values whose ALiBi slopes follow Bloom's rule."""


def alibi_slopes(n_heads: int, rule: str = "bloom") -> Float[Tensor, " head_index"]:
    """ALiBi head slopes by Bloom's rule (float64) or TransformerLens's (float32).

    ``rule="bloom"``: for a power of two ``n`` the slopes are ``2^(-8i/n)``,
    i = 1..n. Otherwise the ``2^floor(log2 n)`` slopes of the next lower power
    are followed by the odd-indexed slopes of the next higher power (Press et
    al. 2021; HF Bloom's ``build_alibi_tensor``). Returned in float64.

    ``rule="transformer_lens"``: whatever the installed TransformerLens's
    ``AbstractAttention.create_alibi_multipliers`` computes (in float32); in 3.9
    that is ``2^(-8i/n)`` for every n. This is what a model defined by a
    ``HookedTransformerConfig(positional_embedding_type="alibi")`` computes; the
    two rules agree when n is a power of two.

    >>> alibi_slopes(4).tolist()
    [0.25, 0.0625, 0.015625, 0.00390625]
    >>> alibi_slopes(6).tolist()  # 2^-2, 2^-4, 2^-6, 2^-8 (4 heads), then 2^-1, 2^-3 (odd ones of 8)
    [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    >>> bool(torch.allclose(alibi_slopes(8, rule="transformer_lens").double(), alibi_slopes(8)))
    True
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    if rule == "transformer_lens":
        return _tl.alibi_multipliers(n_heads).to(torch.float32)
    if rule != "bloom":
        raise ValueError(f"unknown ALiBi slope rule {rule!r}; use one of {ALIBI_RULES}")
    closest = 2 ** math.floor(math.log2(n_heads))

    def powers(n: int) -> list:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    slopes = powers(closest)
    if closest != n_heads:
        slopes += powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


def alibi_rule(cfg) -> str:
    """The slope rule a model was defined with (see :func:`alibi_slopes`).

    Models converted from Bloom (``cfg.original_architecture`` is Bloom's)
    use Bloom's rule, as HF computes them; every other ALiBi model is defined
    by TransformerLens's own forward and uses its rule.
    """
    if getattr(cfg, "original_architecture", None) in _BLOOM_ARCHITECTURES:
        return "bloom"
    return "transformer_lens"


class ALiBi(PositionalScheme):
    """ALiBi: ``slope[h] * (key_pos - query_pos)`` from absolute positions.

    The bias is computed in the slopes' dtype and then cast: float64 for
    Bloom's rule, float32 for TransformerLens's (whose forward adds a float32
    bias even to a float64 model), so each model gets bit for bit the bias it
    is defined with.

    Args:
        n_heads: number of query heads.
        rule: ``"bloom"`` or ``"transformer_lens"`` (see :func:`alibi_slopes`).
    """

    def __init__(self, n_heads: int, rule: str = "bloom"):
        self.rule = rule
        self.slopes = alibi_slopes(n_heads, rule)
        self.name = "ALiBi"

    def score_bias(self, q_pos, k_pos, dtype):
        slopes = self.slopes.to(device=q_pos.device)
        distance = (k_pos[:, None, :] - q_pos[:, :, None]).clamp(max=0)  # (B, T, S)
        bias = slopes[None, :, None, None] * distance[:, None].to(slopes.dtype)  # (B, H, T, S)
        return bias.to(dtype)

    def describe(self):
        rule = "Bloom slopes" if self.rule == "bloom" else "TransformerLens slopes 2^(-8i/n)"
        return f"ALiBi ({len(self.slopes)} heads, {rule})"


_UNSUPPORTED = {
    "use_attention_sinks": "learned attention-sink logits (GPT-OSS)",
    "clip_qkv": "Q/K/V clipping (OLMo)",
    "use_logn_attn": "log-n attention scaling (Qwen-1)",
    "use_dynamic_ntk_rope": "dynamic NTK rotary rescaling (Qwen-1)",
}

_SCHEMES: "weakref.WeakKeyDictionary[_tl.HookedTransformer, PositionalScheme]" = (
    weakref.WeakKeyDictionary()
)


_INSTEAD = (
    "Run it with TransformerLens's own forward (model(tokens), or model.generate with its "
    "own past_kv_cache) or with transformers instead."
)


def _check_supported(cfg) -> None:
    """Raise for features interpkv's attention does not compute (message names the way out)."""
    for field, what in _UNSUPPORTED.items():
        value = getattr(cfg, field, None)
        if value not in (None, False, 0):
            raise UnsupportedModelError(
                f"interpkv does not support {what} (cfg.{field}={value!r}) yet, and computing "
                f"without it would give other logits. {_INSTEAD}"
            )
    if getattr(cfg, "attention_dir", "causal") != "causal":
        raise UnsupportedModelError(
            f"interpkv caches causal models only; this one has attention_dir={cfg.attention_dir!r}, "
            "so every position changes when a token is added and there is nothing to cache. "
            "Run it uncached with model(tokens)."
        )
    if cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        raise UnsupportedModelError(
            f"interpkv does not support {cfg.original_architecture}'s full-width Q/K norms "
            f"(applied over all heads at once, before the head split) yet. {_INSTEAD}"
        )


def scheme_for(model: "_tl.HookedTransformer") -> PositionalScheme:
    """The positional strategy of a model (memoized per model object).

    Args:
        model: a TransformerLens ``HookedTransformer``.

    Returns:
        A :class:`PositionalScheme` for ``model.cfg.positional_embedding_type``.

    Raises:
        UnsupportedModelError: a scheme or attention feature interpkv cannot cache.
    """
    scheme = _SCHEMES.get(model)
    if scheme is not None:
        return scheme
    cfg = model.cfg
    _check_supported(cfg)
    kind = cfg.positional_embedding_type
    if kind in ("standard", "shortformer"):
        scheme = LearnedPositions(cfg.n_ctx, shortformer=kind == "shortformer")
    elif kind == "rotary":
        scheme = Rotary(model, int(cfg.rotary_dim), bool(cfg.rotary_adjacent_pairs))
    elif kind == "alibi":
        scheme = ALiBi(cfg.n_heads, alibi_rule(cfg))
    else:
        raise UnsupportedModelError(
            f"positional_embedding_type={kind!r} is not supported by interpkv "
            f"(supported: standard, shortformer, rotary, alibi). {_INSTEAD}"
        )
    _SCHEMES[model] = scheme
    return scheme
