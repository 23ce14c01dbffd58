"""``interpkv.generate``: autoregressive generation through a :class:`KVCache`, with hooks.

Every step is one :func:`interpkv.forward` call on the new tokens only, so the
cache owns the positions (left padding and ragged prompts included) and
``fwd_hooks`` fire on exactly the positions being computed: the prompt on the
first step, one token per row afterwards.

A hook gives the same tokens as an uncached loop (rerunning the sequence with
the hook every step) when its edit depends on absolute position, never on the
index into ``act``'s ``pos`` axis: ``act[:, -1] += v`` means "the new token" in
a decode step, and no cache can change that. Select positions with
:func:`interpkv.hook_positions` or :mod:`interpkv.steering`; docs/generation.md
has the rule, and ``compare_generation(...).cause`` names such hooks.

No tokenizer is needed: prompts are token ids ``[batch, pos]`` or token
embeddings ``[batch, pos, d_model]``; with a tokenizer, a string or a list of
strings (see :func:`interpkv.core.inputs.as_inputs`). Sampling draws from a
private ``torch.Generator`` (never the global RNG), so ``seed=`` reproduces a
run. Afterwards the cache holds back the last chosen token, so a later call
can continue from the cache alone (see :mod:`interpkv.generation.resume`).
"""

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interpkv.core import tl as _tl
from interpkv.cache.kvcache import KVCache
from interpkv.core import calls
from interpkv.core.forward import Hook, forward
from interpkv.core.inputs import TokensLike, as_inputs
from interpkv.diagnostics.capture import capture as capture_run
from interpkv.diagnostics.record import Record
from interpkv.generation import resume
from interpkv.generation.result import Generation
from interpkv.generation.sampling import sample_next

__all__ = ["generate", "sample_next"]

HookNames = Union[str, Sequence[str], Callable[[str], bool]]  # as interpkv.capture's names


def _check_options(model, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_token):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError(
            f"top_k={top_k} / top_p={top_p} only apply when sampling, but temperature=0 means "
            "greedy decoding: pass temperature > 0 (e.g. 1.0) to sample."
        )
    if top_k is not None and not (1 <= top_k):
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    d_vocab = model.cfg.d_vocab_out
    pad = [pad_token] if pad_token is not None else []
    for name, values in (("stop_tokens", list(stop_tokens or ())), ("pad_token", pad)):
        bad = [t for t in values if not 0 <= int(t) < d_vocab]
        if bad:
            raise ValueError(f"{name} {bad} are not token ids of this model (d_vocab_out={d_vocab})")


def _captured_step(model, tokens, cache, mask, fwd_hooks, names) -> Tuple[Tensor, Record]:
    """One step through ``cache`` recorded by :func:`interpkv.capture`; returns (last logits, Record)."""
    offsets = cache.next_positions.clone()
    record = capture_run(model, tokens, cache=cache, attention_mask=mask, names=names, fwd_hooks=fwd_hooks)
    # The last column of each running row, at its absolute position (stopped rows are ignored).
    last = (offsets + mask.sum(1) - 1).clamp(min=0)  # (B,)
    return record.logits[torch.arange(tokens.shape[0]), last], record


@torch.no_grad()
def generate(
    model: "_tl.HookedTransformer",
    tokens: Optional[TokensLike] = None,
    *,
    max_new_tokens: int,
    cache: Optional[KVCache] = None,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    fwd_hooks: Sequence[Hook] = (),
    capture: Optional[HookNames] = None,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    pad_token: Optional[int] = None,
    keep_logits: bool = False,
) -> Generation:
    """Generate ``max_new_tokens`` tokens per row, one cached forward per step.

    Args:
        model: a HookedTransformer (no tokenizer needed).
        tokens: prompt token ids ``[batch, pos]`` (or ``[pos]``), prompt
            embeddings ``[batch, pos, d_model]`` (taken as ``hook_embed``'s output),
            or, when the model has a tokenizer, a string or list of strings
            (left-padded for you). None: continue from ``cache``'s held-back
            token (see below).
        max_new_tokens: steps to run (fewer if every row stops). 0 with a
            ``cache`` prefills it: every prompt token but the last is fed and
            the last is held back, ready to continue from.
        cache: continue from this cache (its stored tokens come before
            ``tokens``); a fresh one is made if None. Afterwards it holds every
            token of ``Generation.tokens`` but the last, which it holds back in
            ``cache.next_tokens``: ``generate(model, cache=cache,
            max_new_tokens=n)`` then continues exactly where this call
            stopped, as one uninterrupted call would (the held-back token is
            the new call's one-column prompt; rows that had stopped stay
            stopped when ``stop_tokens`` is passed again).
        attention_mask: ``[batch, pos]`` for the prompt, 1 = real, 0 = padding.
            Prompts of different lengths are LEFT padded (each row must end
            with a real token).
        fwd_hooks: TransformerLens ``(name or filter, hook)`` pairs active at
            every step. They see only the new positions of each step: select
            positions with :func:`interpkv.hook_positions` (or use
            :mod:`interpkv.steering`), never by index into ``act``'s ``pos``
            axis, to mean the same as an uncached loop (module docstring).
        capture: which hook points to record at every step into
            ``Generation.records``, as ``names`` of :func:`interpkv.capture`: a
            substring, a list of exact names, or a predicate on names.
        temperature: 0 = greedy; > 0 samples from ``softmax(logits / temperature)``.
        top_k, top_p: restrict sampling (need ``temperature > 0``).
        seed: seed of the private ``torch.Generator`` used for sampling; the same
            seed gives the same tokens. None = a fresh random seed.
        stop_tokens: a row that emits one of these is finished: the stop token
            is kept and every later column of that row holds ``pad_token`` with
            attention_mask 0, while other rows continue. Generation ends early
            once every row is finished.
        pad_token: value written after a row stopped. Default: the first of
            ``stop_tokens`` (as TransformerLens pads with the EOS token).
        keep_logits: also return the logits each new token was chosen from.

    Returns:
        A :class:`Generation` (``.text`` decodes it when the model has a tokenizer).

    Raises:
        ValueError: a prompt row ends with padding (use left padding), bad
            sampling options, or no ``tokens`` and nothing held back in ``cache``.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("llama")
    >>> out = interpkv.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    >>> out.tokens.shape
    torch.Size([1, 7])
    >>> model = interpkv.zoo.load("llama", trained=True)
    >>> cache = interpkv.KVCache.for_model(model)
    >>> first = interpkv.generate(model, "def ", cache=cache, max_new_tokens=10)
    >>> more = interpkv.generate(model, cache=cache, max_new_tokens=10)
    >>> first.text + more.new_text == interpkv.generate(model, "def ", max_new_tokens=20).text
    True
    """
    _check_options(model, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_token)
    resumed = tokens is None
    if resumed:
        if cache is None:
            raise ValueError(
                "generate needs a prompt (tokens) or a cache to continue from (cache=...), got neither"
            )
        if attention_mask is not None:
            raise ValueError("attention_mask covers the prompt; continuing from a cache takes none")
        tokens, mask = resume.held_back(cache)
        single = cache.batch_size == 1
    else:
        single = isinstance(tokens, str) or (isinstance(tokens, Tensor) and tokens.ndim == 1)
        tokens, mask = as_inputs(model, tokens, attention_mask)
    ends_padded = (mask[:, -1] == 0).nonzero().flatten().tolist()
    if ends_padded and not resumed:
        raise ValueError(
            f"prompt rows {ends_padded} end with padding (attention_mask[:, -1] == 0): "
            "generation continues from each row's last column, so pad prompts on the LEFT."
        )
    batch, prompt_len = tokens.shape[:2]
    device = torch.device(model.cfg.device or "cpu")  # forward moves the tokens here
    tokens = tokens.to(device)
    mask = mask.to(device)
    if max_new_tokens == 0:
        return _prefill(cache, model, tokens, mask, fwd_hooks, getattr(model, "tokenizer", None), single)
    if cache is None:
        cache = KVCache.for_model(model, batch, capacity=prompt_len + max_new_tokens)
    stop = torch.tensor(list(stop_tokens or ()), dtype=torch.long, device=device)
    tokenizer = getattr(model, "tokenizer", None)
    pad = int(pad_token) if pad_token is not None else (int(stop[0]) if stop.numel() else 0)

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # fresh entropy; the global RNG is untouched
    else:
        generator.manual_seed(int(seed))

    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    if resumed:  # rows with nothing held back had stopped; so had rows holding back a stop token
        finished = (mask[:, -1] == 0) | torch.isin(tokens[:, -1], stop)
        if bool(finished.all()):  # an uninterrupted call would have ended already
            return Generation(tokens, mask, 1, finished, tokenizer=tokenizer, single=single)
    new_tokens: List[Tensor] = []
    new_mask: List[Tensor] = []
    kept_logits: List[Tensor] = []
    records: Optional[List[Record]] = [] if capture is not None else None
    step_input, step_mask = tokens, mask
    # Where each row's generated tokens start (interpkv.steering's region="generated").
    with calls.generation(cache.next_positions + mask.sum(dim=1)):
        for step in range(max_new_tokens):
            if records is None:
                last = forward(
                    model, step_input, cache=cache, attention_mask=step_mask, fwd_hooks=fwd_hooks, logits="last"
                )[:, -1]
            else:
                last, record = _captured_step(model, step_input, cache, step_mask, fwd_hooks, capture)
                records.append(record)
            # last: (B, d_vocab), real for every running row (left padding)
            chosen = sample_next(last, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            running = ~finished
            chosen = torch.where(running, chosen, torch.full_like(chosen, pad))
            new_tokens.append(chosen)
            new_mask.append(running.long())
            if keep_logits:
                kept_logits.append(last.clone())
            if stop.numel():
                finished = finished | (running & torch.isin(chosen, stop))
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            # A row's stop token is still fed (it is real); after that, padding only.
            step_input, step_mask = chosen[:, None], running.long()[:, None]

    resume.hold_back(cache, chosen, running)  # the last choice is not fed: held back

    if tokens.is_floating_point():
        prompt_tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
        prompt_mask = prompt_tokens
    else:
        prompt_tokens, prompt_mask = tokens.to(device), mask
    empty = torch.empty(batch, 0, dtype=torch.long, device=device)
    out_tokens = torch.cat([prompt_tokens, torch.stack(new_tokens, 1) if new_tokens else empty], 1)
    out_mask = torch.cat([prompt_mask, torch.stack(new_mask, 1) if new_mask else empty], 1)
    return Generation(
        tokens=out_tokens,
        attention_mask=out_mask,
        prompt_length=prompt_tokens.shape[1],
        finished=finished,
        logits=torch.stack(kept_logits, 1) if keep_logits and kept_logits else None,
        records=records,
        tokenizer=tokenizer,
        single=single,
    )


def _prefill(cache, model, tokens, mask, fwd_hooks, tokenizer, single) -> Generation:
    """``max_new_tokens=0``: feed all but the last prompt column into ``cache``, hold that one back."""
    if cache is not None and not tokens.is_floating_point():
        if tokens.shape[1] > 1:
            forward(model, tokens[:, :-1], cache=cache, attention_mask=mask[:, :-1], fwd_hooks=fwd_hooks)
        resume.hold_back(cache, tokens[:, -1], mask[:, -1] == 1)
        out, out_mask = tokens, mask
    elif tokens.is_floating_point():  # an embedding has no token id to hold back
        out = out_mask = torch.empty(tokens.shape[0], 0, dtype=torch.long, device=tokens.device)
    else:  # no cache to prepare
        out, out_mask = tokens, mask
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    return Generation(out, out_mask, out.shape[1], finished, tokenizer=tokenizer, single=single)
