"""What a forward runs under: its hooks, the model's hooks, SAEs and faults, as :class:`Intervention` s.

Each hook's identity (:mod:`interpkv.cache.identity`) is computed once per
hook object (a weak memo); the model's hook points are scanned only when a
hook was registered anywhere since the last scan that found none
(``RemovableHandle.next_id``), so an unhooked decode step costs a few
attribute reads.
"""

import dataclasses
import json
import weakref
from typing import List, Optional, Sequence, Tuple

from torch.utils.hooks import RemovableHandle

from interpkv.cache import identity
from interpkv.cache.fingerprint import parameters_fingerprint
from interpkv.cache.provenance.records import NONE, Intervention, Where
from interpkv.core import calls

__all__ = ["current", "edited", "model_hook_points", "hook_intervention"]

_BASE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # hook object -> (label, digest, where, automatic)


def _base(hook) -> Tuple[str, str, Optional[Where], bool]:
    try:
        return _BASE[hook]
    except (KeyError, TypeError):
        pass
    declared = getattr(hook, "_interpkv_declared", None)
    if declared is not None:
        if declared.name is not None:
            label = _call_label(declared) if declared.shown or declared.keywords else declared.name
            base = (label, "name:" + declared.name, declared.where, True)
        else:
            try:
                d = identity.value_digest((declared.label, declared.values))
                auto = True
            except TypeError:
                d, auto = f"id:{id(hook):x}", False
            label = _call_label(declared) if declared.shown or declared.keywords else f"{declared.label}#{d[:4]}"
            base = (label, d, declared.where, auto)
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


def _call_label(declared) -> str:
    """``steering.add(v#3f2a, scale=2.0, start=5)``: the label of a declared hook, read as its call.

    Each shown value by its name and the first four hex digits of its content
    digest (a steering vector rebuilt equal reads the same; ``v#3f2a`` under
    ``add`` and ``replace`` is one vector); a named hook's values by name only.
    """
    parts = []
    for text, value in declared.shown:
        if declared.name is not None:
            parts.append(text)
            continue
        try:
            parts.append(f"{text}#{identity.value_digest(value)[:4]}")
        except TypeError:  # no content digest: it counts by identity (the hook's automatic=False says so)
            parts.append(f"{text} (object {id(value):x})")
    parts += [f"{key}={value!r}" for key, value in declared.keywords]
    if declared.where is not None and declared.where.text():
        parts.append(declared.where.text())
    if declared.name is not None:
        parts.append(f"name={declared.name!r}")
    return f"{declared.label}({', '.join(parts)})"


def hook_intervention(kind: str, point: str, hook) -> Intervention:
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
    return tuple(hook_intervention("model hook", name, fn) for name, fn in table
                 if points is None or name in points)


_SAE_BASE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _saes(model) -> Tuple[Intervention, ...]:
    wrappers = model.__dict__.get("_acts_to_saes")  # (getattr on a Module without it raises inside: ~9 us)
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
            try:
                weights = parameters_fingerprint(sorted(sae.state_dict().items()))
            except (NotImplementedError, RuntimeError):  # a meta-device SAE has no data: its identity
                weights = f"id:{id(sae):x}"
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
                hooks.append(hook_intervention("hook", point, hook))
        out = out + tuple(hooks)
    return out


def edited(model, edited, step_hooks) -> Tuple[Intervention, ...]:
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
                hooks.append(hook_intervention("hook", point, hook))
        out = out + tuple(hooks)
    return out
