"""A model's weights fingerprint: which weights a saved cache was computed with.

A cache file records the fingerprint of the model that filled it, and
:meth:`interpkv.KVCache.load` refuses a model whose fingerprint differs (its
keys would mean nothing to it). Two properties matter:

- **Reproducible.** Only parameters the forward pass reads are hashed.
  TransformerLens allocates ``pos_embed.W_pos`` for ALiBi models (Bloom) and
  never reads it; ``from_pretrained`` leaves it uninitialised, so hashing it made
  every fresh process disagree with the file. Which positional parameters are
  read is asked of the positional scheme (:func:`interpkv.core.schemes.scheme_for`);
  every other parameter TransformerLens creates is read (checked by perturbing
  each parameter of every zoo model).
- **Proportionate.** Hashing every byte costs ~1 s/GB (13 s per save or load of
  a 7B bf16 model) for a check that guards against a mix-up, not an attacker.
  Each parameter contributes its name, dtype and shape and a fixed *sample* of
  its elements (see :func:`sample_elements`), so the cost is a few ms per
  parameter whatever its size.

What is guaranteed: any change to the set of parameter names, any dtype or
shape, any element of a parameter of at most :data:`FULL_HASH_ELEMENTS`
elements, the first and last element of every parameter, and at least one
element of every row and every column of each larger parameter viewed as
``[numel / shape[-1], shape[-1]]`` (a token's embedding row, a neuron's
weights in ``W_in`` / ``W_out``, each head's block of ``W_Q``). Dense edits
(fine-tuning, merged LoRA, rank-one edits such as ROME, re-initialisation,
dtype round trips) change sampled elements with near certainty. What can be
missed: an edit confined to unsampled elements of a large parameter, e.g. one
element, or a few elements of one row. Computed afresh by every save and load
(never memoized: an edit through ``.data`` bumps no version counter); a few ms
for a small model, computed while the file is written or read.
"""

import hashlib
import math
from typing import Iterable, Tuple

import numpy
import torch

from interpkv.core import tl as _tl
from interpkv.core.schemes import scheme_for

__all__ = ["weights_fingerprint", "parameters_fingerprint", "sample_elements", "sample_parts", "legacy_sha256",
           "FULL_HASH_ELEMENTS"]

#: Parameters with at most this many elements are hashed in full.
FULL_HASH_ELEMENTS = 65536

# Nothing is memoized: an edit through ``.data`` (``W.data[0] = 0``) bumps neither
# ``_version`` nor ``data_ptr``, so a memo would hand a stale fingerprint to save/load.


def used_parameters(model: "_tl.HookedTransformer"):
    """``(name, parameter)`` of the parameters ``model``'s forward reads, sorted by name."""
    skip_pos = not scheme_for(model).reads_pos_embed
    params = [
        (name, p) for name, p in model.named_parameters()
        if not (skip_pos and name.startswith("pos_embed."))
    ]
    return sorted(params, key=lambda item: item[0])


def sample_elements(param: torch.Tensor) -> torch.Tensor:
    """The elements of ``param`` that its fingerprint covers, as a 1-D tensor.

    Every element when ``numel <= FULL_HASH_ELEMENTS``. Otherwise every
    ``step``-th element of the flattened tensor plus the last one, where
    ``step`` is coprime with the last dimension ``C`` and at most ``C``, with at
    least ``C`` samples: so every row and every column of the ``[numel / C, C]``
    view holds a sampled element. About ``max(FULL_HASH_ELEMENTS, 2 rows,
    2 columns)`` elements are sampled (65,282 of a 4096 x 4096 matrix); when
    no such ``step`` exists the whole tensor is hashed.
    """
    parts = sample_parts(param)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def sample_parts(param: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """:func:`sample_elements` as the pieces it concatenates (hashed one after the other).

    ``torch.cat`` of a strided view took ~12 ms on a busy 2-core machine
    (its parallel path waits for OpenMP threads): 14 such calls were most of
    a save of 64 MB.
    """
    flat = param.detach().reshape(-1)
    n = flat.numel()
    cols = int(param.shape[-1]) if param.ndim else 1
    rows = n // max(cols, 1)
    target = max(FULL_HASH_ELEMENTS, 2 * rows, 2 * cols)
    if n <= target:
        return (flat,)
    step = -(-n // target)
    while math.gcd(step, cols) != 1:
        step += 1
    if step > cols or -(-n // step) < cols:  # coverage not guaranteed: hash everything
        return (flat,)
    return flat[::step], flat[-1:]


def _bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of ``t`` on the CPU, without a copy when already there."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return memoryview(data.numpy())


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _part_bytes(part: torch.Tensor) -> memoryview:
    """:func:`_bytes` of a (strided) sample, gathered by numpy when on the CPU.

    Torch's strided copy runs on OpenMP threads, and on a busy machine each
    such copy waited ~3 ms for them (0.2 s of a 64-parameter fingerprint);
    numpy gathers 65,536 elements in ~0.05 ms. Viewing as a same-size integer
    type keeps the bytes and works for bfloat16, which numpy lacks.
    """
    if part.device.type != "cpu" or part.is_contiguous() or part.element_size() not in _SAME_SIZE_INT:
        return _bytes(part)
    as_int = part.detach().view(_SAME_SIZE_INT[part.element_size()])
    return memoryview(numpy.ascontiguousarray(as_int.numpy())).cast("B")


def parameters_fingerprint(named_parameters: Iterable[Tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over each parameter's name, dtype, shape and :func:`sample_elements`.

    Args:
        named_parameters: ``(name, tensor)`` pairs, hashed in the order given.

    Returns:
        A hex digest prefixed with the scheme, ``"sampled-sha256:..."``.
    """
    digest = hashlib.sha256()
    for name, p in named_parameters:
        digest.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
        for part in sample_parts(p):  # the bytes of sample_elements(p), without concatenating
            digest.update(_part_bytes(part))
    return "sampled-sha256:" + digest.hexdigest()


def weights_fingerprint(model: "_tl.HookedTransformer") -> str:
    """Fingerprint of the weights ``model`` computes with (see the module docstring).

    Args:
        model: a TransformerLens ``HookedTransformer``.

    Returns:
        ``"sampled-sha256:<hex>"``; equal for two models whose used parameters
        are equal, whatever TransformerLens left in the unused ones.

    >>> weights_fingerprint(interpkv.zoo.load("bloom"))[:15]
    'sampled-sha256:'
    """
    return parameters_fingerprint(used_parameters(model))


def legacy_sha256(model: "_tl.HookedTransformer") -> str:
    """The full SHA-256 of every parameter (used or not) that format-1 files record."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
        digest.update(_bytes(p))
    return digest.hexdigest()
