"""TransformerLens's ``names_filter=`` next to interpkv's ``names=``.

Every entry point that takes ``names=`` (:func:`interpkv.capture`,
:func:`interpkv.compare`, ``generate(capture=...)``) also takes
``names_filter=``. Both mean the same (:mod:`interpkv.diagnostics.selection`:
an exact hook name, a short name at every layer, else a part of hook names; a
list of those; a callable; None for every hook), and a selection that matches
no hook point of the model is an error. An exact name, ``run_with_cache``'s
meaning of a string, selects that hook alone.

Giving both is refused: one selection, said once.
"""

from typing import Callable, Sequence, Tuple, Union

from interpkv.diagnostics.selection import select_hooks

__all__ = ["resolve_names", "NamesFilter"]

# A Record key as Record[...] reads it: ("resid_post", -1), ("scale", 1, "ln2").
RecordKey = Tuple[Union[str, int], ...]
NamesFilter = Union[None, str, RecordKey, Sequence[Union[str, RecordKey]], Callable[[str], bool]]


def resolve_names(
    names: NamesFilter, names_filter: NamesFilter, *, names_kw: str = "names", model=None
) -> NamesFilter:
    """The one selection to use, as interpkv's ``names`` takes it.

    Args:
        names: interpkv's ``names=``.
        names_filter: TransformerLens's ``names_filter=``.
        names_kw: how the caller spells ``names`` (``"capture"`` for generate), for the error.
        model: when given, the selection is resolved on its hook points
            (:func:`~interpkv.diagnostics.selection.select_hooks`): the hook
            names it selects, or the callable, or None for every hook.

    Raises:
        ValueError: both were given, or (with ``model``) the selection matches no hook point.
        TypeError: ``names_filter`` is of another kind.

    >>> resolve_names(None, "blocks.0.hook_resid_pre")
    ['blocks.0.hook_resid_pre']
    >>> resolve_names("resid_pre", None)
    'resid_pre'
    """
    if model is not None:
        if names_filter is None:
            return select_hooks(model, names, kw=names_kw)
        if names is not None:
            resolve_names(names, names_filter, names_kw=names_kw)  # raises: one selection, said once
        return select_hooks(model, names_filter, kw="names_filter")
    if names_filter is None:
        return names
    if names is not None:
        raise ValueError(
            f"got both {names_kw}={names!r} and names_filter={names_filter!r}; they select the same "
            f"thing: pass one (names_filter= keeps TransformerLens's meaning, a string is an exact name)"
        )
    if isinstance(names_filter, str):
        return [names_filter]  # TransformerLens: ``lambda name: name == names_filter``
    if callable(names_filter):
        return names_filter
    if isinstance(names_filter, (list, tuple, set)) and all(isinstance(n, str) for n in names_filter):
        return list(names_filter)
    raise TypeError(
        "names_filter must be a hook name, a list of hook names or a callable name -> bool "
        f"(as in run_with_cache), got {type(names_filter).__name__}"
    )

