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
private ``torch.Generator``, so ``seed=`` reproduces a run; without a seed
that generator is seeded from torch's global one (``torch.manual_seed`` then
reproduces it, as in TransformerLens). Afterwards the cache holds back the last chosen token, so a later call
can continue from the cache alone (see :mod:`interpkv.generation.resume`).

TransformerLens's generate keywords (``do_sample``, ``stop_at_eos``,
``eos_token_id``, ``use_past_kv_cache``, ``verbose``) keep their meanings
(:mod:`interpkv.generation.options`). ``capture=`` streams every step into one
whole-generation Record (:mod:`interpkv.generation.recording`).

A caller's cache is left at a consistent point when a step fails (an
exception in a hook, KeyboardInterrupt): every completed step stays committed
and the token the failed step was feeding is held back, so
``generate(model, cache=cache, max_new_tokens=n)`` continues as the
uninterrupted call would have (:func:`interpkv.generation.loop.settle`).
"""

from typing import Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

from interpkv.cache.kvcache import KVCache
from interpkv.core import arguments, calls
from interpkv.core import tl as _tl
from interpkv.core.forward import Hook, forward
from interpkv.core.hostread import host_array
from interpkv.core.inputs import TokensLike, as_inputs, is_text, left_aligned, refuse_right_padding
from interpkv.core.positions import absolute_positions
from interpkv.diagnostics import tokenlayout
from interpkv.diagnostics.names import NamesFilter
from interpkv.generation import budget, resume
from interpkv.generation import options as _options
from interpkv.generation.loop import Loop, attach, settle
from interpkv.generation.recording import Recorder, StepRecords
from interpkv.generation.result import Generation
from interpkv.generation.sampling import sample_next

__all__ = ["generate", "sample_next"]

HookNames = NamesFilter  # as interpkv.capture's names


@calls.entry
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
    capture_logits: bool = True,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    pad_token: Optional[int] = None,
    keep_logits: bool = False,
    names_filter: Optional[HookNames] = None,
    do_sample: Optional[bool] = None,
    stop_at_eos: Optional[bool] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    use_past_kv_cache: bool = True,
    verbose: bool = False,
    **tl_kwargs,
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
            ``tokens``); a fresh one is made if None. If an earlier
            ``generate`` left it holding a token back, that token is fed
            first, as ``tokens``' first column (``Generation.tokens`` starts
            with it), so a multi-turn conversation keeps every token
            (:mod:`interpkv.core.heldback`). Afterwards it holds every
            token of ``Generation.tokens`` but the last, which it holds back
            (:func:`interpkv.generation.resume.held_tokens`): ``generate(model, cache=cache,
            max_new_tokens=n)`` then continues exactly where this call
            stopped, as one uninterrupted call would (the held-back token is
            the new call's one-column prompt; rows that had stopped stay
            stopped when ``stop_tokens`` is passed again). If a step fails
            (a hook raises, KeyboardInterrupt), the cache keeps every completed
            step and holds back the token the failed step was feeding, so the
            same continuation equals the uninterrupted run; a failure in the
            first step leaves the cache as it was. The exception carries a
            note saying so, and ``error.interpkv_generation``: the tokens
            generated before it.
        attention_mask: ``[batch, pos]`` for the prompt, 1 = real, 0 = padding.
            Rows may be padded on either side (or both): each continues from
            its last real token. ``Generation.tokens`` lays the prompt out
            left-padded (padding takes no position, so nothing else changes).
            Without a mask, ids whose rows end differently with the
            tokenizer's pad id (``model.to_tokens([...])`` pads right) are
            refused rather than guessed.
        fwd_hooks: TransformerLens ``(name or filter, hook)`` pairs active at
            every step. They see only the new positions of each step: select
            positions with :func:`interpkv.hook_positions` (or
            :mod:`interpkv.steering`), not by index into ``act``'s ``pos`` axis.
        capture: which hook points to record, as ``names`` of
            :func:`interpkv.capture` (a hook name, a short name such as
            ``"resid_post"`` at every layer, a part of hook names, a list of
            those, or a predicate; matching no hook is an error). ``Generation.record`` is then one Record over
            every position of ``Generation.tokens`` (``to_activation_cache``
            like ``run_with_cache`` on them), ``Generation.records`` one per step.
        capture_logits: with ``capture``, also keep every position's logits in
            the Record (default). False leaves them out (``record.logits`` is
            ``[batch, pos, 0]``): at GPT-2-small, 512 + 64 tokens, they are
            110 MiB of a 130 MiB record. ``keep_logits`` still keeps the
            logits each token was chosen from.
        temperature: 0 = greedy; > 0 samples from ``softmax(logits / temperature)``.
            Default: greedy, or 1 with ``do_sample=True``.
        top_k, top_p: restrict sampling (need ``temperature > 0``).
        seed: seed of the private ``torch.Generator`` used for sampling; the same
            seed gives the same tokens and leaves torch's global generator
            alone. None: the private generator is seeded with one draw from
            torch's global generator, so ``torch.manual_seed(0)`` before the
            call reproduces it, as with TransformerLens's ``generate``
            (greedy runs draw nothing).
        stop_tokens: a row that emits one of these is finished: the stop token
            is kept and every later column of that row holds ``pad_token`` with
            attention_mask 0, while other rows continue. Generation ends early
            once every row is finished.
        pad_token: value written after a row stopped. Default: the first of
            ``stop_tokens`` (as TransformerLens pads with the EOS token).
        keep_logits: also return the logits each new token was chosen from.
        names_filter: TransformerLens's spelling of ``capture`` (same meaning);
            not with ``capture``.
        do_sample, stop_at_eos, eos_token_id, use_past_kv_cache, verbose:
            TransformerLens's keywords with its meanings (see
            :mod:`interpkv.generation.options`); the defaults keep interpkv's
            (greedy, no stop, the cache, no progress bar).

    Returns:
        A :class:`Generation` (``.text`` decodes it when the model has a tokenizer).

    Raises:
        ValueError: bad sampling options, a prompt row with no real token,
            right-padded ids without a mask, or no ``tokens`` and nothing
            held back in ``cache``.
        TypeError: a TransformerLens keyword whose meaning cannot be kept
            (the message names the interpkv form), or an unknown keyword.

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
    _tl.require_hooked(model, "interpkv.generate")
    opts = _options.resolve(
        model, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_tokens=stop_tokens, pad_token=pad_token, capture=capture, names_filter=names_filter,
        do_sample=do_sample, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
        use_past_kv_cache=use_past_kv_cache, verbose=verbose, extra=tl_kwargs,
    )
    if seed is not None:
        arguments.count("seed", seed)
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(f"cache must be an interpkv.KVCache (KVCache.for_model(model, batch_size)), got {type(cache).__name__}")
    resumed = tokens is None
    if resumed:
        if cache is None:
            raise ValueError(
                "generate needs a prompt (tokens) or a cache to continue from (cache=...), got neither"
            )
        if attention_mask is None:
            tokens, mask = resume.held_back(cache)
        else:
            raise ValueError("attention_mask covers the prompt; continuing from a cache takes none")
        single = cache.batch_size == 1
    else:
        single = isinstance(tokens, str) or (isinstance(tokens, Tensor) and tokens.ndim == 1)
        if attention_mask is None and isinstance(tokens, Tensor) and not is_text(tokens):
            refuse_right_padding(model, tokens)
        text = is_text(tokens)
        tokens, mask = as_inputs(model, tokens, attention_mask, infer_padding=cache is None or cache.seq_len == 0)
        inferred = attention_mask is None and getattr(model, "tokenizer", None) is not None  # pads may be masked
        if attention_mask is not None or text or inferred:  # else every column is real
            _check_prompt_mask(mask)
            if _ends_padded(mask):  # right (or inner) padding: each row ends at its last real token
                tokens, mask = left_aligned(tokens, mask)
        if cache is not None and resume.IDS in cache.row_state:  # the multi-turn rule (core/heldback.py)
            tokens, mask = resume.prepend_held_back(cache, tokens, mask, keep=True)
    if not opts.cached:
        _options.refuse_uncached(cache, resumed, tokens, opts)
    device = torch.device(model.cfg.device or "cpu")  # forward moves the tokens here
    tokens, mask = tokens.to(device), mask.to(device)
    if max_new_tokens == 0:
        if opts.capture is not None:
            raise ValueError(
                "capture needs max_new_tokens >= 1 (max_new_tokens=0 only prefills a cache); "
                "record the prompt with interpkv.capture(model, tokens)"
            )
        return _prefill(cache, model, tokens, mask, fwd_hooks, getattr(model, "tokenizer", None), single)
    caller_cache = cache is not None
    batch, prompt_len = tokens.shape[:2]
    budget.check_reach(model, cache, mask, max_new_tokens)  # before anything is allocated for the steps
    if cache is None:
        # Grown as it fills: a large max_new_tokens with early stops costs no memory up front.
        cache = KVCache.for_model(model, batch, capacity=prompt_len + min(max_new_tokens, budget.FIRST_CAPACITY))
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(int(seed))
    elif opts.temperature > 0:  # as TransformerLens: torch.manual_seed(...) reproduces the run
        generator.manual_seed(int(torch.randint(0, 2**62, (1,))))  # one draw from the global generator
    recorder = None
    if opts.capture is not None:
        reach = int((cache.next_positions.to(device) + mask.sum(1)).max()) + max_new_tokens
        recorder = Recorder(batch, reach, opts.capture, model.cfg.n_layers, logits=capture_logits)
    loop = Loop(model, cache, tokens, mask, fwd_hooks, opts, recorder, resumed, keep_logits, generator)
    start = resume.snapshot(cache)
    history = cache.next_positions.clone() if caller_cache else None  # leading record columns
    # Where each row's generated tokens start (interpkv.steering's region="generated").
    first_generated = cache.next_positions + mask.sum(dim=1)
    try:  # around the with too: an interrupt in its exit still settles the cache and names the tokens
        resume.release(cache)  # fed as the prompt's first column; put back by settle if the first step fails
        with calls.generation(first_generated):
            record = None
            loop.run(max_new_tokens)
            if recorder is not None and loop.chosen is not None:
                with cache.freeze():  # the held-back token's activations, without storing it
                    recorder.step(
                        model, loop.chosen[:, None], cache, loop.running.long()[:, None], fwd_hooks, final=True
                    )
                record = recorder.record()
            if loop.chosen is not None:
                resume.hold_back(cache, loop.chosen, loop.running)  # the last choice is not fed: held back
            out = loop.result(tokens, mask, getattr(model, "tokenizer", None), single, record, recorder)
            if record is not None:  # by columns of out.tokens, as run_with_cache(out.tokens, attention_mask=...)
                fed = torch.cat([mask, out.attention_mask[:, out.prompt_length :]], dim=1)  # every column fed
                offsets = history if history is not None else fed.new_zeros(batch)
                columns = tokenlayout.column_positions(absolute_positions(fed, offsets), history)
                out.record = tokenlayout.to_columns(record, columns)
                out.records = StepRecords(out.record, recorder.step_of, recorder.n_steps)  # not the absolute copy
            return out
    except BaseException as error:
        if caller_cache:
            settle(cache, start, loop, error)
        attach(error, loop, tokens, mask, single)
        raise


def _check_prompt_mask(mask: Tensor) -> None:
    """Raise for prompt rows with no real token (read on the host when the mask is there)."""
    values = host_array(mask)
    counts = values.sum(1).tolist() if values is not None else mask.sum(1).tolist()
    empty = [row for row, n in enumerate(counts) if n == 0]
    if empty:
        raise ValueError(f"prompt rows {empty} have no real token (attention_mask all 0): nothing to continue")


def _ends_padded(mask: Tensor) -> bool:
    """Whether some row's last column is padding (read on the host when the mask is there)."""
    values = host_array(mask)
    if values is not None:
        return bool((values[:, -1] == 0).any())
    return bool((mask[:, -1] == 0).any())


def _prefill(cache, model, tokens, mask, fwd_hooks, tokenizer, single) -> Generation:
    """``max_new_tokens=0``: feed all but the last prompt column into ``cache``, hold that one back."""
    if cache is not None and not tokens.is_floating_point():
        if tokens.shape[1] > 1:
            start = resume.snapshot(cache)
            resume.release(cache)  # a pending held-back token is tokens[:, 0] (generate put it there)
            try:
                forward(model, tokens[:, :-1], cache=cache, attention_mask=mask[:, :-1], fwd_hooks=fwd_hooks)
            except BaseException:
                resume.restore(cache, start)
                raise
        resume.hold_back(cache, tokens[:, -1], mask[:, -1] == 1)
        out, out_mask = tokens, mask
    elif tokens.is_floating_point():  # an embedding has no token id to hold back
        out = out_mask = torch.empty(tokens.shape[0], 0, dtype=torch.long, device=tokens.device)
    else:  # no cache to prepare
        out, out_mask = tokens, mask
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    return Generation(out, out_mask, out.shape[1], finished, tokenizer=tokenizer, single=single)
