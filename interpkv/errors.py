"""Every public error class of interpkv, in one place.

Each is a subclass of the built-in error a caller would otherwise catch
(``ValueError`` or ``NotImplementedError``), so ``except ValueError`` keeps
working; the message always names what was wrong and how to fix it.
"""

__all__ = ["CacheMismatchError", "CacheFileError", "UnsupportedModelError"]


class CacheMismatchError(ValueError):
    """A cache was used with a model, batch, dtype or device it was not made for."""


class CacheFileError(ValueError):
    """A file is not a valid interpkv cache for the model it is loaded with."""


class UnsupportedModelError(NotImplementedError):
    """The model uses an attention feature interpkv does not implement."""
