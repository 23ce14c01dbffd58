"""Every public error class of interpkv, in one place.

Each is a subclass of the built-in error a caller would otherwise catch
(``ValueError``, ``OSError``, ``NotImplementedError`` or ``ImportError``), so ``except
ValueError`` / ``except OSError`` keep working; the message always names what
was wrong and how to fix it.
"""

import errno as _errno
import os
import warnings

__all__ = ["CacheMismatchError", "CacheFileError", "CacheReadError", "CacheFileNotFoundError",
           "CacheSaveError", "UnsupportedModelError", "CacheGraphWarning", "ProvenanceWarning",
           "TransformerLensVersionError"]


class CacheMismatchError(ValueError):
    """A cache was used with a model, batch, dtype or device it was not made for."""


class CacheFileError(ValueError):
    """A file is not a valid interpkv cache for the model it is loaded with."""


class CacheReadError(CacheFileError, OSError):
    """A cache file could not be read at all (permission, I/O error); also an ``OSError``.

    ``.path`` / ``.filename`` name the file, ``.errno`` / ``.strerror`` the cause.
    """

    def __init__(self, path: str, code: int):
        OSError.__init__(self, code, os.strerror(code), path)
        self.path = path

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, f"errno {self.errno}")
        return f"{self.path}: could not read the cache file: {self.strerror.lower()} ({name})"

    def __reduce__(self):
        return type(self), (self.path, self.errno)


class CacheFileNotFoundError(CacheReadError, FileNotFoundError):
    """Nothing is at the path given to ``KVCache.load`` (also a ``FileNotFoundError``)."""


#: What to do about each cause of a failed save (by errno).
_SAVE_FIXES = {
    _errno.ELOOP: "the path is a symbolic link, and a save never writes through one (another user's link "
    "in a shared directory would redirect it); save to os.path.realpath(path) if that file is yours",
    _errno.ENOSPC: "free space on that file system or save elsewhere",
    _errno.EDQUOT: "the disk quota is used up: free space or save elsewhere",
    _errno.EFBIG: "the file passes the file size limit (ulimit -f, RLIMIT_FSIZE) or the file "
                  "system's largest file: raise the limit or save elsewhere",
    _errno.EROFS: "the file system is mounted read-only: save to a writable directory",
    _errno.EACCES: "you may not write there: fix the permissions or save elsewhere",
    _errno.EPERM: "you may not write there: fix the permissions or save elsewhere",
    _errno.ENOENT: "the directory does not exist: create it first, e.g. os.makedirs(directory)",
    _errno.ENOTDIR: "a component of the path is not a directory: check the path",
    _errno.EISDIR: "the path is a directory: give a file name inside it",
    _errno.EIO: "the device reported an I/O error: check the disk",
}


class CacheSaveError(OSError):
    """``KVCache.save`` could not write the file; an ``OSError`` with the cause's ``errno``.

    A failed save never leaves a partial file: the file previously at the path
    (if any) is unchanged and the temporary file is removed.

    Attributes:
        path: the file that was to be written.
        errno: the cause (e.g. ``errno.ENOSPC``); ``strerror`` is its text.
        previous: ``True`` if a file was at ``path`` (it is unchanged).
        leftover: the temporary file that could not be removed, or ``None``.
    """

    def __init__(self, path: str, code: int, previous: bool = False, leftover=None):
        super().__init__(code, os.strerror(code), path)
        self.path, self.previous, self.leftover = path, previous, leftover

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, f"errno {self.errno}")
        fix = _SAVE_FIXES.get(self.errno, "check the path and the disk")
        kept = "the previous file is unchanged" if self.previous else "no file was created"
        left = (f"; the temporary file {self.leftover} could not be removed" if self.leftover
                else ", no temporary file is left")
        return f"could not save cache to {self.path}: {self.strerror.lower()} ({name}); {fix}; {kept}{left}"

    def __reduce__(self):
        return type(self), (self.path, self.errno, self.previous, self.leftover)


class UnsupportedModelError(NotImplementedError):
    """The model uses an attention feature interpkv does not implement."""


class TransformerLensVersionError(ImportError):
    """A feature needs a TransformerLens version other than the one installed (also an ``ImportError``).

    ``HookedTransformer`` features need transformer-lens 3.x; under
    transformer-lens 4 (or none) interpkv runs ``engine="hf"`` and
    ``engine="transformer_bridge"``. The message names the version needed,
    the one installed and the fix (see :mod:`interpkv.core.tl`).
    """


class CacheGraphWarning(UserWarning):
    """A cache holds an autograd graph across forward calls (memory grows every step)."""


class ProvenanceWarning(UserWarning):
    """A call continues a cache under other interventions than wrote its stored positions.

    The message names the spans (positions), the hook points and both
    intervention sets (:mod:`interpkv.cache.provenance`). It is raised before
    the cache changes, so ``warnings.simplefilter("error", ProvenanceWarning)``
    stops the call with the cache intact.
    """


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
