"""Hook selection: one meaning for ``names=``, ``names_filter=``, ``capture=`` and patching hooks.

A selection is resolved against the hook points of one model (a
HookedTransformer's ``hook_dict``; for a ``transformers`` model, the sites the
``"hf"`` engine records). Each string means, in this order:

1. an exact TransformerLens hook name (``"blocks.0.hook_resid_pre"``): that hook;
2. a short name as ``Record[...]`` and ``transformer_lens.utils.get_act_name``
   read it: ``"resid_post"`` = ``blocks.L.hook_resid_post`` at every layer,
   ``"pattern"`` / ``"attn"``, ``"q"``, ``"k6"`` (layer 6 only), ``"embed"``,
   ``"scale"`` (``ln_final.hook_scale``)...;
3. otherwise every hook whose name contains it (``"blocks.1"``, ``"hook_resid"``).

A ``(name, layer[, layer_type])`` tuple is a key as ``Record[name, layer]``
reads it (a negative layer counts from the last). A list is the union of its
entries (each resolved as above), a callable
``name -> bool`` is used as is, None is every hook. ``"logits"`` selects no
hook (the logits are always recorded). A selection that matches no hook point
of the model is a ``ValueError`` naming the closest hooks: never an empty
Record or an empty report that says "no divergence".

>>> import interpkv
>>> model = interpkv.zoo.load("gpt2")
>>> select_hooks(model, "resid_post")
['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
>>> select_hooks(model, ["embed", "k1"])
['hook_embed', 'blocks.1.attn.hook_k']
>>> select_hooks(model, ("resid_post", -1))
['blocks.1.hook_resid_post']
>>> select_hooks(model, "resid_pots")
Traceback (most recent call last):
...
ValueError: names='resid_pots' matches no hook point of this model (HookedTransformer); closest: ...
"""

import difflib
import warnings
from typing import Callable, List, Optional, Sequence, Union

from interpkv.core import tl as _tl
from interpkv.diagnostics import hfsites

__all__ = ["select_hooks", "hook_names", "Selection"]

Selection = Union[None, str, Sequence[str], Callable[[str], bool]]

LOGITS = "logits"  # not a hook point: always recorded, selects nothing


def hook_names(model) -> List[str]:
    """Every hook point a selection can name on ``model``, in forward order."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is not None:
        return list(hook_dict)
    return [name for name, _, _ in hfsites.sites(model)]


def select_hooks(model, selection: Selection, *, kw: str = "names") -> Union[None, List[str], Callable[[str], bool]]:
    """``selection`` resolved on ``model`` (see the module docstring).

    Args:
        model: a HookedTransformer (or a ``transformers`` model for the ``"hf"`` engine).
        selection: None, a string, a list of strings or a callable.
        kw: how the caller spells the argument, for errors (``"names"``,
            ``"names_filter"``, ``"capture"``).

    Returns:
        None (every hook), the selected hook names in forward order, or the
        callable itself (after checking it selects at least one hook).

    Raises:
        ValueError: a string (or a list entry) or a callable matches no hook point.
        TypeError: the selection is of another kind.
    """
    if selection is None:
        return None
    universe = hook_names(model)
    if callable(selection) and not isinstance(selection, str):
        if not any(_call(selection, name) for name in universe):
            raise ValueError(
                f"{kw}={_label(selection)} is True for no hook point of this model ({type(model).__name__}); "
                f"its hooks are e.g. {', '.join(universe[:4])}, ... (see model.hook_dict)"
            )
        return selection
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    if _is_key(selection):
        selection = [selection]
    if isinstance(selection, str):
        entries = [selection]
    elif isinstance(selection, (list, tuple, set, frozenset)):
        entries = [_key_name(e, n_layers) if _is_key(e) else e for e in selection]
        bad = [e for e in entries if not isinstance(e, str)]
        if bad:
            raise TypeError(
                f"{kw} must be hook names (strings), a list of them or a callable name -> bool; "
                f"got {bad[0]!r} ({type(bad[0]).__name__}) in the list"
            )
        if not entries:
            raise ValueError(
                f"{kw}=[] selects no hook point; pass {kw}=None for every hook, or {kw}=['logits'] "
                "for the logits alone"
            )
    else:
        raise TypeError(
            f"{kw} must be a hook name, a list of hook names or a callable name -> bool "
            f"(as run_with_cache's names_filter), got {type(selection).__name__}"
        )
    wanted = set()
    for entry in entries:
        matched = _match(entry, universe, n_layers)
        if matched is None:
            raise ValueError(
                f"{kw}={entry!r} matches no hook point of this model ({type(model).__name__}); "
                f"closest: {', '.join(_closest(entry, universe))}. A string is an exact hook name, a short "
                "name as Record[...] reads it ('resid_post' = every layer) or a part of hook names"
            )
        wanted.update(matched)
    return [name for name in universe if name in wanted]


def _match(entry: str, universe: List[str], n_layers: Optional[int]) -> Optional[List[str]]:
    """Hooks ``entry`` selects (``[]`` for ``"logits"``), or None when it matches nothing."""
    if entry == LOGITS:
        return []
    if not entry:
        return None
    present = set(universe)
    if entry in present:
        return [entry]
    short = {n for n in _short_forms(entry, n_layers) if n in present}
    if short:
        return sorted(short, key=universe.index)
    found = [name for name in universe if entry in name]
    return found or None


def _is_key(entry) -> bool:
    """A Record key tuple: ``(name, layer)`` or ``(name, layer, layer_type)``."""
    return (
        isinstance(entry, tuple) and len(entry) in (2, 3) and isinstance(entry[0], str)
        and isinstance(entry[1], int) and not isinstance(entry[1], bool)
    )


def _key_name(key: tuple, n_layers: Optional[int]) -> str:
    name, layer, *rest = key
    if layer < 0 and n_layers is not None:
        layer += n_layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _tl.get_act_name(name, layer, *rest)


def _short_forms(entry: str, n_layers: Optional[int]) -> List[str]:
    """Full names ``entry`` stands for as a short name: without a layer and at every layer."""
    forms = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for layer in [None, *range(n_layers or 0)]:
            try:
                forms.append(_tl.get_act_name(entry, layer))
            except Exception:  # get_act_name is a regex over free text: no form, not an error
                continue
    return forms


def _closest(entry: str, universe: List[str]) -> List[str]:
    families = sorted({name.split(".", 2)[-1] if name.startswith("blocks.") else name for name in universe})
    pool = list(dict.fromkeys(families + universe))
    close = difflib.get_close_matches(entry, pool, n=3, cutoff=0.0)
    return close or universe[:3]


def _call(predicate: Callable[[str], bool], name: str) -> bool:
    return bool(predicate(name))


def _label(selection) -> str:
    return getattr(selection, "__name__", type(selection).__name__)
