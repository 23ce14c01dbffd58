"""What interpkv says when the installed TransformerLens lacks what a feature needs.

TransformerLens 4 removed ``HookedTransformer``; interpkv may also be
installed with no TransformerLens at all (the plain ``pip install interpkv``,
see docs/transformerlens-versions.md). :mod:`interpkv.core.tl` (the seam, the
only module that imports TransformerLens) then binds each name it could not
import to a stand-in made here: no object is an instance of it, and using it
(calling it, reading an attribute) raises
:class:`~interpkv.errors.TransformerLensVersionError` with :func:`message`.
This module imports no TransformerLens.
"""

from importlib import metadata as _metadata
from typing import NoReturn, Optional

from interpkv.errors import TransformerLensVersionError

__all__ = ["NEEDED", "installed_version", "message", "fail", "stand_in", "full_names_only"]

NEEDED = "transformer-lens>=3,<4"
"""The TransformerLens that HookedTransformer features need (the ``interpkv[tl3]`` extra)."""


def installed_version() -> Optional[str]:
    """The installed transformer-lens version string, or None when it is not installed."""
    try:
        return _metadata.version("transformer-lens")
    except _metadata.PackageNotFoundError:
        return None


def message(feature: str, error: Optional[BaseException] = None) -> str:
    """Why ``feature`` cannot run here and what to do (``error``: why HookedTransformer did not import).

    >>> "transformer-lens>=3,<4" in message("interpkv.forward")
    True
    """
    version = installed_version()
    if version is None:
        found = "transformer-lens is not installed (plain `pip install interpkv` does not install it)"
    elif not version.startswith(("0.", "1.", "2.", "3.")):
        found = f"transformer-lens {version} is installed, which has no HookedTransformer (removed in 4.0)"
    else:
        found = f"transformer-lens {version} is installed but its HookedTransformer failed to import ({error})"
    return (
        f"{feature} needs a TransformerLens HookedTransformer, from {NEEDED}; {found}. "
        "Install it with `pip install 'interpkv[tl3]'` (in its own environment if you use TransformerLens 4). "
        "Without it interpkv runs engine='hf' (a transformers model) and engine='transformer_bridge' "
        "(a TransformerLens 4 TransformerBridge), and Record, diff, reports and plots work"
    )


def fail(feature: str, error: Optional[BaseException] = None) -> NoReturn:
    """Raise :class:`~interpkv.errors.TransformerLensVersionError` with :func:`message`."""
    raise TransformerLensVersionError(message(feature, error), name="transformer_lens")


class _StandInMeta(type):
    """Metaclass of the stand-ins: nothing is an instance, every use raises the version error."""

    _error: Optional[BaseException] = None

    def __instancecheck__(cls, obj) -> bool:
        return False

    def __subclasscheck__(cls, sub) -> bool:
        return sub is cls

    def __call__(cls, *args, **kwargs):
        fail(cls.__name__, cls._error)

    def __getattr__(cls, name: str):
        if name.startswith("__") and name.endswith("__"):  # typing / inspect probing: a plain miss
            raise AttributeError(name)
        fail(f"{cls.__name__}.{name}", cls._error)


def stand_in(name: str, error: Optional[BaseException], kind: str = "class"):
    """A stand-in for the TransformerLens class (``kind="class"``) or function ``name`` that did not import."""
    if kind == "class":
        return _StandInMeta(name, (), {"__module__": "transformer_lens", "__qualname__": name, "_error": error})

    def function(*args, **kwargs):
        fail(f"transformer_lens {name}", error)

    function.__name__ = function.__qualname__ = name
    return function


def full_names_only(name: str, layer=None, layer_type=None) -> str:
    """``get_act_name`` without TransformerLens: full hook names pass, short ones raise ``KeyError``.

    >>> full_names_only("blocks.0.hook_resid_pre")
    'blocks.0.hook_resid_pre'
    """
    if layer is None and layer_type is None and "hook_" in name:
        return name
    raise KeyError(
        f"{(name, layer) if layer is not None else name!r}: short hook names are resolved by TransformerLens's "
        "get_act_name, and transformer-lens is not installed; use the full hook name (e.g. 'blocks.0.hook_resid_pre')"
    )
