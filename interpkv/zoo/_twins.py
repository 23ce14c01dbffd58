"""Checks of zoo arguments, and the zoo's HF twins alone or in a TransformerBridge (no HookedTransformer).

:func:`load_hf`, :func:`load_bridge` and :func:`bridge_from_hf` need no
``HookedTransformer``, so they run under TransformerLens 4 (or, for
:func:`load_hf`, with no TransformerLens); see docs/transformerlens-versions.md.
They are re-exported by :mod:`interpkv.zoo`.
"""

from __future__ import annotations

from typing import Any

import torch

from interpkv.core import tl as _tl
from interpkv.zoo import _build, _trained, charvocab
from interpkv.zoo._specs import SPECS

__all__ = ["load_hf", "load_bridge", "bridge_from_hf"]


def _names() -> list[str]:
    return list(SPECS)


def _pairs() -> list[str]:
    return [n for n, s in SPECS.items() if s.hf_config_class is not None]


def _check_trained(name: str) -> None:
    have = _build.trained_names()
    if name not in have:
        raise ValueError(
            f"zoo model {name!r} has no trained weights; models with trained "
            f"weights: {', '.join(have) if have else 'none'}"
        )


def _check_name(name: str) -> None:
    if name not in SPECS:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(_names())}")


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def _check_pair(name: str, dtype: torch.dtype) -> None:
    _check_name(name)
    _check_dtype(dtype)
    if SPECS[name].hf_config_class is None:
        raise ValueError(
            f"zoo model {name!r} has no HuggingFace class (it exists only in "
            f"TransformerLens); models with an HF pair: {', '.join(_pairs())}"
        )


def load_hf(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    trained: bool = False,
) -> Any:
    """The HF twin of a zoo model alone: ``load_pair(name, ...)[1]`` without building the HookedTransformer.

    Needs no TransformerLens, so it works under transformer-lens 4 (or none),
    e.g. for ``interpkv.compare(hf, tokens, steps=..., engine="hf")``.

    Args:
        name: Zoo model name with an HF class (see :func:`pairs`).
        dtype: Parameter dtype.
        seed: Initialisation seed (ignored with ``trained=True``).
        trained: The shipped trained character-level weights instead of random ones.

    Returns:
        A fresh ``transformers`` causal LM (eager attention, eval mode), the
        same weights as ``load_pair(name, dtype=dtype, seed=seed, trained=trained)[1]``.

    Raises:
        ValueError: Unknown name, bad dtype, a model without an HF class, or
            ``trained=True`` for a model without trained weights.

    >>> from interpkv import zoo
    >>> type(zoo.load_hf("llama")).__name__
    'LlamaForCausalLM'
    """
    _check_pair(name, dtype)
    if trained:
        _check_trained(name)
        return _trained.hf_model(name, dtype)
    return _build.hf_model(name, int(seed), dtype)


def load_bridge(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    trained: bool = False,
) -> Any:
    """A TransformerLens ``TransformerBridge`` around the HF twin of a zoo model (offline).

    Built with :func:`bridge_from_hf`
    (``TransformerBridge.boot_transformers(..., hf_model=..., tokenizer=...)``
    with the zoo's character tokenizer, so nothing is fetched). Needs a
    TransformerLens with ``transformer_lens.model_bridge`` (4.x; 3.9 has one
    too). The bridge computes what :func:`load_hf` computes (raw HF weights).

    Args:
        name: Zoo model name with an HF class (see :func:`pairs`).
        dtype: Parameter dtype.
        seed: Initialisation seed (ignored with ``trained=True``).
        trained: The shipped trained character-level weights instead of random ones.

    Returns:
        A ``transformer_lens.model_bridge.TransformerBridge`` in eval mode on CPU.
    """
    return bridge_from_hf(load_hf(name, dtype=dtype, seed=seed, trained=trained), label=name, copy_model=False)


def bridge_from_hf(hf: Any, *, tokenizer: Any = None, label: str = "hf", copy_model: bool = True) -> Any:
    """A TransformerLens ``TransformerBridge`` around an in-memory HF causal LM, built offline.

    ``TransformerBridge.boot_transformers(label, hf_model=..., tokenizer=...)``:
    with a model and a tokenizer in hand the bridge fetches nothing. Needs a
    TransformerLens with ``transformer_lens.model_bridge`` (4.x; 3.9 has one too).

    Args:
        hf: a ``transformers`` causal LM of an architecture TransformerLens bridges.
        tokenizer: an HF tokenizer (default: the zoo's character tokenizer,
            :func:`interpkv.zoo.charvocab.hf_tokenizer`).
        label: the model name the bridge records.
        copy_model: bridge a deep copy (the bridge inserts its wrappers into
            the module tree of the model it gets); False bridges ``hf`` itself.

    Returns:
        A ``transformer_lens.model_bridge.TransformerBridge`` in eval mode.

    Raises:
        TransformerLensVersionError: the installed TransformerLens has no ``TransformerBridge``.
    """
    import copy

    model = copy.deepcopy(hf) if copy_model else hf
    return _tl.bridge_from_hf(model, charvocab.hf_tokenizer() if tokenizer is None else tokenizer, label)


