"""``generate``'s options, TransformerLens's generate keywords among them, checked once.

TransformerLens keywords keep ``HookedTransformer.generate``'s meanings:

- ``do_sample``: False is greedy; True samples, at ``temperature=1`` unless one
  is given. Options that would then be ignored are refused (``do_sample=False``
  with a temperature > 0, top_k or top_p; ``do_sample=True`` with temperature 0).
- ``stop_at_eos`` / ``eos_token_id`` (an id or a list): map to ``stop_tokens``.
  ``stop_at_eos=True`` without ``eos_token_id`` stops at the tokenizer's EOS;
  ``eos_token_id`` alone stops at those ids; ``stop_at_eos=False`` with an
  ``eos_token_id`` is refused (it would be ignored). Finished rows are padded
  with the first stop token, as TransformerLens pads with EOS.
- ``use_past_kv_cache=False``: the uncached loop, the whole sequence rerun
  each step (same tokens; for checking the cache, or as a baseline).
- ``verbose``: a tqdm progress bar over the steps.

Where a meaning cannot be kept, one line names the interpkv form
(:data:`NOT_KEPT`). interpkv's defaults stay: greedy, no stop token, no bar.
"""

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

from interpkv.core import arguments
from interpkv.diagnostics.names import NamesFilter, resolve_names

__all__ = ["Options", "resolve", "NOT_KEPT", "progress", "refuse_uncached"]

NOT_KEPT = {
    "freq_penalty": "interpkv samples with temperature=, top_k= and top_p= only; apply a penalty "
    "in a loop over interpkv.forward(model, tokens, cache=cache)",
    "return_type": "generate returns a Generation: use .tokens (prompt included), .new_tokens, .text or .new_text",
    "prepend_bos": "tokenize first: model.to_tokens(text, prepend_bos=..., padding_side='left') and pass the ids",
    "padding_side": "text is always padded on the left; for ids pass attention_mask= (right padding is fine with it)",
    "max_tokens_per_yield": "generate is not a stream; call generate(model, cache=cache, max_new_tokens=n) repeatedly",
}


@dataclass
class Options:
    """Resolved sampling and stopping options."""

    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    stop_tokens: List[int]
    pad_token: Optional[int]
    capture: NamesFilter
    cached: bool
    verbose: bool


def _eos_ids(model, stop_at_eos: Optional[bool], eos_token_id) -> List[int]:
    if eos_token_id is not None:
        if stop_at_eos is False:
            raise ValueError(
                f"stop_at_eos=False but eos_token_id={eos_token_id!r}: the id would be ignored; drop "
                "one (eos_token_id alone stops at it, like stop_tokens=[...])"
            )
        return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]
    if not stop_at_eos:
        return []
    tokenizer = getattr(model, "tokenizer", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "stop_at_eos=True needs an EOS id and this model has no tokenizer EOS: pass "
            "eos_token_id=... (or stop_tokens=[...])"
        )
    return [int(eos)]


def resolve(
    model,
    *,
    max_new_tokens: int,
    temperature: Optional[float],
    top_k: Optional[int],
    top_p: Optional[float],
    stop_tokens: Optional[Sequence[int]],
    pad_token: Optional[int],
    capture: NamesFilter,
    names_filter: NamesFilter,
    do_sample: Optional[bool],
    stop_at_eos: Optional[bool],
    eos_token_id: Union[None, int, Sequence[int]],
    use_past_kv_cache: bool,
    verbose: bool,
    extra: dict,
) -> Options:
    """Check every option and translate TransformerLens's (see the module docstring)."""
    for name in extra:
        if name in NOT_KEPT:
            raise TypeError(f"generate does not take TransformerLens's {name}=: {NOT_KEPT[name]}")
        raise TypeError(f"generate() got an unexpected keyword argument {name!r}")
    if do_sample is False:
        if (temperature or 0) > 0 or top_k is not None or top_p is not None:
            raise ValueError(
                f"do_sample=False is greedy, so temperature={temperature} / top_k={top_k} / "
                f"top_p={top_p} would be ignored: drop them, or pass do_sample=True"
            )
        temperature = 0.0
    elif do_sample:
        if temperature == 0:
            raise ValueError("do_sample=True samples, but temperature=0 is greedy: pass temperature > 0")
        temperature = 1.0 if temperature is None else temperature
    elif temperature is None:
        temperature = 0.0
    if temperature is not None:
        temperature = arguments.real("temperature", temperature, low=0.0)
    stop_ids = arguments.token_ids("stop_tokens", stop_tokens, model.cfg.d_vocab_out) if stop_tokens is not None else []
    stops = stop_ids + _eos_ids(model, stop_at_eos, eos_token_id)
    _check(model, max_new_tokens, temperature, top_k, top_p, stops, pad_token)
    names = resolve_names(capture, names_filter, names_kw="capture", model=model)
    if not isinstance(use_past_kv_cache, bool) or not isinstance(verbose, bool):
        raise TypeError(
            f"use_past_kv_cache and verbose are bools, got {use_past_kv_cache!r} and {verbose!r}"
        )
    return Options(
        float(temperature), top_k, top_p, list(dict.fromkeys(stops)), pad_token, names,
        use_past_kv_cache, verbose,
    )


def _check(model, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_token) -> None:
    arguments.count("max_new_tokens", max_new_tokens)
    if top_k is not None:
        arguments.count("top_k", top_k, minimum=1)
        if top_k > model.cfg.d_vocab_out:
            raise ValueError(
                f"top_k={top_k} is more than the model's d_vocab_out={model.cfg.d_vocab_out} tokens; "
                "pass top_k=None to sample from every token"
            )
    if top_p is not None:
        arguments.real("top_p", top_p, low=0.0, high=1.0, low_open=True)
    if pad_token is not None:
        arguments.token_ids("pad_token", [pad_token], model.cfg.d_vocab_out)
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


def progress(steps: int, verbose: bool) -> Iterator[int]:
    """A tqdm bar over ``steps`` when ``verbose`` (TransformerLens's), else a plain range."""
    if not verbose:
        return iter(range(steps))
    from tqdm.auto import tqdm  # deferred: tqdm, only with verbose=True

    return iter(tqdm(range(steps), desc="generate", unit="token"))


def refuse_uncached(cache, resumed, tokens, opts) -> None:
    """``use_past_kv_cache=False`` cases whose meaning cannot be kept, each naming the interpkv form."""
    if cache is not None or resumed:
        raise ValueError(
            "use_past_kv_cache=False reruns the whole sequence each step without a cache, but a "
            "cache was given: drop cache= (or drop use_past_kv_cache=False)"
        )
    if opts.capture is not None:
        raise ValueError(
            "use_past_kv_cache=False with capture: the uncached loop reruns every position each step; "
            "record the final sequence with interpkv.capture(model, out.tokens, attention_mask=out.attention_mask)"
        )
    if tokens.is_floating_point():
        raise ValueError(
            "use_past_kv_cache=False needs token ids (it re-reads the prompt each step); an embedding "
            "prompt goes through the cache: drop use_past_kv_cache=False"
        )
