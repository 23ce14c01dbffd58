"""Tiny models and uncached references shared by the lifecycle, window and persist tests.

Models are built from ``HookedTransformerConfig`` with a fixed seed, so a fresh
process (the resume test's subprocess) rebuilds exactly the same weights.
Run as a script, this module is that subprocess: ``python lifecycle_helpers.py
resume JOBS.json`` loads each saved cache, feeds part B and writes the logits.
"""

import json
import sys
from typing import List, Optional

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

# One tiny model per positional scheme / attention variant.
SCHEMES = {
    "gpt2": dict(positional_embedding_type="standard"),
    "shortformer": dict(positional_embedding_type="shortformer"),
    "neox": dict(positional_embedding_type="rotary", rotary_dim=4),
    "gptj": dict(positional_embedding_type="rotary", rotary_dim=4, rotary_adjacent_pairs=True),
    "llama": dict(
        positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2,
        normalization_type="RMS", act_fn="silu", gated_mlp=True,
    ),
    "bloom": dict(positional_embedding_type="alibi"),
    "local": dict(
        positional_embedding_type="rotary", rotary_dim=8, use_local_attn=True,
        attn_types=["local", "global"], window_size=5,
    ),
}
D_VOCAB = 50


def tiny_model(scheme: str, dtype: torch.dtype = torch.float64, n_layers: int = 2,
               n_ctx: int = 64, seed: int = 0) -> HookedTransformer:
    """A deterministic tiny HookedTransformer for ``scheme`` (see :data:`SCHEMES`)."""
    cfg = dict(
        n_layers=n_layers, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=n_ctx,
        d_vocab=D_VOCAB, act_fn="gelu", normalization_type="LN", dtype=dtype,
        initializer_range=0.3,
    )
    cfg.update(SCHEMES[scheme])
    if cfg.get("attn_types") is not None:
        cfg["attn_types"] = (cfg["attn_types"] * n_layers)[:n_layers]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = HookedTransformer(HookedTransformerConfig(**cfg))
    model.eval()
    return model


def window_hook(window: int, sinks: int):
    """``hook_attn_scores`` hook restricting an uncached run to a cache window's keys."""

    def hook(scores, hook):  # (B, H, T, T), positions 0..T-1
        n = scores.shape[-1]
        q = torch.arange(n)[:, None]
        k = torch.arange(n)[None, :]
        allowed = (k < sinks) | (k > q - window)
        return scores.masked_fill(~allowed, float("-inf"))

    return hook


@torch.no_grad()
def reference(model: HookedTransformer, seq: List[int], window: Optional[int] = None,
              sinks: int = 0) -> torch.Tensor:
    """TransformerLens's own uncached logits ``[len(seq), d_vocab]`` for one row.

    With a window, every layer's attention is restricted to the keys a windowed
    cache keeps (sinks and the last ``window`` positions) through
    ``hook_attn_scores``.
    """
    tokens = torch.tensor([seq], dtype=torch.long)
    if window is None:
        return model(tokens)[0]
    hooks = [(lambda name: name.endswith("hook_attn_scores"), window_hook(window, sinks))]
    return model.run_with_hooks(tokens, fwd_hooks=hooks)[0]


def padded_batch(rows: List[List[int]], pads: List[int]):
    """Tokens and mask for rows left-padded by ``pads`` (ragged rows allowed)."""
    width = max(len(r) + p for r, p in zip(rows, pads))
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (row, pad) in enumerate(zip(rows, pads)):
        start = width - len(row)
        tokens[b, start:] = torch.tensor(row, dtype=torch.long)
        mask[b, start:] = 1
    return tokens, mask


def _resume(jobs_path: str) -> None:
    """Subprocess side of the resume test: load each cache, feed part B, save logits."""
    import safetensors.torch

    import interpkv

    jobs = json.load(open(jobs_path))
    for job in jobs:
        model = tiny_model(job["scheme"], getattr(torch, job["dtype"]))
        cache = interpkv.KVCache.load(job["cache"], model)
        tokens = torch.tensor(job["part_b"], dtype=torch.long)
        logits = interpkv.forward(model, tokens, cache=cache)
        safetensors.torch.save_file(
            {"logits": logits.contiguous(), "next_positions": cache.next_positions},
            job["out"],
        )


if __name__ == "__main__":
    if sys.argv[1] == "resume":
        _resume(sys.argv[2])
