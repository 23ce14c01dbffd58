"""Spans of slots and the interventions that wrote them; the comparison and the warning.

A cache holds ``_provenance``: a tuple of ``(first slot id, end slot id,
interventions)``, slot ids as in :attr:`KVCache.slot_ids` (they follow slots
through eviction, row selection and copies, so ``fork`` / ``select`` /
``repeat`` carry the spans unchanged; ``crop`` restricts them).
"""

import collections
import dataclasses
import os
import sys
import warnings
import weakref
from typing import List, Optional, Sequence, Tuple

from torch import Tensor

from interpkv.cache.provenance.collect import current, edited
from interpkv.cache.provenance.records import Intervention
from interpkv.core import stephooks
from interpkv.errors import ProvenanceWarning

__all__ = ["written", "crop", "mismatches", "check", "explain", "check_loaded", "set_text", "history"]

# A cache holds ``_provenance``: a list of (first slot id, end slot id, interventions),
# slot ids as in KVCache.slot_ids (they follow slots through eviction, rows and copies).
RawSpan = Tuple[int, int, Tuple[Intervention, ...]]


def written(cache, acting: Tuple[Intervention, ...], first_id: int) -> None:
    """Record that slots ``first_id ..`` (up to ``cache.appended``) were written under ``acting``."""
    end = cache.appended
    if end <= first_id:
        return
    spans = cache._provenance
    if spans:
        a, b, last = spans[-1]
        if b == first_id and (last is acting or last == acting):
            cache._provenance = spans[:-1] + ((a, end, last),)
            return
    cache._provenance = spans + ((first_id, end, acting),)


def crop(cache, kept_ids: Tensor) -> None:
    """Keep only the spans' parts whose slot ids are in ``kept_ids`` (after ``crop``)."""
    if not cache._provenance:
        return
    present = sorted(set(kept_ids.flatten().tolist()) - {-1})
    cache._provenance = _restrict(cache._provenance, present)


def _restrict(spans: Tuple[RawSpan, ...], present: List[int]) -> Tuple[RawSpan, ...]:
    out: List[RawSpan] = []
    for a, b, acting in spans:
        run_start: int | None = None
        prev = -2  # no run yet
        for i in present:
            if i < a or i >= b:
                continue
            if run_start is None:
                run_start = prev = i
            elif i == prev + 1:
                prev = i
            else:
                out.append((run_start, prev + 1, acting))
                run_start = prev = i
        if run_start is not None:
            out.append((run_start, prev + 1, acting))
    return tuple(out)


def _affects_cache(n_layers: int, point: str) -> bool:
    """Whether a hook at ``point`` can change a stored key or value."""
    if not point.startswith("blocks."):
        return not point.startswith(("ln_final", "unembed"))
    parts = point.split(".", 2)
    try:
        layer = int(parts[1])
    except (IndexError, ValueError):
        return True
    if layer < n_layers - 1:
        return True
    rest = parts[2] if len(parts) > 2 else ""
    return rest.startswith(("hook_resid_pre", "ln1.", "hook_attn_in", "hook_k_input", "hook_v_input",
                            "attn.hook_k", "attn.hook_v", "attn.hook_rot_k"))


def _span_positions(cache, a: int, b: int) -> Tuple[Tensor, Tensor]:
    """``(positions, in_span)`` ``[batch, kv_pos]`` of the stored slots with ids in ``[a, b)``."""
    ids, pos = cache.slot_ids, cache.positions
    return pos, (ids >= a) & (ids < b) & (pos >= 0)


def _acting_on(cache, interventions, a: int, b: int, masks: bool) -> collections.Counter:
    """The interventions that act on span ``[a, b)``, each with the stored slots it acts on.

    ``masks``: compare which slots each acts on (some intervention of either
    side declares positions); else every acting one counts as acting on all.
    """
    n_layers = cache.signature["n_layers"]
    out: collections.Counter = collections.Counter()
    pos = in_span = None
    for i in interventions:
        if not i.acts or not _affects_cache(n_layers, i.point):
            continue
        selected = None
        if masks:
            if pos is None:
                pos, in_span = _span_positions(cache, a, b)
            assert pos is not None and in_span is not None
            chosen = in_span if i.where is None else i.where.selects(pos) & in_span
            if not bool(chosen.any()):
                continue
            selected = chosen.cpu().numpy().tobytes()
        out[(dataclasses.replace(i, where=None), selected)] += 1
    return out


def _listed(interventions, acting: collections.Counter) -> List[Intervention]:
    """The interventions of ``interventions`` that are in ``acting`` (as declared, for the message)."""
    keys = {k for k, _ in acting}
    return [i for i in interventions if dataclasses.replace(i, where=None) in keys]


def _positions_text(cache, a: int, b: int) -> str:
    pos, in_span = _span_positions(cache, a, b)
    real = pos[in_span]
    if real.numel() == 0:
        return "no stored position"
    lo, hi = int(real.min()), int(real.max())
    return f"position {lo}" if lo == hi else f"positions {lo}-{hi}"


def set_text(interventions) -> str:
    return "; ".join(i.text() for i in interventions) if interventions else "none"


# cache -> {(span, interventions, ...): mismatch line or None}; per cache (verdicts read its positions)
_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def mismatches(cache, acting: Tuple[Intervention, ...], kinds=None, now_text: str = "this call has") -> List[str]:
    """One line per stored span whose acting interventions differ from ``acting``'s (memoized)."""
    memo = _MEMO.get(cache)
    if memo is None:
        memo = _MEMO[cache] = {}
    lines = []
    for a, b, wrote in cache._provenance:
        if wrote is acting or wrote == acting:
            continue
        key = (a, b, wrote, acting, kinds, now_text)
        if key not in memo:
            if len(memo) > 256:
                memo.clear()
            w, c = wrote, acting
            if kinds is not None:
                w = tuple(i for i in w if i.kind in kinds)
                c = tuple(i for i in c if i.kind in kinds)
            masks = any(i.where is not None for i in w + c)
            then, now = _acting_on(cache, w, a, b, masks), _acting_on(cache, c, a, b, masks)
            if then == now:
                memo[key] = None
            else:
                where = _positions_text(cache, a, b)
                memo[key] = (
                    f"{where} {'was' if where.startswith('position ') else 'were'} written under "
                    f"{set_text(_listed(w, then))}; "
                    f"{now_text} {set_text(_listed(c, now))}"
                    if where != "no stored position" else None
                )
        if memo[key] is not None:
            lines.append(memo[key])
    return lines


_ADVICE = (
    "The stored keys of those positions are not what this call's interventions compute there, so the "
    "result equals neither run uncached. Recompute the prefix under this call's interventions (a fresh "
    "cache), or, if a hook is meant to act only on new tokens, declare its positions "
    "(interpkv.steering.add(v, start=len(prefix)) or region=\"generated\", interpkv.intervention(fn, "
    "start=...)). See cache.provenance; warnings.simplefilter(\"error\", interpkv.ProvenanceWarning) "
    "makes this an error raised before the cache changes."
)


def check(model, cache, noted, step_hooks=None, *, what: str = "this call") -> Tuple[Intervention, ...]:
    """Warn (:class:`ProvenanceWarning`) if ``cache``'s spans were written under other interventions.

    Called by a forward through ``cache`` after running and before its
    commit, with what edited activations in it (:func:`interpkv.core.calls.edits`).
    Returns the call's interventions, for :func:`written`.
    """
    acting = edited(model, noted, step_hooks)
    spans = cache._provenance
    if spans and not all(wrote is acting or wrote == acting for _, _, wrote in spans):
        if cache.window is not None:  # a window evicts spans: forget those gone (reads the slot ids)
            cache._provenance = _restrict(spans, sorted(set(cache.slot_ids.flatten().tolist()) - {-1}))
        lines = mismatches(cache, acting)
        if lines:
            _warn(f"{what} continues a cache under other interventions than wrote it: "
                  + " | ".join(lines) + ". " + _ADVICE)
    return acting


def explain(model, cache, fwd_hooks: Sequence = (), now_text: str = "this call has") -> Optional[str]:
    """The mismatch text of a run of ``fwd_hooks`` continuing ``cache`` (None if none), for ``.cause``."""
    acting = current(model, fwd_hooks, stephooks.installed(model))
    lines = mismatches(cache, acting, now_text=now_text)
    if not lines:
        return None
    return "the cache's " + " | ".join(lines) + " (see cache.provenance)"


def _warn(message: str) -> None:
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # interpkv/
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(package)
        or f"{os.sep}torch{os.sep}" in frame.f_code.co_filename
        or frame.f_code.co_filename.endswith("contextlib.py")
        or f"{os.sep}jaxtyping{os.sep}" in frame.f_code.co_filename  # run-time shape checks (test runs)
        or frame.f_code.co_filename.startswith("<@beartype")
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(ProvenanceWarning(message), stacklevel=level)


def check_loaded(model, cache, path: str) -> None:
    """After a load: warn if the file's SAEs, faults or model hooks differ from ``model``'s now."""
    acting = current(model, (), None)
    if not cache._provenance:
        return
    lines = mismatches(cache, acting, kinds=("sae", "model hook", "fault"), now_text="the model has")
    if lines:
        _warn(f"{path}: the loaded cache was written under other model interventions (SAEs, faults, hooks "
              "on the model) than the model has now: " + " | ".join(lines) + ". " + _ADVICE)


def history(model, cache, tokens: Tensor, fwd_hooks: Sequence = ()) -> Tuple[int, Optional[str]]:
    """``(stored positions, mismatch text or None)`` for ``compare`` / ``compare_generation`` continuing ``cache``.

    ``cache`` is a :class:`~interpkv.KVCache`; ``tokens`` the whole sequence,
    its first ``cache.seq_len`` tokens already in the cache.

    Raises:
        ValueError: the cache holds padding or evicted positions, or ``tokens``
            is not longer than what it holds.
    """
    prefix = cache.seq_len
    if prefix == 0:
        return 0, None
    if not bool((cache.positions >= 0).all()) or not bool((cache.next_positions == prefix).all()):
        raise ValueError(
            "compare continues a cache holding history only when it holds positions 0..n-1 of every row "
            "(no padding, no eviction); pass a fresh cache, or tokens and a cache without padding"
        )
    if tokens.shape[-1] <= prefix:
        raise ValueError(
            f"the cache holds {prefix} positions, so tokens must be the whole sequence (those {prefix} "
            f"tokens, then the new ones), got {tokens.shape[-1]} tokens"
        )
    return prefix, explain(model, cache, fwd_hooks, now_text="this run has")
