"""Provenance: which interventions wrote each span of a cache's stored positions.

A cached key is the output of a computation: the model's weights *and*
everything that edited the forward pass when the key was written (a steering
hook, an SAE spliced in, a fault, a hook TransformerLens holds on the model).
Continuing a cache under other interventions attends to keys no run of the
new interventions would compute: the result equals neither the steered nor
the unsteered uncached run, silently. (vLLM keys its prefix cache on token
ids, an adapter name and a salt, and shipped wrong-KV bugs from it; nnsight
turns prefix caching off around interventions.) So every
:class:`~interpkv.KVCache` records, per span of slots, the
:class:`Intervention` s active when they were written, and a call that
continues it compares them with its own (:func:`check`, before anything
changes), emitting :class:`~interpkv.ProvenanceWarning` on a mismatch.

What counts, per span (a run of slots written by calls with equal interventions):

- each ``fwd_hooks`` entry of the call (and of an enclosing interpkv call,
  e.g. ``capture(fwd_hooks=...)``): hook point and a content digest of the
  hook (:mod:`interpkv.cache.identity`); interpkv's ``steering`` hooks and
  :func:`interpkv.intervention` wrappers carry an exact identity and the
  positions they act on;
- SAEs spliced into a SAELens ``HookedSAETransformer`` (hook point, config,
  weights digest); one with ``use_error_term=True`` outputs its input (up to
  rounding) and is listed but never a mismatch;
- faults injected with :func:`interpkv.faults.inject`;
- hooks held by the model itself (TransformerLens ``add_hook``,
  ``model.hooks(...)``, plain ``register_forward_hook`` on a hook point);
- the weights fingerprint (:mod:`interpkv.cache.fingerprint`), shown by
  :attr:`Provenance.weights`; a file from other weights is refused by
  :meth:`KVCache.load` already.

When is it a mismatch: for each stored span, the interventions of each side
that *act on it* are compared. An intervention acts on a span unless (a) it
declares positions (``steering.add(v, start=p)``, ``region="generated"``,
``interpkv.intervention(fn, start=p)``) none of which is in the span, or (b)
its hook point comes after the last layer's keys and values are computed
(``blocks.{last}.hook_resid_post``, ``ln_final``, ``unembed``, ...), so it
never reaches a stored key. A hook acting on position ``p`` changes keys at
``p`` and after; those are in ``p``'s span or later ones, which were written
under it, so comparing span by span is enough.

Cost: the interventions of a call are collected once per forward call (a
memo per hook object; hook points are scanned only when a hook was
registered since the last scan) and compared with the spans' by equality;
an unhooked decode step adds a few microseconds and no device sync (see
docs/performance.md). Only a differing set reads positions from the device,
once per span and set (memoized).
"""

import collections
import dataclasses
import json
import os
import sys
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from interpkv.cache import identity
from interpkv.cache.fingerprint import parameters_fingerprint
from interpkv.core import calls
from interpkv.errors import ProvenanceWarning

__all__ = ["Intervention", "Where", "Span", "Provenance", "ProvenanceWarning", "declare", "current", "check",
           "written", "describe", "read", "NONE"]

NONE: Tuple = ()  # no interventions


# ------------------------------------------------------------------ records
Bound = Optional[Union[int, Tuple[int, ...]]]


@dataclasses.dataclass(frozen=True, eq=False)
class Where:
    """Positions an intervention declares it acts on (None fields: no limit).

    ``start`` / ``stop``: absolute positions ``start <= p < stop``, an int or
    one per row. ``positions``: only these. ``region``: ``"prompt"`` /
    ``"generated"`` inside a generation, resolved against ``anchor`` (each
    row's first generated position, the tensor of that generation).
    """

    start: Bound = None
    stop: Bound = None
    positions: Optional[Tuple[int, ...]] = None
    region: Optional[str] = None
    anchor: Optional[Tensor] = None

    def _key(self):
        return (self.start, self.stop, self.positions, self.region, id(self.anchor) if self.anchor is not None else None)

    def __eq__(self, other):
        return isinstance(other, Where) and self._key() == other._key() and (self.anchor is other.anchor)

    def __hash__(self):
        return hash(self._key())

    def resolved(self) -> "Where":
        """The same positions with ``region`` turned into per-row ``start`` / ``stop`` (for a file)."""
        if self.region is None or self.anchor is None:
            return self
        first = tuple(int(x) for x in self.anchor.tolist())
        if self.region == "generated":
            start = first if self.start is None else _tighter(self.start, first, max)
            return dataclasses.replace(self, start=start, region=None, anchor=None)
        stop = first if self.stop is None else _tighter(self.stop, first, min)
        return dataclasses.replace(self, stop=stop, region=None, anchor=None)

    def selects(self, pos: Tensor) -> Tensor:
        """``[batch, kv_pos]`` bool: which of ``pos`` (absolute positions) it acts on (all if unknown)."""
        batch = pos.shape[0]
        out = pos >= 0
        for bound, lower in ((self.start, True), (self.stop, False)):
            t = _bound_tensor(bound, batch, pos.device)
            if t is False:
                return out
            if t is not None:
                out = out & ((pos >= t) if lower else (pos < t))
        if self.positions is not None:
            out = out & torch.isin(pos, torch.tensor(self.positions, dtype=pos.dtype, device=pos.device))
        if self.region is not None and self.anchor is not None:
            if self.anchor.shape[0] != batch:
                return pos >= 0
            first = self.anchor.to(pos.device)[:, None]
            out = out & ((pos >= first) if self.region == "generated" else (pos < first))
        return out

    def text(self) -> str:
        parts = []
        for name in ("start", "stop", "positions", "region"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={list(value) if isinstance(value, tuple) else value!r}")
        return ", ".join(parts)

    def to_json(self) -> dict:
        w = self.resolved()
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                (("start", w.start), ("stop", w.stop), ("positions", w.positions), ("region", w.region))
                if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> "Where":
        def bound(v):
            return tuple(int(x) for x in v) if isinstance(v, list) else (None if v is None else int(v))

        positions = data.get("positions")
        return cls(start=bound(data.get("start")), stop=bound(data.get("stop")),
                   positions=None if positions is None else tuple(int(x) for x in positions),
                   region=data.get("region"))


def _tighter(a, b, pick):
    if isinstance(a, int):
        a = (a,) * len(b)
    if len(a) != len(b):
        return b
    return tuple(pick(x, y) for x, y in zip(a, b))


def _bound_tensor(bound, batch: int, device):
    if bound is None:
        return None
    if isinstance(bound, int):
        return torch.tensor(bound, device=device)
    if len(bound) != batch:  # rows were selected or repeated since: unknown, act everywhere
        return False
    return torch.tensor(bound, device=device)[:, None]


@dataclasses.dataclass(frozen=True, eq=False)
class Intervention:
    """One thing that edited the forward pass.

    Attributes:
        kind: ``"hook"`` (a call's ``fwd_hooks``), ``"model hook"`` (held by the
            model), ``"sae"`` or ``"fault"``.
        point: the hook point (``"cache"`` for a fault).
        label: a short human name, e.g. ``"steering.add(v#3f2a, start=5)"``.
        digest: the identity two interventions are compared by.
        where: the positions it declares it acts on (None: every position).
        acts: False for one that leaves values unchanged (an SAE with its error term).
        automatic: False when the digest is the object's identity (name the hook).
    """

    kind: str
    point: str
    label: str
    digest: str
    where: Optional[Where] = None
    acts: bool = True
    automatic: bool = True

    def _key(self):
        return (self.kind, self.point, self.digest, self.where, self.acts)

    def __eq__(self, other):
        return isinstance(other, Intervention) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def text(self) -> str:
        where = f" [{self.where.text()}]" if self.where is not None and self.where.text() else ""
        kind = "" if self.kind == "hook" else f"{self.kind} "
        return f"{kind}{self.point} {self.label}{where}"

    def __repr__(self) -> str:
        return f"<{self.text()}>"

    def to_json(self) -> dict:
        out = {"kind": self.kind, "point": self.point, "label": self.label, "digest": self.digest}
        if self.where is not None:
            out["where"] = self.where.to_json()
        if not self.acts:
            out["acts"] = False
        if not self.automatic:
            out["automatic"] = False
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Intervention":
        where = data.get("where")
        return cls(str(data["kind"]), str(data["point"]), str(data["label"]), str(data["digest"]),
                   None if where is None else Where.from_json(where), bool(data.get("acts", True)),
                   bool(data.get("automatic", True)))


# ------------------------------------------------------ declared identities
@dataclasses.dataclass(frozen=True)
class Declared:
    """What a hook says about itself: a name (or values to digest) and the positions it acts on."""

    label: str
    values: tuple = ()
    name: Optional[str] = None
    where: Optional[Where] = None


def declare(hook, label: str, *, values: tuple = (), name: Optional[str] = None, start=None, stop=None,
            positions: Optional[Sequence[int]] = None, region: Optional[str] = None):
    """Attach an exact identity and declared positions to ``hook`` (returns ``hook``).

    ``name`` (if given) is the identity; else ``label`` and the content digest
    of ``values``. ``start`` / ``stop`` / ``positions`` / ``region`` as in
    :mod:`interpkv.steering`: the hook must act on no other position.
    """
    if region is not None and region not in ("prompt", "generated"):
        raise ValueError(f'region is "prompt" or "generated", got {region!r}')
    where = None
    if any(x is not None for x in (start, stop, positions, region)):
        where = Where(_as_bound(start), _as_bound(stop),
                      None if positions is None else tuple(int(p) for p in positions), region)
    hook._interpkv_declared = Declared(label, tuple(values), name, where)
    return hook


def _as_bound(value) -> Bound:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.tolist()  # once, when the hook is made
    if isinstance(value, (list, tuple)):
        return tuple(int(x) for x in value)
    return int(value)


# ---------------------------------------------------- collecting a call's set
_BASE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # hook object -> (label, digest, where, automatic)


def _base(hook) -> Tuple[str, str, Optional[Where], bool]:
    try:
        return _BASE[hook]
    except (KeyError, TypeError):
        pass
    declared = getattr(hook, "_interpkv_declared", None)
    if declared is not None:
        if declared.name is not None:
            base = (declared.name, "name:" + declared.name, declared.where, True)
        else:
            try:
                d = identity.value_digest((declared.label, declared.values))
                auto = True
            except TypeError:
                d, auto = f"id:{id(hook):x}", False
            base = (f"{declared.label}#{d[:4]}", d, declared.where, auto)
    else:
        if getattr(hook, "__qualname__", "").endswith("add_hook.<locals>.full_hook") and hook.__closure__:
            inner = dict(zip(hook.__code__.co_freevars, (c.cell_contents for c in hook.__closure__))).get("hook")
            if inner is not None:  # TransformerLens's wrapper around the user's function
                return _base(inner)
        d, auto = identity.digest(hook)
        name = getattr(hook, "__name__", None) or type(hook).__name__
        base = (f"{name}#{d[:4]}" if auto else f"{name} (object {d[3:]})", d, None, auto)
    try:
        _BASE[hook] = base
    except TypeError:  # not weakly referenceable (a bound method is rebuilt anyway)
        pass
    return base


def _hook_intervention(kind: str, point: str, hook) -> Intervention:
    label, digest, where, auto = _base(hook)
    if where is not None and where.region is not None:
        where = dataclasses.replace(where, anchor=calls.generation_start())
    return Intervention(kind, point, label, digest, where, True, auto)


def _points(model, name) -> List[str]:
    if isinstance(name, str):
        return [name]
    try:
        return [n for n in model.hook_dict if name(n)]
    except Exception:
        return ["<filter>"]


# model -> (RemovableHandle.next_id at the scan, its result)
_SCANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _model_hook_table(model) -> Tuple[Tuple[str, object], ...]:
    """``(point name, hook)`` the model holds on its hook points (not a running interpkv call's gated ones)."""
    stamp = RemovableHandle.next_id
    memo = _SCANS.get(model)
    if memo is not None and memo[0] == stamp and not memo[1]:
        return NONE  # nothing registered since a scan that found nothing (removals only shrink it)
    found = []
    hook_dict = getattr(model, "hook_dict", None) or {}
    for name, point in hook_dict.items():
        for table in (point._forward_pre_hooks, point._forward_hooks):
            if table:
                for fn in tuple(table.values()):
                    if getattr(fn, "_interpkv_owner", None) is None:
                        found.append((name, fn))
    result = tuple(found)
    try:
        _SCANS[model] = (stamp, result)
    except TypeError:
        pass
    return result


def model_hook_points(model) -> Tuple[str, ...]:
    """Hook points where the model holds hooks of its own (``add_hook``, ``model.hooks(...)``)."""
    table = _model_hook_table(model)
    return tuple(dict.fromkeys(name for name, _ in table)) if table else NONE


def _model_hooks(model, points=None) -> Tuple[Intervention, ...]:
    table = _model_hook_table(model)
    return tuple(_hook_intervention("model hook", name, fn) for name, fn in table
                 if points is None or name in points)


_SAE_BASE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _saes(model) -> Tuple[Intervention, ...]:
    wrappers = getattr(model, "_acts_to_saes", None)
    if not wrappers:
        return NONE
    out = []
    for point, wrapper in wrappers.items():
        sae = wrapper.__dict__.get("_sae", None) or getattr(wrapper, "sae", wrapper)
        base = _SAE_BASE.get(sae)
        if base is None:
            cfg = getattr(sae, "cfg", None)
            to_dict = getattr(cfg, "to_dict", None)
            try:
                cfg_data = to_dict() if callable(to_dict) else dict(vars(cfg)) if cfg is not None else {}
            except Exception:
                cfg_data = {}
            cfg_text = json.dumps(cfg_data, sort_keys=True, default=str)
            weights = parameters_fingerprint(sorted(sae.state_dict().items()))
            d = identity.value_digest((type(sae).__qualname__, cfg_text, weights))
            arch = cfg_data.get("architecture", type(sae).__name__)
            base = (f"SAE {arch} d_sae={cfg_data.get('d_sae', '?')}#{d[:4]}", d)
            _SAE_BASE[sae] = base
        error_term = bool(getattr(wrapper, "use_error_term", False))
        label = base[0] + (" (error term)" if error_term else "")
        out.append(Intervention("sae", point, label, base[1] + (":e" if error_term else ""), None, not error_term))
    return tuple(out)


def _faults(step_hooks) -> Tuple[Intervention, ...]:
    if step_hooks is None:
        return NONE
    objects = getattr(step_hooks, "hooks", [step_hooks])
    return tuple(
        Intervention("fault", "cache", getattr(h, "name", "") or type(h).__name__,
                     "fault:" + (getattr(h, "name", "") or type(h).__qualname__))
        for h in objects
    )


def current(model, fwd_hooks: Sequence = (), step_hooks=None) -> Tuple[Intervention, ...]:
    """The interventions a forward of ``model`` runs under: faults, SAEs, model hooks, then call hooks.

    ``fwd_hooks``: the call's own (not yet registered); hooks of enclosing
    interpkv calls are read from the context (:func:`interpkv.core.calls.active_hooks`).
    Hooks marked ``_interpkv_observer`` (interpkv's own recording hooks) are left out.
    """
    out = _faults(step_hooks) + _saes(model) + _model_hooks(model)
    entries = calls.active_hooks()
    if fwd_hooks:
        entries = entries + tuple(fwd_hooks)
    if entries:
        hooks = []
        for name, hook in entries:
            if getattr(hook, "_interpkv_observer", False):
                continue
            for point in _points(model, name):
                hooks.append(_hook_intervention("hook", point, hook))
        out = out + tuple(hooks)
    return out


# ------------------------------------------------------------- the spans
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
            spans[-1] = (a, end, last)
            return
    spans.append((first_id, end, acting))


def crop(cache, kept_ids: Tensor) -> None:
    """Keep only the spans' parts whose slot ids are in ``kept_ids`` (after ``crop``)."""
    if not cache._provenance:
        return
    present = sorted(set(kept_ids.flatten().tolist()) - {-1})
    cache._provenance = _restrict(cache._provenance, present)


def _restrict(spans: List[RawSpan], present: List[int]) -> List[RawSpan]:
    out: List[RawSpan] = []
    for a, b, acting in spans:
        run_start = prev = None
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
    return out


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
    out = collections.Counter()
    pos = in_span = None
    for i in interventions:
        if not i.acts or not _affects_cache(n_layers, i.point):
            continue
        selected = None
        if masks:
            if pos is None:
                pos, in_span = _span_positions(cache, a, b)
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


def _set_text(interventions) -> str:
    return "; ".join(i.text() for i in interventions) if interventions else "none"


def mismatches(cache, acting: Tuple[Intervention, ...], kinds=None, now_text: str = "this call has") -> List[str]:
    """One line per stored span whose acting interventions differ from ``acting``'s (memoized)."""
    memo = cache.__dict__.setdefault("_provenance_memo", {})
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
                    f"{where} written under {_set_text(_listed(w, then))}; "
                    f"{now_text} {_set_text(_listed(c, now))}"
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


def _edited(model, edited, step_hooks) -> Tuple[Intervention, ...]:
    """What a forward ran under: faults, SAEs, then the model's and the calls' hooks that edited."""
    out = _faults(step_hooks) + _saes(model)
    hook_edits, point_edits = edited
    if point_edits:
        out = out + _model_hooks(model, set(point_edits))
    if hook_edits:
        seen = set()
        hooks = []
        for point, hook in hook_edits:
            if (point, id(hook)) not in seen and not getattr(hook, "_interpkv_observer", False):
                seen.add((point, id(hook)))
                hooks.append(_hook_intervention("hook", point, hook))
        out = out + tuple(hooks)
    return out


def check(model, cache, edited, step_hooks=None, *, what: str = "this call") -> Tuple[Intervention, ...]:
    """Warn (:class:`ProvenanceWarning`) if ``cache``'s spans were written under other interventions.

    Called by a forward through ``cache`` after running and before its
    commit, with what edited activations in it (:func:`interpkv.core.calls.edits`).
    Returns the call's interventions, for :func:`written`.
    """
    acting = _edited(model, edited, step_hooks)
    spans = cache._provenance
    if spans and not all(wrote is acting or wrote == acting for _, _, wrote in spans):
        lines = mismatches(cache, acting)
        if lines:
            _warn(f"{what} continues a cache under other interventions than wrote it: "
                  + " | ".join(lines) + ". " + _ADVICE)
    return acting


def explain(model, cache, fwd_hooks: Sequence = ()) -> Optional[str]:
    """The mismatch text of a run of ``fwd_hooks`` continuing ``cache`` (None if none), for ``.cause``."""
    from interpkv.core import stephooks

    acting = current(model, fwd_hooks, stephooks.installed(model))
    lines = mismatches(cache, acting)
    if not lines:
        return None
    return "the cache's " + " | ".join(lines) + " (see cache.provenance)"


def _warn(message: str) -> None:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(package)
        or f"{os.sep}torch{os.sep}" in frame.f_code.co_filename
        or frame.f_code.co_filename.endswith("contextlib.py")
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(ProvenanceWarning(message), stacklevel=level)


# ------------------------------------------------------------ the public view
@dataclasses.dataclass(frozen=True)
class Span:
    """Stored slots written under one set of interventions.

    Attributes:
        slots: ``(first, end)`` slot indices (``cache.seq_len`` axis) the span covers.
        positions: ``(lowest, highest)`` absolute position stored in it, or None.
        interventions: what was active; None when unknown (a cache built with
            ``from_state``, or loaded from a file saved without provenance).
    """

    slots: Tuple[int, int]
    positions: Optional[Tuple[int, int]]
    interventions: Optional[Tuple[Intervention, ...]]


class Provenance:
    """What wrote each span of a cache's stored slots (``cache.provenance``).

    ``spans``: :class:`Span` s in slot order. ``weights``: the fingerprint of
    the weights (computed when first read; a loaded cache's is its file's,
    which :meth:`KVCache.load` checked). ``to_frame()``: a row per span and
    intervention.
    """

    def __init__(self, spans: List[Span], weights=None, model=None):
        self.spans = spans
        self._weights = weights
        self._model = weakref.ref(model) if model is not None else None

    @property
    def weights(self) -> Optional[str]:
        if self._weights is None and self._model is not None and self._model() is not None:
            from interpkv.cache.fingerprint import weights_fingerprint

            self._weights = weights_fingerprint(self._model())
        return self._weights

    @property
    def interventions(self) -> Tuple[Intervention, ...]:
        """Every distinct intervention that wrote any span, in first-seen order."""
        seen: Dict[Intervention, None] = {}
        for span in self.spans:
            for i in span.interventions or ():
                seen.setdefault(i, None)
        return tuple(seen)

    def _span_text(self, span: Span) -> str:
        where = "no position" if span.positions is None else (
            f"position {span.positions[0]}" if span.positions[0] == span.positions[1]
            else f"positions {span.positions[0]}-{span.positions[1]}")
        what = "unknown" if span.interventions is None else _set_text(span.interventions)
        return f"{where}: {what}"

    def __repr__(self) -> str:
        if not self.spans:
            return "Provenance(empty)"
        shown = "; ".join(self._span_text(s) for s in self.spans[:4])
        more = f"; +{len(self.spans) - 4} spans" if len(self.spans) > 4 else ""
        return f"Provenance({shown}{more})"

    def to_frame(self):
        """A pandas DataFrame: a row per span and intervention (one row with none for a clean span)."""
        import pandas

        rows = []
        for n, span in enumerate(self.spans):
            base = {"span": n, "first_slot": span.slots[0], "end_slot": span.slots[1],
                    "first_position": None if span.positions is None else span.positions[0],
                    "last_position": None if span.positions is None else span.positions[1]}
            items = span.interventions
            if not items:
                rows.append({**base, "kind": "unknown" if items is None else "none", "point": None,
                             "intervention": None, "digest": None, "declared_positions": None, "acts": None})
            for i in items or ():
                rows.append({**base, "kind": i.kind, "point": i.point, "intervention": i.label,
                             "digest": i.digest, "declared_positions": i.where.text() if i.where else None,
                             "acts": i.acts})
        frame = pandas.DataFrame(rows, columns=["span", "first_slot", "end_slot", "first_position",
                                                "last_position", "kind", "point", "intervention", "digest",
                                                "declared_positions", "acts"])
        frame.attrs["weights"] = self._weights
        return frame

    def _repr_html_(self) -> str:
        from interpkv._repr import html_summary

        rows = [(f"{s.slots[0]}-{s.slots[1] - 1}" if s.slots[1] > s.slots[0] else "-",
                 "-" if s.positions is None else f"{s.positions[0]}-{s.positions[1]}",
                 "unknown" if s.interventions is None else _set_text(s.interventions)) for s in self.spans]
        return html_summary("Provenance", [("spans", len(self.spans)), ("weights", self._weights or "(not computed)")],
                            (["slots", "positions", "interventions"], rows))

    def to_json(self) -> str:
        return json.dumps({"version": 1, "spans": [
            {"slots": list(s.slots), "positions": None if s.positions is None else list(s.positions),
             "interventions": None if s.interventions is None else [i.to_json() for i in s.interventions]}
            for s in self.spans]}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, weights: Optional[str] = None) -> "Provenance":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("spans"), list):
            raise ValueError("not an interpkv provenance record (version 1)")
        spans = []
        for s in data["spans"]:
            items = s.get("interventions")
            spans.append(Span(tuple(int(x) for x in s["slots"]),
                              None if s.get("positions") is None else tuple(int(x) for x in s["positions"]),
                              None if items is None else tuple(Intervention.from_json(i) for i in items)))
        return cls(spans, weights)


def describe(cache) -> Provenance:
    """The :class:`Provenance` of ``cache``, spans by slot index (reads its slot ids and positions)."""
    length = cache.seq_len
    ids = cache.slot_ids.cpu()
    pos = cache.positions.cpu()
    spans_raw = cache._provenance
    # For each slot column, which recorded spans its rows belong to (rows agree unless a window compacted them).
    owner = torch.full((length,), -1, dtype=torch.long)
    mixed: Dict[int, set] = {}
    for n, (a, b, _) in enumerate(spans_raw):
        hit = ((ids >= a) & (ids < b)).any(dim=0)
        for col in hit.nonzero().flatten().tolist():
            if owner[col] >= 0 and owner[col] != n:
                mixed.setdefault(col, {int(owner[col])}).add(n)
            owner[col] = n
    spans: List[Span] = []
    col = 0
    while col < length:
        key = ("mixed", tuple(sorted(mixed[col]))) if col in mixed else int(owner[col])
        end = col + 1
        while end < length and (("mixed", tuple(sorted(mixed[end]))) if end in mixed else int(owner[end])) == key:
            end += 1
        if isinstance(key, tuple):
            seen: Dict[Intervention, None] = {}
            for n in key[1]:
                for i in spans_raw[n][2]:
                    seen.setdefault(i, None)
            items: Optional[Tuple[Intervention, ...]] = tuple(seen)
        else:
            items = None if key < 0 else spans_raw[key][2]
        real = pos[:, col:end][pos[:, col:end] >= 0]
        positions = None if real.numel() == 0 else (int(real.min()), int(real.max()))
        spans.append(Span((col, end), positions, items))
        col = end
    weights = cache.__dict__.get("_provenance_weights")
    return Provenance(spans, weights, cache.model)


def adopt(cache, provenance: Provenance) -> None:
    """Give a cache built from stored slots (``load``) the spans of ``provenance`` (slot ids = slot indices)."""
    cache._provenance = [(s.slots[0], s.slots[1], s.interventions) for s in provenance.spans
                         if s.interventions is not None]
    cache._provenance_weights = provenance._weights


# ------------------------------------------------------------------ files
HEADER_KEY = "provenance"


def check_loaded(model, cache, path: str) -> None:
    """After a load: warn if the file's SAEs, faults or model hooks differ from ``model``'s now."""
    acting = current(model, (), None)
    if not cache._provenance:
        return
    lines = mismatches(cache, acting, kinds=("sae", "model hook", "fault"), now_text="the model has")
    if lines:
        _warn(f"{path}: the loaded cache was written under other model interventions (SAEs, faults, hooks "
              "on the model) than the model has now: " + " | ".join(lines) + ". " + _ADVICE)


def read(path: Union[str, "os.PathLike[str]"]) -> Optional[Provenance]:
    """The provenance saved in a cache file, read from its header only (no tensor is read).

    Returns:
        A :class:`Provenance` (``weights``: the file's weights fingerprint), or
        None for a file saved without one (before interpkv 0.2 provenance).

    Raises:
        CacheFileError: not a cache file, or a corrupted header.
    """
    import struct

    from interpkv.cache.st_format import MAX_HEADER_BYTES, CacheFileError, open_regular, parse_header
    from interpkv.cache.st_read import read_exactly

    path = os.fspath(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = read_exactly(f, 8)
        if len(prefix) == 8:
            prefix += read_exactly(f, min(struct.unpack("<Q", prefix)[0], MAX_HEADER_BYTES))
        header = parse_header(prefix, size, path)
    raw = header.get("__metadata__") or {}
    if HEADER_KEY not in raw:
        return None
    try:
        return Provenance.from_json(raw[HEADER_KEY], raw.get("weights_fingerprint"))
    except (ValueError, KeyError, TypeError) as error:
        raise CacheFileError(f"{path}: corrupted provenance in the header ({error})") from None
