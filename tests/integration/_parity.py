"""Shared helpers for parity tests: cached runs and the two references."""

import functools
from typing import Sequence

import torch

import interpkv
from interpkv import zoo
from interpkv.diagnostics.hf_reference import hf_logits
from interpkv.zoo._specs import SPECS

from ._upstream import tl_wrong_alibi_models

# float64 leaves only summation-order noise (~1e-14): 1e-10 would catch any real
# difference. In float32 a one-token step and a full-sequence pass multiply
# matrices of different shapes, so BLAS sums in another order: over 2-4 layers
# that is ~1e-6 relative to the largest logit (measured worst 1.8e-6, llama
# token by token, |logit| up to 9). float32 parity is therefore stated
# relative: 5e-6 x max(1, max |logit|), i.e. 1e-5 to 5e-5 absolute here. HF vs TL in float32 differs by
# weight folding (fold_ln, centering) as well: 1e-4. HF's "float64" forward is
# not float64 throughout (eager softmax, RMSNorm, rotary tables and GPT-J/Neo
# q/k run in float32 inside transformers), so against HF float64 is held to
# float32-level agreement, 5e-5 (measured worst: 1.1e-5, llama).
TOL = {torch.float64: 1e-10, torch.float32: 5e-6}
HF_TOL = {torch.float64: 5e-5, torch.float32: 1e-4}

# TransformerLens 3.9 computes ALiBi slopes as 2^(-8/n) for every head count,
# wrong when n is not a power of two (Bloom's rule differs): its own forward is
# no reference for these models; HF is. Measured on the installed version
# (bloom6 in 3.9), so the day TransformerLens fixes it, it is a reference again.
TL_WRONG = tl_wrong_alibi_models()

# Processed like from_pretrained, center_unembed included: logits are HF's minus a
# per-position constant, so they are compared with HF's centred over the vocabulary.
CENTRED_UNEMBED = {n for n, s in SPECS.items() if s.processing == "transformer_lens"}


def centred(logits):
    return logits - logits.mean(dim=-1, keepdim=True)


@functools.cache
def _pair(name: str, dtype: torch.dtype):
    if name in zoo.pairs():
        return zoo.load_pair(name, dtype=dtype)
    return zoo.load(name, dtype=dtype), None


def model(name: str, dtype: torch.dtype = torch.float32):
    return _pair(name, dtype)[0]


def hf_model(name: str, dtype: torch.dtype = torch.float32):
    return _pair(name, dtype)[1]


def batch(kind: str, d_vocab: int, length: int = 24, seed: int = 0):
    """Tokens and mask: "b1" (one row, no padding) or "b3" (left-padded, ragged)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "b1":
        tokens = torch.randint(0, d_vocab, (1, length), generator=gen)
        return tokens, torch.ones_like(tokens)
    tokens = torch.randint(0, d_vocab, (3, length), generator=gen)
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0
    mask[2, : length // 2] = 0
    return tokens, mask


@torch.no_grad()  # the decode hot path (with grad, writes go out of place: test_gradients.py)
def cached_logits(m, tokens, mask, splits: Sequence[int], **cache_kwargs):
    """Feed ``tokens`` in chunks of ``splits`` through one cache; concatenate logits."""
    assert sum(splits) == tokens.shape[1]
    cache = interpkv.KVCache.for_model(m, tokens.shape[0], **cache_kwargs)
    out, start = [], 0
    for size in splits:
        end = start + size
        out.append(
            interpkv.forward(m, tokens[:, start:end], cache=cache, attention_mask=mask[:, start:end])
        )
        start = end
    return torch.cat(out, dim=1)


def tl_reference(m, tokens, mask):
    """TransformerLens's own forward, each row alone on its real tokens."""
    out = torch.zeros(*tokens.shape, m.cfg.d_vocab, dtype=m.cfg.dtype)
    for row in range(tokens.shape[0]):
        real = mask[row].bool()
        out[row, real] = m(tokens[row, real][None])[0]
    return out


def hf_reference(hf, tokens, mask):
    """The HF model on the padded batch with the same mask and explicit positions."""
    return hf_logits(hf, tokens, mask)


def max_err(a, b, mask):
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


def within(a, b, mask, dtype) -> bool:
    """Parity check with the tolerance above for ``dtype``."""
    scale = 1.0 if dtype == torch.float64 else max(1.0, b[mask.bool()].abs().max().item())
    return max_err(a, b, mask) < TOL[dtype] * scale
