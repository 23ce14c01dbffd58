"""What the installed upstream libraries do, measured with their own APIs.

A test that documents an upstream bug or imprecision calls one of these first and
then checks what interpkv reports about the measured behaviour, so the suite stays
green the day TransformerLens or transformers fixes its side (STYLE.md, "Tests").
Each detector uses only the upstream library's public API (and a zoo model to run
it on), never interpkv's own diagnostics, so it cannot share a mistake with them.
"""

import functools

import torch


@functools.cache
def tl_alibi_slopes_differ_from_bloom(n_heads: int) -> bool:
    """TransformerLens's ALiBi slopes for ``n_heads`` are not HF Bloom's (3.9: whenever n is not a power of two)."""
    from transformer_lens.components import AbstractAttention
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    tl = AbstractAttention.create_alibi_multipliers(n_heads).double()
    hf = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_heads, torch.float32)[:, 0, 1].double()
    return not torch.allclose(tl, hf, rtol=1e-6, atol=0)


def tl_wrong_alibi_models() -> set:
    """Zoo models converted from Bloom whose TransformerLens forward uses other slopes than HF's."""
    from interpkv import zoo

    return {n for n in zoo.names() if n.startswith("bloom") and tl_alibi_slopes_differ_from_bloom(zoo.info(n)["n_heads"])}


def tl_alibi_scores_shift(long_call: int = 64, name: str = "bloom") -> float:
    """How far TransformerLens's layer-0 ``hook_attn_scores`` move after a longer earlier call (float64).

    0.0 when each call builds its own ALiBi bias; TransformerLens 3.9 memoizes the
    bias of the longest call and slices shorter calls out of it, a per-row shift.
    """
    from interpkv import zoo

    tl, hook = zoo.load(name, dtype=torch.float64), "blocks.0.attn.hook_attn_scores"
    tokens = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tl.run_with_cache(tokens, names_filter=hook)[1][hook]
        tl(torch.zeros(1, long_call, dtype=torch.long))
        after = tl.run_with_cache(tokens, names_filter=hook)[1][hook]
    kept = torch.isfinite(before)
    return float((before[kept] - after[kept]).abs().max())


@functools.cache
def tl_alibi_memo_goes_stale() -> bool:
    """TransformerLens's raw ALiBi scores depend on an earlier, longer call (3.9: they do)."""
    return tl_alibi_scores_shift() > 1e-9


@functools.cache
def tl_generate_misplaces_learned_positions(prompt: int = 8) -> bool:
    """``HookedTransformer.generate`` (cache on, no tokenizer) embeds the first new token at a row other than ``prompt``.

    Read off TransformerLens's own ``hook_pos_embed`` during its own ``generate``.
    """
    from interpkv import zoo

    model = zoo.load("gpt2", dtype=torch.float64)
    tokens = torch.randint(0, 97, (1, prompt), generator=torch.Generator().manual_seed(0))
    seen = []
    with model.hooks(fwd_hooks=[("hook_pos_embed", lambda x, hook: seen.append(x[0, -1].clone()))]):
        model.generate(tokens, max_new_tokens=2, use_past_kv_cache=True, do_sample=False, stop_at_eos=False, verbose=False)
    return not torch.allclose(seen[1], model.W_pos[prompt], rtol=0, atol=1e-12)


def hf_nans_at_real_tokens(hf, tokens: torch.Tensor, mask: torch.Tensor) -> bool:
    """An HF model's uncached forward returns NaN in a hidden state or the logits at a real (unmasked) token."""
    with torch.no_grad():
        out = hf(tokens, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    return any(bool(torch.isnan(h[real]).any()) for h in (*out.hidden_states, out.logits))
