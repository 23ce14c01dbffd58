"""``interpkv.compare_generation``: cached greedy generation against the uncached reference.

The cached run is :func:`interpkv.generate` (one forward per step through a
:class:`KVCache`). The reference is uncached and teacher-forced: one
``cache=None`` forward over the prompt and the tokens the cached run chose,
which gives, for every step, the logits an uncached greedy loop would compute
from the same history. Comparing on the same history keeps every step
meaningful even after the two runs would have picked different tokens: the
error of step ``k`` is the cache's error at step ``k``, not an echo of an
earlier flip.
"""

from typing import Optional, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from interpkv.cache import provenance
from interpkv.core import calls
from interpkv.core import tl as _tl
from interpkv.core.arguments import count, tolerance
from interpkv.core.forward import Hook, forward
from interpkv.core.inputs import TokensLike, as_inputs
from interpkv.diagnostics.cause import blame
from interpkv.generation.generate import generate
from interpkv.generation.result import GenerationDiff
from interpkv.tolerances import generation_atol

__all__ = ["compare_generation", "default_atol"]

default_atol = generation_atol  # the name tests and docs know


@calls.entry
@torch.no_grad()
def compare_generation(
    model: "_tl.HookedTransformer",
    tokens: TokensLike,
    *,
    max_new_tokens: int,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    atol: Optional[float] = None,
    fwd_hooks: Sequence[Hook] = (),
    cache=None,
) -> GenerationDiff:
    """Greedy-generate through a cache and check every step against an uncached pass.

    Args:
        model: a HookedTransformer.
        tokens: prompt token ids ``[batch, pos]`` (or ``[pos]``), or (model
            with a tokenizer) a string or list of strings, left-padded for you.
        max_new_tokens: steps to generate and compare.
        attention_mask: left-padding mask of the prompt (1 = real, 0 = padding).
        atol: logit tolerance that makes a step divergent; default per dtype
            (:func:`default_atol`: 1e-8 float64, 1e-4 float32).
        fwd_hooks: TransformerLens ``(name or filter, hook)`` pairs active in
            both runs (every cached step, and the uncached reference pass).
        cache: a :class:`~interpkv.KVCache` holding positions ``0..n-1`` of
            ``tokens`` (no padding) to continue from: the cached run feeds
            ``tokens[:, n:]`` through it, the reference reruns everything.
            When it diverges and the cache was written under other
            interventions (:attr:`KVCache.provenance`), ``.cause`` says so.

    Returns:
        A :class:`GenerationDiff`: per step (step 0 = the token chosen from the
        prompt, step 1 = the first step that reads cached history), the worst
        row's logit max-abs error, ``KL(uncached || cached)`` and whether the
        cached token is the uncached argmax, plus the first divergent step
        (``tokens_a``: the cached run's tokens; ``tokens_b``: the uncached
        argmax at each step, given the cached run's history).

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("llama", dtype=torch.float64)
    >>> diff = interpkv.compare_generation(model, torch.tensor([[3, 1, 4, 1, 5]]), max_new_tokens=4)
    >>> diff.first_divergent_step is None, len(diff.kl)
    (True, 4)
    """
    _tl.require_hooked(model, "interpkv.compare_generation")
    count("max_new_tokens", max_new_tokens, minimum=1)  # >= 1: nothing to compare otherwise
    if atol is not None:
        atol = tolerance("atol", atol)
    # Ids only: the uncached reference re-reads the prompt with the generated tokens appended.
    tokens, mask = as_inputs(model, tokens, attention_mask, embeddings=False)
    atol = default_atol(model.cfg.dtype) if atol is None else atol

    if cache is not None:
        prefix, why = provenance.history(model, cache, tokens, fwd_hooks)
        diff = _compare(model, tokens, mask, max_new_tokens, atol, fwd_hooks, cache, prefix)
        diff.cause = why if why is not None and not diff.ok else None  # the cache is consumed: no rerun
        return diff
    diff = _compare(model, tokens, mask, max_new_tokens, atol, fwd_hooks)
    diff.cause = blame(
        fwd_hooks,
        not diff.ok,
        lambda: not _compare(model, tokens, mask, max_new_tokens, atol, ()).ok,
    )
    return diff


def _compare(model, tokens, mask, max_new_tokens, atol, fwd_hooks, cache=None, prefix=0) -> GenerationDiff:
    cached = generate(
        model, tokens[:, prefix:], attention_mask=mask[:, prefix:], max_new_tokens=max_new_tokens,
        keep_logits=True, fwd_hooks=fwd_hooks, cache=cache,
    )
    # Uncached, teacher-forced: position prompt_len - 1 + k chose step k.
    history = torch.cat([tokens[:, :prefix], cached.tokens], 1)[:, :-1]
    history_mask = torch.cat([mask[:, :prefix], cached.attention_mask], 1)[:, :-1]
    # Positions from each row's real prompt length on are generated (steering region="generated").
    with calls.generation(mask.sum(dim=1)):
        reference = forward(model, history, attention_mask=history_mask, fwd_hooks=fwd_hooks)
    reference = reference[:, tokens.shape[1] - 1 :]

    steps = range(cached.logits.shape[1])
    return GenerationDiff.from_step_logits(
        [cached.logits[:, k] for k in steps],
        [reference[:, k] for k in steps],
        atol=atol,
        tokens_a=cached.new_tokens,  # what the cached run generated
        tokens_b=reference.argmax(-1),  # what uncached greedy picks from the same history
        names=("the cached run", "the uncached run"),
    )
