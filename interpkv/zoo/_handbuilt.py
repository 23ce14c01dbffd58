"""TransformerLens configs built by hand for HF classes TL 3.9 maps only by hub name.

TL's ``convert_hf_model_config`` knows Gemma 2 and Gemma 3 only as
``google/gemma-...`` checkpoints; their weight converters work on any
instance. :func:`tl_config` mirrors what TL produces for those checkpoints
(e.g. ``google/gemma-2-2b``, ``google/gemma-3-1b-pt``), with the sizes, the
local/global layer pattern and the rotary bases read off the HF config.
"""

from typing import Any

import torch

from interpkv.core.tl import HookedTransformerConfig

__all__ = ["MODEL_TYPES", "tl_config"]

MODEL_TYPES = ("gemma2", "gemma3_text")
"""HF ``model_type`` values :func:`tl_config` builds."""


def _rope_theta(config: Any, layer_type: str) -> float:
    params = config.rope_parameters
    if layer_type in params:  # Gemma 3: one entry per layer type
        return float(params[layer_type]["rope_theta"])
    return float(params["rope_theta"])


def tl_config(config: Any, dtype: torch.dtype) -> HookedTransformerConfig:
    """A HookedTransformerConfig for an HF Gemma 2 or Gemma 3 (text) config.

    Args:
        config: the HF config (``model_type`` in :data:`MODEL_TYPES`).
        dtype: parameter dtype.

    Returns:
        The config, with folded (``RMSPre``) norms as ``from_pretrained(fold_ln=True)`` makes.
    """
    gemma3 = config.model_type == "gemma3_text"
    attn_types = ["local" if t == "sliding_attention" else "global" for t in config.layer_types]
    extra = {}
    if gemma3:
        extra = dict(
            use_qk_norm=True,
            rotary_base_local=_rope_theta(config, "sliding_attention"),
        )
    return HookedTransformerConfig(
        d_model=config.hidden_size,
        d_head=config.head_dim,
        n_heads=config.num_attention_heads,
        d_mlp=config.intermediate_size,
        n_layers=config.num_hidden_layers,
        n_ctx=config.max_position_embeddings,
        eps=config.rms_norm_eps,
        d_vocab=config.vocab_size,
        act_fn=config.hidden_activation,
        normalization_type="RMSPre",  # fold_ln=True, as from_pretrained would do
        rotary_base=_rope_theta(config, "full_attention"),
        positional_embedding_type="rotary",
        rotary_dim=config.head_dim,
        use_attn_scale=True,
        attn_scale=config.query_pre_attn_scalar**0.5,
        n_key_value_heads=config.num_key_value_heads,
        window_size=config.sliding_window,
        use_local_attn=True,
        attn_types=attn_types,
        attn_scores_soft_cap=config.attn_logit_softcapping or -1.0,
        output_logits_soft_cap=config.final_logit_softcapping or -1.0,
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        original_architecture="Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM",
        model_name=config.model_type,
        init_weights=False,
        dtype=dtype,
        device="cpu",
        default_prepend_bos=False,
        **extra,
    )
