"""One small spec per built-in zoo model.

Each :class:`ModelSpec` names the HuggingFace config class and the keyword
arguments that build a tiny, randomly initialised model of that architecture,
plus a human-readable description used by :func:`interpkv.zoo.info`.

Sizes are chosen so every model has ``d_model <= 256``, loads in well under a
second once memoized, and still exercises the positional scheme it stands for:
sliding windows are 8 tokens so they bite on 20-40 token inputs, rotary models
use a partial ``rotary_dim`` where the architecture allows it, and the Llama
spec uses Llama-3 rope scaling with a short ``original_max_position_embeddings``
so the NTK-by-parts interpolation band covers real frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VOCAB = 97
"""Vocabulary size shared by every zoo model (a prime, to avoid lucky alignments)."""

LEARNED_CTX = 256
"""Context length of models with a learned positional table."""

FUNCTIONAL_CTX = 2048
"""Context length of rotary / ALiBi models (no table to store)."""

WINDOW = 8
"""Sliding / local attention window used by every windowed model."""


@dataclass(frozen=True)
class ModelSpec:
    """Recipe for one tiny zoo model.

    Attributes:
        name: Zoo name, e.g. ``"llama"``.
        architecture: HF architecture string (or a TL-only label).
        positional: Human-readable positional scheme.
        attention: Human-readable attention details (heads, GQA, windows).
        hf_config_class: Name of the ``transformers`` config class, or ``None``
            for TransformerLens-only models (no HF pair).
        hf_kwargs: Keyword arguments for the HF config class.
        tl_kwargs: For TL-only models, keyword arguments of
            ``HookedTransformerConfig``.
        tl_pair_note: Why TL and HF disagree, if they are known to (else ``None``).
        perturb: Standard deviation of the Gaussian noise added to every 1-D HF
            parameter (norm weights, biases) after initialisation. HF starts
            them at exactly one / zero, where weight folding is trivial and a
            dropped bias goes unnoticed.
        processing: ``"interpkv"`` (fold_ln, center_writing_weights,
            fold_value_biases in the weights' own dtype; logits equal HF's) or
            ``"transformer_lens"`` (TL's ``load_and_process_state_dict`` with
            ``from_pretrained``'s defaults, ``center_unembed`` included: each
            position's logits are HF's shifted by a constant, and float64
            weights pass through TL's float32 round trip).
    """

    name: str
    architecture: str
    positional: str
    attention: str
    hf_config_class: str | None = None
    hf_kwargs: dict[str, Any] = field(default_factory=dict)
    tl_kwargs: dict[str, Any] = field(default_factory=dict)
    tl_pair_note: str | None = None
    perturb: float = 0.0
    processing: str = "interpkv"


PERTURB = 0.3
"""Noise on norm weights and biases of the models that randomise them."""


def _gqa(**kwargs: Any) -> dict[str, Any]:
    """A 2-layer GQA decoder (64 wide, 4 query / 2 KV heads of 16), plus ``kwargs``."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=FUNCTIONAL_CTX,
        initializer_range=0.2,
        tie_word_embeddings=False,
        **kwargs,
    )


def _bloom(n_head: int, d_model: int) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=d_model,
        n_layer=2,
        n_head=n_head,
        initializer_range=0.2,
    )


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            name="gpt2",
            architecture="GPT2LMHeadModel",
            positional="learned absolute",
            attention="MHA, 4 heads, full causal",
            hf_config_class="GPT2Config",
            hf_kwargs=dict(
                vocab_size=VOCAB,
                n_positions=LEARNED_CTX,
                n_ctx=LEARNED_CTX,  # TL reads hf_config.n_ctx (not stored by default)
                n_embd=64,
                n_layer=2,
                n_head=4,
                initializer_range=0.2,
            ),
        ),
        ModelSpec(
            name="shortformer",
            architecture="HookedTransformer (shortformer)",
            positional="shortformer (learned, added to Q/K inputs only)",
            attention="MHA, 4 heads, full causal",
            tl_kwargs=dict(
                n_layers=2,
                d_model=64,
                d_head=16,
                n_heads=4,
                d_mlp=256,
                n_ctx=LEARNED_CTX,
                d_vocab=VOCAB,
                act_fn="gelu_new",
                normalization_type="LN",
                positional_embedding_type="shortformer",
                initializer_range=0.2,
            ),
        ),
        ModelSpec(
            name="neox",
            architecture="GPTNeoXForCausalLM",
            positional="rotary (rotate-half, rotary_dim 8 of 16)",
            attention="MHA, 4 heads, full causal, parallel attn+mlp",
            hf_config_class="GPTNeoXConfig",
            hf_kwargs=dict(
                vocab_size=VOCAB,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=256,
                rotary_pct=0.5,
                max_position_embeddings=FUNCTIONAL_CTX,
                use_parallel_residual=True,
                initializer_range=0.2,
            ),
        ),
        ModelSpec(
            name="gptj",
            architecture="GPTJForCausalLM",
            positional="rotary (adjacent pairs, rotary_dim 8 of 16)",
            attention="MHA, 4 heads, full causal, parallel attn+mlp",
            hf_config_class="GPTJConfig",
            hf_kwargs=dict(
                vocab_size=VOCAB,
                n_positions=FUNCTIONAL_CTX,
                n_embd=64,
                n_layer=2,
                n_head=4,
                rotary_dim=8,
                initializer_range=0.2,
            ),
        ),
        ModelSpec(
            name="llama",
            architecture="LlamaForCausalLM",
            positional="rotary (rotate-half, rotary_dim 16 of 16, llama3 NTK-by-parts scaling)",
            attention="GQA, 8 query heads / 2 KV heads, full causal",
            hf_config_class="LlamaConfig",
            hf_kwargs=dict(
                vocab_size=VOCAB,
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=8,
                num_key_value_heads=2,
                max_position_embeddings=FUNCTIONAL_CTX,
                rope_theta=10000.0,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=64,
                ),
                initializer_range=0.2,
                tie_word_embeddings=False,
            ),
        ),
        ModelSpec(
            name="mistral",
            architecture="MistralForCausalLM",
            positional="rotary (rotate-half, rotary_dim 8 of 8)",
            attention=f"GQA, 8 query heads / 4 KV heads, sliding window {WINDOW} (all layers)",
            hf_config_class="MistralConfig",
            hf_kwargs=dict(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=8,
                sliding_window=WINDOW,
                max_position_embeddings=FUNCTIONAL_CTX,
                initializer_range=0.2,
                tie_word_embeddings=False,
            ),
        ),
        ModelSpec(
            name="bloom",
            architecture="BloomForCausalLM",
            positional="ALiBi (4 heads, power of two)",
            attention="MHA, 4 heads, full causal",
            hf_config_class="BloomConfig",
            hf_kwargs=_bloom(4, 64),
        ),
        ModelSpec(
            name="bloom6",
            architecture="BloomForCausalLM",
            positional="ALiBi (6 heads, not a power of two)",
            attention="MHA, 6 heads, full causal",
            hf_config_class="BloomConfig",
            hf_kwargs=_bloom(6, 96),
            tl_pair_note=(
                "TransformerLens 3.9 gives head i the ALiBi slope 2^(-8(i+1)/n) for any n; "
                "for non-power-of-two n HF/BLOOM interleave two geometric series "
                "(here [2^-2, 2^-4, 2^-6, 2^-8, 2^-1, 2^-3]), so TL logits differ from HF."
            ),
        ),
        ModelSpec(
            name="gemma2",
            architecture="Gemma2ForCausalLM",
            positional="rotary (rotate-half, rotary_dim 16 of 16)",
            attention=(
                f"GQA, 4 query heads / 2 KV heads, alternating local (window {WINDOW}, "
                "even layers) / global, attn softcap 10, final logit softcap 15"
            ),
            hf_config_class="Gemma2Config",
            hf_kwargs=dict(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=WINDOW,
                attn_logit_softcapping=10.0,
                final_logit_softcapping=15.0,
                max_position_embeddings=FUNCTIONAL_CTX,
                initializer_range=0.2,
            ),
        ),
        ModelSpec(
            name="opt",
            architecture="OPTForCausalLM",
            positional="learned absolute (position offset 2)",
            attention="MHA, 4 heads, full causal",
            hf_config_class="OPTConfig",
            hf_kwargs=dict(
                vocab_size=VOCAB,
                hidden_size=64,
                word_embed_proj_dim=64,
                num_hidden_layers=2,
                ffn_dim=256,
                num_attention_heads=4,
                max_position_embeddings=LEARNED_CTX,
                do_layer_norm_before=True,
                init_std=0.2,
                pad_token_id=1,
            ),
        ),
        ModelSpec(
            name="gptneo",
            architecture="GPTNeoForCausalLM",
            positional="learned absolute",
            attention=f"MHA, 4 heads, alternating global / local (window {WINDOW})",
            hf_config_class="GPTNeoConfig",
            hf_kwargs=dict(
                vocab_size=VOCAB,
                max_position_embeddings=LEARNED_CTX,
                hidden_size=64,
                num_layers=2,
                attention_types=[[["global", "local"], 1]],
                num_heads=4,
                window_size=WINDOW,
                initializer_range=0.2,
            ),
        ),
        ModelSpec(
            name="qwen2",
            architecture="Qwen2ForCausalLM",
            positional="rotary (rotate-half, rotary_dim 16 of 16)",
            attention=f"GQA, 4 query heads / 2 KV heads, q/k/v biases, layer 0 global, layer 1 sliding window {WINDOW}",
            hf_config_class="Qwen2Config",
            hf_kwargs=_gqa(
                head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
            ),
            perturb=PERTURB,
        ),
        ModelSpec(
            name="qwen3",
            architecture="Qwen3ForCausalLM",
            positional="rotary (rotate-half, rotary_dim 16 of 16, base 1e6)",
            attention="GQA, 4 query heads / 2 KV heads, per-head RMS Q/K norm, full causal",
            hf_config_class="Qwen3Config",
            hf_kwargs=_gqa(head_dim=16, rope_theta=1e6),
            perturb=PERTURB,
        ),
        ModelSpec(
            name="phi3",
            architecture="Phi3ForCausalLM",
            positional="rotary (rotate-half, rotary_dim 8 of 16)",
            attention="GQA, 4 query heads / 2 KV heads, fused qkv projection, full causal",
            hf_config_class="Phi3Config",
            hf_kwargs=_gqa(partial_rotary_factor=0.5, pad_token_id=0),
            perturb=PERTURB,
        ),
        ModelSpec(
            name="mixtral",
            architecture="MixtralForCausalLM",
            positional="rotary (rotate-half, rotary_dim 16 of 16)",
            attention="GQA, 4 query heads / 2 KV heads, full causal; MoE MLP, 4 experts, top-2",
            hf_config_class="MixtralConfig",
            hf_kwargs=_gqa(num_local_experts=4, num_experts_per_tok=2),
            perturb=PERTURB,
        ),
        ModelSpec(
            name="gemma3",
            architecture="Gemma3ForCausalLM",
            positional="rotary (rotate-half, rotary_dim 16 of 16, base 1e4 local / 1e6 global)",
            attention=(
                f"GQA, 4 query heads / 2 KV heads, per-head RMS Q/K norm, layer 0 local "
                f"(window {WINDOW}), layer 1 global"
            ),
            hf_config_class="Gemma3TextConfig",
            hf_kwargs=_gqa(
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=WINDOW,
                layer_types=["sliding_attention", "full_attention"],
                rope_local_base_freq=10000.0,
                rope_theta=1e6,
            ),
            perturb=PERTURB,
        ),
        ModelSpec(
            name="gpt2-tl",
            architecture="GPT2LMHeadModel",
            positional="learned absolute",
            attention="MHA, 4 heads, full causal",
            hf_config_class="GPT2Config",
            hf_kwargs=dict(
                vocab_size=VOCAB,
                n_positions=LEARNED_CTX,
                n_ctx=LEARNED_CTX,
                n_embd=64,
                n_layer=2,
                n_head=4,
                initializer_range=0.2,
            ),
            perturb=PERTURB,
            processing="transformer_lens",
            tl_pair_note=(
                "Processed like HookedTransformer.from_pretrained (center_unembed=True): each "
                "position's logits are HF's minus their mean over the vocabulary."
            ),
        ),
    ]
}
