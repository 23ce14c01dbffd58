"""Conversion fidelity: what TransformerLens's HF converter drops, and the check.

TransformerLens 3.9 converts many HF classes but silently drops some of their
features, so the converted model computes another function:

- sliding-window attention: Mistral's ``sliding_window`` and the per-layer
  ``layer_types`` of Qwen2/Qwen3 (``use_sliding_window``) are ignored, every
  layer attends globally (Qwen2 with a window of 8: logits 2.1 off HF);
- Llama's ``attention_bias=True``: its q/k/v/o biases are replaced by zeros
  (logits ~4 off);
- Phi-3's ``partial_rotary_factor``: TL rotates the whole head (logits 7.1 off
  at 0.5).

:func:`fix_config` and :func:`fix_state_dict` repair those. Whatever else a
converter drops is caught by :func:`verify`, which runs the converted model
(through :func:`interpkv.forward`) and the HF model on a short ragged,
left-padded batch and raises :class:`~interpkv.errors.UnsupportedModelError`
naming the measured logit gap and the features that can cause it.
"""

from typing import Any, Dict, List

import torch

from interpkv.errors import UnsupportedModelError
from interpkv.tolerances import HF_LOGITS

__all__ = ["fix_config", "fix_state_dict", "suspect_features", "verify", "VERIFY_LENGTH"]

VERIFY_LENGTH = 16
"""Tokens per row of the verification batch (longer when a window must bite)."""

_MAX_VERIFY_LENGTH = 64


def _sliding_layers(config: Any, n_layers: int):
    """``["local"|"global"] * n_layers`` from an HF config, or None (no window)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kinds = ["local" if t == "sliding_attention" else "global" for t in layer_types]
        return kinds if "local" in kinds else None
    if getattr(config, "model_type", None) in ("mistral", "mixtral"):
        return ["local"] * n_layers  # every layer windowed, no layer_types field
    return None


def _partial_rotary_factor(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    return float(factor or getattr(config, "partial_rotary_factor", None) or 1.0)


def fix_config(cfg: Any, config: Any) -> None:
    """Give ``cfg`` what TL's converter dropped from HF ``config``.

    Sliding-window layers (Qwen2/Qwen3 ``layer_types``, Mistral), and a
    partial rotary dimension (Phi-3 ``partial_rotary_factor``: TL rotates the
    whole head).
    """
    kinds = _sliding_layers(config, cfg.n_layers)
    if kinds is not None and not cfg.use_local_attn:
        cfg.use_local_attn = True
        cfg.attn_types = kinds
        cfg.window_size = int(config.sliding_window)
    factor = _partial_rotary_factor(config)
    if cfg.positional_embedding_type == "rotary" and factor < 1 and cfg.rotary_dim == cfg.d_head:
        cfg.rotary_dim = int(cfg.d_head * factor)


def _attention_modules(hf: Any):
    """``self_attn`` of every decoder layer of a Llama-layout HF model, or []."""
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if layers is None:
        return []
    return [getattr(layer, "self_attn", None) for layer in layers]


def fix_state_dict(state_dict: Dict[str, torch.Tensor], hf: Any, cfg: Any) -> Dict[str, torch.Tensor]:
    """Copy the q/k/v/o biases TL's converter replaced by zeros (Llama ``attention_bias``).

    Only Llama-layout models (``model.layers[i].self_attn.{q,k,v,o}_proj``) and
    only where TL left a zero bias; a bias TL did convert (Qwen2) is kept.
    """
    for layer, attn in enumerate(_attention_modules(hf)):
        if attn is None:
            continue
        for proj, name in (("q_proj", "b_Q"), ("k_proj", "b_K"), ("v_proj", "b_V"), ("o_proj", "b_O")):
            bias = getattr(getattr(attn, proj, None), "bias", None)
            if bias is None:
                continue
            key = f"blocks.{layer}.attn.{name}"
            if key not in state_dict:
                key = f"blocks.{layer}.attn._{name}"  # GQA stores K/V at kv heads
            if key not in state_dict or torch.count_nonzero(state_dict[key]):
                continue
            target = state_dict[key]
            state_dict[key] = bias.detach().reshape(target.shape).to(target.dtype).clone()
    return state_dict


def suspect_features(hf: Any) -> List[str]:
    """Features of an HF model that TransformerLens's converter is known to drop."""
    config = hf.config
    found = []
    if getattr(config, "mlp_bias", False):
        found.append(
            "mlp_bias=True (TransformerLens's gated MLP has no bias on gate_proj/up_proj)"
        )
    if getattr(config, "attention_bias", False):
        found.append("attention_bias=True (q/k/v/o biases)")
    if _sliding_layers(config, getattr(config, "num_hidden_layers", 0) or 0) is not None:
        found.append(f"sliding-window attention (sliding_window={config.sliding_window})")
    factor = _partial_rotary_factor(config)
    if factor < 1:
        found.append(f"partial_rotary_factor={factor:g} (rotary on part of each head)")
    rope = getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind not in (None, "default", "llama3"):
        found.append(f"rope_scaling type {kind!r}")
    return found


def _inputs(d_vocab: int, length: int):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, d_vocab, (3, length), generator=gen)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, : length // 2] = 0  # left padding, ragged rows
    return tokens, mask


def verify(tl: Any, hf: Any, *, label: str) -> float:
    """Check that ``tl`` computes what ``hf`` does; raise if it does not.

    Both run a ragged, left-padded batch of 3 rows (``tl`` through
    :func:`interpkv.forward`, ``hf`` with the same mask and explicit position
    ids); the window, if any, is made to bite.

    Returns:
        The measured max |logit| gap over real tokens.

    Raises:
        UnsupportedModelError: the gap exceeds ``HF_LOGITS[dtype] * max(1,
            max |logit|)``; the message names the gap and the suspected features.
    """
    from interpkv.core.forward import forward
    from interpkv.diagnostics.hf_reference import hf_logits

    window = tl.cfg.window_size if tl.cfg.use_local_attn else None
    length = VERIFY_LENGTH if window is None else max(VERIFY_LENGTH, min(window + 8, _MAX_VERIFY_LENGTH))
    tokens, mask = _inputs(tl.cfg.d_vocab, length)
    with torch.no_grad():
        got = forward(tl, tokens, attention_mask=mask)
        ref = hf_logits(hf, tokens, mask)
    real = mask.bool()
    if not bool(torch.isfinite(ref[real]).all()):  # NaN/inf in HF itself: not a converter problem
        raise UnsupportedModelError(
            f"zoo.from_hf({label!r}): the HF {type(hf).__name__}'s own logits are NaN/inf at real tokens "
            f"of a left-padded batch of {length} tokens; check its weights "
            "(e.g. torch.isfinite(p).all() for each parameter) before checking its cache"
        )
    gap = (got[real].double() - ref[real].double()).abs().max().item()
    scale = max(1.0, ref[real].abs().max().item())
    tol = HF_LOGITS.get(tl.cfg.dtype, 1e-4) * scale
    if not gap <= tol:  # NaN fails too
        features = suspect_features(hf)
        causes = "; ".join(features) if features else "a feature TransformerLens's converter drops"
        raise UnsupportedModelError(
            f"zoo.from_hf({label!r}): the converted {type(hf).__name__} computes another function "
            f"than the HF model: max |logit gap| {gap:.3g} on a left-padded batch of "
            f"{length} tokens (tolerance {tol:.1g}). Likely cause: {causes}. interpkv refuses to "
            "return it; run this model with transformers, or remove the feature from its config "
            "if it is unused."
        )
    return gap
