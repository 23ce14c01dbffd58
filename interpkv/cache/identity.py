"""What makes two hooks "the same intervention": a content digest of a callable.

:mod:`interpkv.cache.provenance` records which hooks wrote each span of a
cache and compares them with the hooks of a later call. A hook object is
usually rebuilt between calls (a lambda in a list comprehension, a closure
made by a helper, ``functools.partial(steer, v)``), so object identity is not
enough; a digest over *what the hook computes* is used instead:

- a function: its code (bytecode, constants, names, nested code objects, not
  its file or line), its defaults, the values in its closure cells and the
  data globals it reads (tensors, numbers, strings; a global function by its
  own digest; modules and classes by name);
- ``functools.partial``: the function's digest and the bound arguments;
- a bound method: the function and the object it is bound to;
- an ``nn.Module`` (bound or called): its class and its ``state_dict``;
- another callable object: its class and its ``__dict__``;
- values: tensors by dtype, shape and content (sampled like the weights
  fingerprint for tensors over 65,536 elements:
  :func:`interpkv.cache.fingerprint.parameters_fingerprint`), numbers,
  strings and tuples by value. A list, dict or set a hook holds (in a closure
  cell, a global, an attribute) counts by its type only: that is where a
  recording hook stores what it sees (``acts.append(x)``), and its growing
  contents must not make it a new intervention. Keep steering values in
  tensors, numbers or tuples (or name the hook);
- a global the code reads that is an ``nn.Module`` (the model itself,
  typically) by its class and parameter names and shapes, not its weights.

A tensor on an accelerator is copied to the host for its digest once per
hook object (the digest is memoized per object); a tensor on the meta device
has no content and counts by identity.

Anything else (a C extension object with hidden state, a generator, a file)
makes the digest fall back to the object's identity: :func:`digest` then
returns ``automatic=False``, and two such hooks are the same only if they are
the same object, in this process. Label those hooks with
``interpkv.intervention(fn, name=...)``. The digest depends on the Python
version (bytecode), so a file saved under another Python compares equal hooks
as different (the warning then says so; name the hooks to avoid it).
"""

import collections
import functools
import hashlib
import types
from typing import Tuple

import numpy
import torch

from interpkv.cache.fingerprint import parameters_fingerprint

__all__ = ["digest", "value_digest"]

_MAX_DEPTH = 8


class _Opaque(Exception):
    """A value whose content cannot be digested: identity only."""


def _code(h, code: types.CodeType, depth: int, seen: set) -> None:
    h.update(b"code(")
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_freevars, code.co_cellvars, code.co_argcount,
                   code.co_kwonlyargcount, code.co_flags & 0x0C)).encode())  # *args / **kwargs
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code(h, const, depth + 1, seen)
        else:
            _value(h, const, depth + 1, seen)
    h.update(b")")


def _function(h, fn: types.FunctionType, depth: int, seen: set) -> None:
    h.update(b"fn(")
    _code(h, fn.__code__, depth, seen)
    _value(h, fn.__defaults__, depth + 1, seen)
    _value(h, fn.__kwdefaults__, depth + 1, seen)
    for cell in fn.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell (a name assigned later)
            h.update(b"empty-cell")
            continue
        _value(h, contents, depth + 1, seen)
    # Globals the code reads: data by content, functions by digest, the rest by name.
    names = set(fn.__code__.co_names)
    for const in fn.__code__.co_consts:
        if isinstance(const, types.CodeType):
            names.update(const.co_names)
    g = fn.__globals__
    for name in sorted(names):
        if name in g:
            value = g[name]
            h.update(f"global {name}=".encode())
            if isinstance(value, torch.nn.Module):  # e.g. the model itself: its layout, not its weights
                layout = [(k, tuple(v.shape)) for k, v in value.state_dict().items()]
                h.update(f"<module {type(value).__qualname__} {layout}>".encode())
            elif isinstance(value, (types.ModuleType, type)) or callable(value) and not isinstance(
                value, (types.FunctionType, functools.partial)
            ):
                h.update(f"<{type(value).__name__} {getattr(value, '__name__', '')}>".encode())
            else:
                _value(h, value, depth + 1, seen)
    h.update(b")")


def _value(h, value, depth: int, seen: set) -> None:
    if depth > _MAX_DEPTH:
        raise _Opaque("nested too deeply")
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
        return
    if isinstance(value, torch.dtype) or isinstance(value, torch.device):
        h.update(f"{value};".encode())
        return
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":  # no data to digest: identity only
            raise _Opaque("a meta tensor")
        h.update(parameters_fingerprint([("t", value.detach())]).encode())
        return
    if isinstance(value, numpy.ndarray):
        h.update(f"nd:{value.dtype}:{value.shape}:".encode())
        h.update(numpy.ascontiguousarray(value).tobytes())
        return
    if isinstance(value, (types.ModuleType, type)):
        h.update(f"<{type(value).__name__} {getattr(value, '__qualname__', value.__name__)}>".encode())
        return
    key = id(value)
    if key in seen:
        h.update(b"cycle;")
        return
    seen = seen | {key}
    if isinstance(value, (list, dict, set, bytearray, collections.deque)):
        # A mutable container a hook holds is nearly always where it stores what it
        # records (acts.append(x), cache[name] = x): by type, not by contents.
        h.update(f"<{type(value).__name__}>".encode())
        return
    if isinstance(value, (tuple, list, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, frozenset) else value
        h.update(f"{type(value).__name__}[".encode())
        for item in items:
            _value(h, item, depth + 1, seen)
        h.update(b"]")
    elif isinstance(value, types.FunctionType):
        _function(h, value, depth, seen)
    elif isinstance(value, functools.partial):
        h.update(b"partial(")
        _value(h, value.func, depth + 1, seen)
        _value(h, value.args, depth + 1, seen)
        _mapping(h, value.keywords, depth + 1, seen)
        h.update(b")")
    elif isinstance(value, types.MethodType):
        h.update(b"method(")
        _value(h, value.__func__, depth + 1, seen)
        _value(h, value.__self__, depth + 1, seen)
        h.update(b")")
    elif isinstance(value, torch.nn.Module):
        h.update(f"module {type(value).__module__}.{type(value).__qualname__}:".encode())
        h.update(parameters_fingerprint(sorted(value.state_dict().items())).encode())
        h.update(repr(sorted((k, v) for k, v in vars(value).items()
                             if isinstance(v, (bool, int, float, str)) and not k.startswith("_"))).encode())
    elif isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        owner = getattr(value, "__self__", None)
        if owner is not None and not isinstance(owner, types.ModuleType):
            raise _Opaque("a builtin method bound to an object")
        h.update(f"builtin {getattr(value, '__module__', '')}.{value.__qualname__};".encode())
    elif hasattr(value, "__dict__") and type(value).__module__ != "builtins":
        h.update(f"object {type(value).__module__}.{type(value).__qualname__}:".encode())
        _mapping(h, vars(value), depth + 1, seen)
    else:
        raise _Opaque(type(value).__name__)


def _mapping(h, mapping, depth: int, seen: set) -> None:
    """Keyword arguments or an object's attributes: by content (unlike a dict the hook holds)."""
    h.update(b"{")
    for k in sorted(mapping, key=repr):
        _value(h, k, depth, seen)
        _value(h, mapping[k], depth, seen)
    h.update(b"}")


def value_digest(value) -> str:
    """A short hex digest of ``value``'s content (see the module docstring); raises TypeError if it has none."""
    h = hashlib.sha256()
    try:
        _value(h, value, 0, set())
    except _Opaque as error:
        raise TypeError(f"no content digest for this value ({error})") from None
    return h.hexdigest()[:16]


def digest(fn) -> Tuple[str, bool]:
    """``(digest, automatic)`` of a hook: equal for hooks that compute the same thing.

    ``automatic`` is False when some part of ``fn`` has no content digest: the
    digest is then the object's identity in this process (``"id:..."``).
    """
    try:
        return value_digest(fn), True
    except (TypeError, RecursionError):
        return f"id:{id(fn):x}", False
