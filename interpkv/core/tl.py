"""The one seam between interpkv and TransformerLens.

Every TransformerLens import in the package goes through this module.
TransformerLens renamed its cache classes between 2.x and 3.x and removed
``HookedTransformer`` in 4.0; when it moves again, this file is what changes.

Besides re-exporting names, it holds the small adapters that read
TransformerLens internals whose names or layouts have moved between releases
(kv-head counts, the kv projection under GQA, rotary tables and bases, ALiBi
slopes, local layers, the frames of a running TransformerLens forward). What
a call routes where is policy, and lives in :mod:`interpkv.core.routing`.

Which TransformerLens each feature needs (docs/transformerlens-versions.md):
everything built on ``HookedTransformer`` (``KVCache``, ``forward``,
``generate``, ``engine="interpkv"`` / ``"transformer_lens"``, the zoo's
HookedTransformers, patching) needs transformer-lens 3.x. ``engine="hf"``,
``Record``, ``diff``, reports and plots need no TransformerLens at all, and
``engine="transformer_bridge"`` needs a ``TransformerBridge`` (3.x or 4.x).
So this module imports under any TransformerLens, or none: when
``HookedTransformer`` cannot be imported, each TransformerLens 3 name here is
a stand-in (:mod:`interpkv.core.tl_versions`) that no object is an instance
of, and whose use (calling it, reading an attribute) raises
:class:`~interpkv.errors.TransformerLensVersionError` naming the version
needed, the one installed and the fix (:func:`require`).
"""

import sys
from types import FrameType
from typing import Optional, Tuple, Union

import torch
from torch.overrides import TorchFunctionMode

from interpkv.core.tl_versions import NEEDED, fail, full_names_only, installed_version, stand_in
from interpkv.errors import TransformerLensVersionError


def require(feature: str) -> None:
    """Raise :class:`~interpkv.errors.TransformerLensVersionError` unless HookedTransformer imports.

    Args:
        feature: what the caller was about to do (``"interpkv.forward"``), named in the message.
    """
    if _IMPORT_ERROR is not None:
        fail(feature, _IMPORT_ERROR)


def require_hooked(model, feature: str) -> None:
    """Raise a clear error unless ``model`` can be a HookedTransformer here.

    Under a TransformerLens without HookedTransformer (4.x, or none):
    :class:`~interpkv.errors.TransformerLensVersionError` (:func:`require`).
    With TransformerLens 3: ``ValueError`` for the two models people hand
    over by mistake, a ``TransformerBridge`` and a ``transformers`` model,
    naming the engine that runs them. Anything else is left to the caller.
    """
    require(feature)
    if isinstance(model, HookedTransformer):
        return
    if is_transformer_bridge(model):
        raise ValueError(
            f"{feature} runs a TransformerLens HookedTransformer, got a TransformerBridge; audit the bridge's own "
            "cache with interpkv.compare(bridge, tokens, steps=[...], engine='transformer_bridge')"
        )
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        raise ValueError(
            f"{feature} runs a TransformerLens HookedTransformer, got {type(model).__name__}; audit its own cache "
            "with interpkv.compare(model, tokens, steps=[...], engine='hf'), or convert it with interpkv.zoo.from_hf(model)"
        )


_IMPORT_ERROR: Optional[ImportError] = None
try:  # in TransformerLens 3 and 4 alike
    from transformer_lens import ActivationCache
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.utilities import get_act_name
    from transformer_lens.utilities.activation_functions import apply_softcap
except ImportError as exc:  # no TransformerLens at all
    ActivationCache, HookPoint = stand_in("ActivationCache", exc), stand_in("HookPoint", exc)  # type: ignore[misc]  # a stand-in for the class
    apply_softcap = stand_in("apply_softcap", exc, "function")
    get_act_name = full_names_only

try:  # TransformerLens 3 only: HookedTransformer and its parts
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
    from transformer_lens.components.abstract_attention import AbstractAttention
    from transformer_lens.components.layer_norm import LayerNorm
    from transformer_lens.components.layer_norm_pre import LayerNormPre
    from transformer_lens.components.mlps.gated_mlp import GatedMLP
    from transformer_lens.components.mlps.mlp import MLP
    from transformer_lens.components.rms_norm_pre import RMSNormPre
    from transformer_lens.components.unembed import Unembed
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )
    from transformer_lens.weight_processing import ProcessWeights
except ImportError as exc:  # TransformerLens 4 (no HookedTransformer) or none at all
    _IMPORT_ERROR = exc
    HookedTransformer, HookedTransformerConfig = stand_in("HookedTransformer", exc), stand_in("HookedTransformerConfig", exc)  # type: ignore[misc]  # a stand-in for the class
    TransformerLensKeyValueCache = stand_in("TransformerLensKeyValueCache", exc)  # type: ignore[misc]  # a stand-in for the class
    TransformerLensKeyValueCacheEntry = stand_in("TransformerLensKeyValueCacheEntry", exc)  # type: ignore[misc]  # a stand-in for the class
    AbstractAttention, LayerNorm, LayerNormPre, GatedMLP, MLP, RMSNormPre, Unembed, ProcessWeights = (  # type: ignore[misc]  # a stand-in for the class
        stand_in(n, exc)
        for n in (
            "AbstractAttention", "LayerNorm", "LayerNormPre", "GatedMLP", "MLP", "RMSNormPre", "Unembed", "ProcessWeights"
        )
    )
    get_pretrained_model_config, get_pretrained_state_dict = (
        stand_in(n, exc, "function") for n in ("get_pretrained_model_config", "get_pretrained_state_dict")
    )

AVAILABLE = _IMPORT_ERROR is None
"""Whether TransformerLens 3's HookedTransformer (and every name above) imported.

``ActivationCache``, ``HookPoint``, ``get_act_name`` and ``apply_softcap`` exist in
TransformerLens 4 too; without any TransformerLens, ``get_act_name`` passes full
hook names through and the rest are stand-ins.
"""


def transformer_bridge_class():
    """TransformerLens's ``TransformerBridge`` class (3.x or 4.x), or None when it cannot be imported."""
    try:
        from transformer_lens.model_bridge import TransformerBridge  # deferred: transformer_lens.model_bridge
    except ImportError:
        return None
    return TransformerBridge


def bridge_from_hf(hf_model: torch.nn.Module, tokenizer, label: str):
    """A ``TransformerBridge`` around an in-memory HF causal LM and tokenizer: nothing is fetched.

    ``TransformerBridge.boot_transformers(label, hf_model=..., tokenizer=...)``;
    the bridge inserts its wrappers into ``hf_model``'s module tree.

    Raises:
        TransformerLensVersionError: the installed TransformerLens has no ``TransformerBridge``.
    """
    bridge_class = transformer_bridge_class()
    if bridge_class is None:
        found = installed_version()
        has = "transformer-lens is not installed" if found is None else f"transformer-lens {found} has none"
        raise TransformerLensVersionError(
            "a TransformerBridge needs transformer-lens>=4 (3.9 has one too); "
            f"{has}. Install it with `pip install 'interpkv[tl4]'`",
            name="transformer_lens",
        )
    device = next(hf_model.parameters()).device
    return bridge_class.boot_transformers(label, hf_model=hf_model, tokenizer=tokenizer, device=device).eval()


def is_transformer_bridge(model) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (never imports TransformerLens for it).

    A bridge's class lives in ``transformer_lens.model_bridge``; a process that
    never imported that cannot hold one, so the check costs nothing otherwise.
    """
    if "transformer_lens.model_bridge" not in sys.modules:
        return False
    cls = transformer_bridge_class()
    return cls is not None and isinstance(model, cls)


__all__ = [
    "AVAILABLE",
    "NEEDED",
    "require",
    "require_hooked",
    "installed_version",
    "transformer_bridge_class",
    "is_transformer_bridge",
    "bridge_from_hf",
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
    "LayerNorm",
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


_TL_FRAMES = (HookedTransformer.forward.__code__, HookedTransformer.input_to_embed.__code__) if AVAILABLE else ()


def forward_locals(max_depth: int = 64):
    """Locals of the innermost TransformerLens ``forward``/``input_to_embed`` frame running now, or None.

    How :func:`interpkv.hook_positions` learns, inside a plain TransformerLens
    call, what TransformerLens itself was given (``past_kv_cache``,
    ``attention_mask``): the hook function is called with neither.
    """
    frame: Optional[FrameType] = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        if frame.f_code in _TL_FRAMES:
            return frame.f_locals
        frame = frame.f_back
    return None
