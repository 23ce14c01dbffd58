"""Every public error class of interpkv, in one place.

Each is a subclass of the built-in error a caller would otherwise catch
(``ValueError`` or ``NotImplementedError``), so ``except ValueError`` keeps
working; the message always names what was wrong and how to fix it.
"""

import warnings

__all__ = ["CacheMismatchError", "CacheFileError", "UnsupportedModelError", "CacheGraphWarning"]


class CacheMismatchError(ValueError):
    """A cache was used with a model, batch, dtype or device it was not made for."""


class CacheFileError(ValueError):
    """A file is not a valid interpkv cache for the model it is loaded with."""


class UnsupportedModelError(NotImplementedError):
    """The model uses an attention feature interpkv does not implement."""


class CacheGraphWarning(UserWarning):
    """A cache holds an autograd graph across forward calls (memory grows every step)."""


def warn_graph_kept(nbytes: int) -> None:
    """Warn once per cache that its stored keys carry an autograd graph across calls."""
    warnings.warn(
        "this KVCache holds an autograd graph across forward calls: every step keeps the "
        f"activations of all earlier steps alive ({nbytes / 1e6:.1f} MB of keys/values so far, and "
        "their graph), so memory grows with every token. Wrap decode loops in `with torch.no_grad():` "
        "(interpkv.generate already does). If you want gradients through the cached history, "
        "make the cache with KVCache.for_model(model, keep_graph=True) to silence this warning.",
        CacheGraphWarning,
        stacklevel=4,
    )
