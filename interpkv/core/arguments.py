"""Checks of public arguments: each error names the argument, the value and the fix.

Used at the top of entry points, before anything is allocated or run, so a
malformed argument never reaches torch (an opaque ``TypeError`` from
``torch.zeros``) or silently means something else (``steps="6"`` iterating
characters, ``int(1.5)`` truncating a position, ``atol=nan`` passing everything).

>>> count("max_new_tokens", 3)
3
>>> count("max_new_tokens", 1.5)
Traceback (most recent call last):
...
TypeError: max_new_tokens must be an int, got float 1.5
>>> tolerance("atol", float("nan"))
Traceback (most recent call last):
...
ValueError: atol must be a finite number >= 0.0, got nan
"""

import math
import numbers
import os
from typing import Any, List, Optional, Sequence

import torch

from interpkv.core import tl as _tl

__all__ = [
    "count", "tolerance", "real", "token_ids", "int_list", "check_memory", "check_cache_memory", "physical_memory",
]


def count(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an int ``>= minimum`` (bools and floats refused: ``True`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def real(
    name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    bounds = f"in {'(' if low_open else '['}{low}, {high}]" if high is not None else f">= {low}"
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number {bounds}, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be a finite number {bounds}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be a finite number {bounds}, got {value}")
    return value


def tolerance(name: str, value: Any) -> float:
    """A tolerance: a finite number ``>= 0`` (NaN would make every comparison pass)."""
    return real(name, value, low=0.0)


def int_list(name: str, values: Any) -> List[int]:
    """``values`` (a sequence or 1-D integer tensor) as a list of ints; a string or scalar is refused."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.dtype == torch.bool or values.ndim != 1:
            raise TypeError(f"{name} must be a 1-D integer tensor or a list of ints, got {values.dtype} {tuple(values.shape)}")
        return values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a list of ints, got {type(values).__name__} {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must hold ints, got {type(v).__name__} {v!r} in {list(values)!r}"[:300])
        out.append(int(v))
    return out


def token_ids(name: str, values: Any, d_vocab: int) -> List[int]:
    """A list of token ids in ``[0, d_vocab)``."""
    ids = int_list(name, values)
    bad = [t for t in ids if not 0 <= t < d_vocab]
    if bad:
        raise ValueError(f"{name} {bad[:8]} are not token ids of this model (ids lie in [0, d_vocab={d_vocab}))")
    return ids


def physical_memory() -> Optional[int]:
    """Bytes of RAM on this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_cache_memory(name: str, value: Any, model, batch: int, positions: int, what: str) -> None:
    """:func:`check_memory` for a KV cache of ``batch`` rows x ``positions`` slots of ``model``."""
    cfg = model.cfg
    per_slot = 2 * cfg.n_layers * _tl.kv_head_count(cfg) * cfg.d_head * cfg.dtype.itemsize + 16  # + positions, ids
    check_memory(name, value, batch * positions * per_slot, what)


def check_memory(name: str, value: Any, nbytes: int, what: str) -> None:
    """Refuse, before allocating, ``nbytes`` that exceed this machine's RAM (a typo'd size, not a plan)."""
    ram = physical_memory()
    if ram is not None and nbytes > ram:
        raise ValueError(
            f"{name}={value!r} needs {nbytes / 2**30:.3g} GiB for {what}, more than this machine's "
            f"{ram / 2**30:.3g} GiB of RAM; pass a smaller {name}"
        )
