"""A saved cache checked against a model: what wrote it, and whether continuing it equals an uncached run.

What ``interpkv check MODEL --cache PATH`` runs (:func:`check_saved_cache`):

1. **Load.** :meth:`KVCache.load` into ``model`` (it refuses a file from
   other weights, architecture or dtype: :class:`~interpkv.errors.CacheFileError`),
   recording the :class:`~interpkv.ProvenanceWarning` it emits when the
   file's SAEs, faults or model hooks differ from the model's.
2. **Provenance.** The file's provenance (:attr:`KVCache.provenance`) is
   compared span by span with what ``model`` runs under *now* (its SAEs,
   faults and hooks, and the caller's ``fwd_hooks``), every kind of
   intervention included: a span written under a steering hook (a call's
   ``fwd_hooks``, which :meth:`KVCache.load` cannot know will be absent) is a
   mismatch when the model continues without it. A span whose writers are
   unknown (a file saved without provenance, slots built with
   ``KVCache.from_state``) is listed too: nothing shows what computed it.
3. **Continuation.** When the prefix's tokens are known (``tokens=``, or the
   file's metadata ``"tokens"``: ``cache.save(path, metadata={"tokens":
   tokens.tolist()})``), the loaded cache is continued by ``new_tokens``
   random tokens (seeded) and its logits compared with one uncached forward
   of the prefix and those tokens under the same mask (and the same
   ``fwd_hooks``, when the caller continues it under hooks): the largest
   difference, judged at :data:`interpkv.tolerances.CACHED_LOGITS`. A held-back
   token (a cache ``generate`` continued) is fed first, as the multi-turn rule
   says (:mod:`interpkv.core.heldback`). Without tokens nothing is continued,
   and the result says why.

:mod:`interpkv.verify.verdicts` turns a :class:`SavedCacheResult` into
PASS / FAIL rows (:func:`~interpkv.verify.verdicts.of_saved_provenance`,
:func:`~interpkv.verify.verdicts.of_continuation`). Nothing here prints.
"""

import dataclasses
import os
import warnings
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from interpkv import tolerances
from interpkv.cache import persist, provenance
from interpkv.cache.kvcache import KVCache
from interpkv.core import heldback, stephooks
from interpkv.core.forward import forward
from interpkv.errors import CacheFileError, ProvenanceWarning
from interpkv.generation.resume import prepend_held_back

__all__ = ["SavedCacheResult", "check_saved_cache", "saved_dtype", "METADATA_TOKENS"]

METADATA_TOKENS = "tokens"
"""The user-metadata key a saved cache's prefix tokens are read from (one list of ids per row, one id per slot)."""

@dataclasses.dataclass
class SavedCacheResult:
    """One saved cache loaded into one model.

    Attributes:
        path: the file.
        model: the model's name in reports.
        dtype: the model's (and the file's) dtype.
        provenance: what wrote each span (:attr:`KVCache.provenance` of the loaded cache).
        saved_with_provenance: False for a file saved by an interpkv before provenance.
        load_warnings: the :class:`~interpkv.ProvenanceWarning` messages ``KVCache.load`` emitted.
        mismatches: one line per span written under interventions the model does
            not run under now ("positions 0-7 were written under ...; gpt2 here has none").
        unknown: the positions of spans whose writers are unknown ("positions 0-7").
        tokens_from: where the prefix tokens came from (None: unknown, nothing continued).
        max_dlogit: largest |continued - uncached| logit over the new tokens (None: not continued).
        inputs: one sentence: what was continued and compared, or why nothing was.
        batch_size, seq_len: the loaded cache's.
    """

    path: str
    model: str
    dtype: torch.dtype
    provenance: provenance.Provenance
    saved_with_provenance: bool
    load_warnings: List[str]
    mismatches: List[str]
    unknown: List[str]
    tokens_from: Optional[str]
    max_dlogit: Optional[float]
    inputs: str
    batch_size: int
    seq_len: int

    @property
    def provenance_ok(self) -> bool:
        """Every stored span was written under the interventions the model runs under now (and is known)."""
        return not self.mismatches and not self.unknown

    @property
    def continuation_ok(self) -> Optional[bool]:
        """The continuation equals the uncached run within tolerance (None: not continued)."""
        if self.max_dlogit is None:
            return None
        return self.max_dlogit < tolerances.CACHED_LOGITS[self.dtype]  # NaN: False

    @property
    def ok(self) -> bool:
        return self.provenance_ok and self.continuation_ok is not False

    def __repr__(self) -> str:
        cont = "not continued" if self.max_dlogit is None else f"continued: max |dlogit| {self.max_dlogit:.2e}"
        what = "matches" if self.provenance_ok else f"{len(self.mismatches) + len(self.unknown)} span(s) differ"
        return f"SavedCacheResult({self.path}, {self.model}: provenance {what}; {cont})"


def saved_dtype(path: Union[str, "os.PathLike[str]"]) -> torch.dtype:
    """The dtype a cache file was saved in (read from its header; no tensor is read).

    Raises:
        CacheFileError: not an interpkv cache file.
    """
    raw = persist.read_header(path)
    name = raw.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if raw.get("format") != persist.cachefile.FORMAT or dtype not in tolerances.CACHED_LOGITS:
        raise CacheFileError(
            f"{os.fspath(path)}: not an interpkv cache file (format {raw.get('format')!r}, dtype {name!r}); "
            "write caches with cache.save(path)"
        )
    return dtype


def _span_positions(span) -> str:
    if span.positions is None:
        return "no stored position"
    lo, hi = span.positions
    return f"position {lo}" if lo == hi else f"positions {lo}-{hi}"


def _prefix_tokens(cache: KVCache, tokens, path: str) -> Tensor:
    """``tokens`` as ``[batch, seq_len]`` ids on the cache's device (a trailing held-back column dropped)."""
    t = torch.as_tensor(tokens)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{path}: the prefix tokens must be integer ids [batch, pos], got {t.dtype} {list(t.shape)}")
    rows = heldback.pending_rows(cache)
    if rows and t.shape == (cache.batch_size, cache.seq_len + 1):  # Generation.tokens: the held-back id last
        held = cache.row_state[heldback.IDS].to(t.device)
        if bool((t[rows, -1] == held[rows]).all()):
            t = t[:, :-1]
    if tuple(t.shape) != (cache.batch_size, cache.seq_len):
        raise ValueError(
            f"{path}: the prefix tokens are {list(t.shape)} but the cache holds [{cache.batch_size}, "
            f"{cache.seq_len}] slots: give one id per stored slot and row (any id at a padding slot)"
        )
    return t.to(device=cache.device, dtype=torch.long)


def _continuable(cache: KVCache) -> Optional[str]:
    """Why an uncached run cannot reproduce ``cache``'s positions (None: it can, from a mask)."""
    pos = cache.positions
    real = pos >= 0
    expected = real.long().cumsum(1) - 1  # what the uncached run under this mask gives each real slot
    if not bool((pos[real] == expected[real]).all()) or not bool((cache.next_positions == real.sum(1)).all()):
        return ("its rows do not hold positions 0..n-1 in slot order (a window evicted some, or slots were "
                "rearranged), so no uncached run of its tokens lines up with it")
    return None


def check_saved_cache(
    model,
    path: Union[str, "os.PathLike[str]"],
    *,
    label: Optional[str] = None,
    tokens=None,
    fwd_hooks: Sequence = (),
    new_tokens: int = 4,
    seed: int = 0,
) -> SavedCacheResult:
    """Load a saved cache into ``model``, compare its provenance with the model's, and continue it.

    See the module docstring for what is checked.

    Args:
        model: the HookedTransformer the cache was saved from (or one with the
            same weights), as it will continue the cache: its SAEs and hooks count.
        path: a file written by :meth:`KVCache.save`.
        label: the model's name in reports (default: ``model.cfg.model_name``).
        tokens: the prefix's token ids, ``[batch, seq_len]`` (one per stored
            slot, any id at padding). Default: the file's metadata
            ``"tokens"``; without either, nothing is continued.
        fwd_hooks: the hooks the cache is to be continued under (e.g. the
            steering hook that wrote it): compared with its provenance, and
            active in both the continued and the uncached run.
        new_tokens: how many random tokens continue it.
        seed: the random tokens' seed.

    Returns:
        A :class:`SavedCacheResult`.

    Raises:
        CacheFileError: the file cannot become a cache for ``model`` (see :meth:`KVCache.load`).
        ValueError: ``tokens`` (or the metadata's) do not fit the cache.

    >>> import interpkv, os, tempfile, torch
    >>> model = interpkv.zoo.load("gpt2")
    >>> cache = interpkv.KVCache.for_model(model)
    >>> prompt = torch.tensor([[1, 2, 3]])
    >>> _ = interpkv.forward(model, prompt, cache=cache)
    >>> path = os.path.join(tempfile.mkdtemp(), "prompt.safetensors")
    >>> cache.save(path, metadata={"tokens": prompt.tolist()})   # its tokens, for the continuation
    >>> result = check_saved_cache(model, path)
    >>> result.provenance_ok, result.continuation_ok
    (True, True)
    """
    path = os.fspath(path)
    label = label or getattr(model.cfg, "model_name", None) or type(model).__name__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ProvenanceWarning)
        cache = KVCache.load(path, model)
    load_warnings = []
    for w in caught:
        if issubclass(w.category, ProvenanceWarning):
            load_warnings.append(str(w.message))
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    prov = cache.provenance
    acting = provenance.current(model, fwd_hooks, stephooks.installed(model))
    now = f"{label} here has" if not fwd_hooks else f"{label} with the hooks given has"
    mismatches = provenance.mismatches(cache, acting, now_text=now)
    unknown = [_span_positions(s) for s in prov.spans if s.interventions is None and s.positions is not None]
    saved_with = persist.read_provenance(path) is not None

    tokens_from: Optional[str] = "the tokens given"
    if tokens is None:
        meta = cache.metadata if isinstance(cache.metadata, dict) else {}
        tokens = meta.get(METADATA_TOKENS)
        tokens_from = f"the file's metadata {METADATA_TOKENS!r}" if tokens is not None else None
    max_dlogit: Optional[float] = None
    batch_size, seq_len = cache.batch_size, cache.seq_len  # as loaded (the continuation appends)
    if cache.seq_len == 0:
        tokens_from, inputs = None, "the cache holds no positions: nothing to continue"
    elif tokens_from is None:
        inputs = (f"not continued: the prefix tokens are unknown (save them with "
                  f"metadata={{{METADATA_TOKENS!r}: tokens.tolist()}} to check the continuation)")
    elif (why := _continuable(cache)) is not None:
        tokens_from, inputs = None, f"not continued: {why}"
    else:
        prefix = _prefix_tokens(cache, tokens, path)
        if bool(((prefix < 0) | (prefix >= model.cfg.d_vocab))[cache.positions >= 0].any()):
            raise ValueError(f"{path}: the prefix tokens hold ids outside the model's vocabulary [0, {model.cfg.d_vocab})")
        generator = torch.Generator().manual_seed(seed)
        new = torch.randint(model.cfg.d_vocab, (cache.batch_size, new_tokens), generator=generator)
        new = new.to(cache.device)
        prefix_mask = (cache.positions >= 0).long()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", ProvenanceWarning)  # reported above, as the provenance row
            fed, mask = prepend_held_back(cache, new)
            continued = forward(model, fed, cache=cache, attention_mask=mask, fwd_hooks=fwd_hooks)[:, -new_tokens:]
            whole = torch.cat([prefix, fed], 1)
            whole_mask = torch.cat([prefix_mask, mask.to(prefix_mask)], 1)
            uncached = forward(model, whole, attention_mask=whole_mask, fwd_hooks=fwd_hooks)[:, -new_tokens:]
        max_dlogit = float((continued - uncached).abs().max())
        held = " after the held-back token" if fed.shape[1] > new_tokens else ""
        inputs = (f"the cache ({cache.batch_size} x {prefix.shape[1]} slots, prefix tokens from {tokens_from}) "
                  f"continued by {new_tokens} random tokens (seed {seed}){held}, against one uncached forward "
                  f"of the prefix and those tokens; {str(model.cfg.dtype).replace('torch.', '')}")
    return SavedCacheResult(
        path=path, model=label, dtype=model.cfg.dtype, provenance=prov, saved_with_provenance=saved_with,
        load_warnings=load_warnings, mismatches=mismatches, unknown=unknown, tokens_from=tokens_from,
        max_dlogit=max_dlogit, inputs=inputs, batch_size=batch_size, seq_len=seq_len,
    )
