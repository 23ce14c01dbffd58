"""Steering hooks that mean the same with the cache and without it.

A hook written against the uncached shape, ``act[:, -1] += v`` or
``act[:, 1:] += v``, changes meaning in a cached decode step, where ``act``
holds only the new tokens. Each hook made here is a function of *absolute*
position (:func:`interpkv.hook_positions`), so ``interpkv.generate`` through a
cache gives the same tokens as an uncached loop that reruns the whole
sequence with the same hook, and the same as TransformerLens's
``run_with_hooks`` on the final sequence.

Which positions (all optional, combined with "and"; none = every position):

- ``start`` / ``stop``: absolute positions ``start <= p < stop`` (an int, or a
  ``[batch]`` tensor for one bound per row). "Every position but the first k"
  is ``start=k``; "positions >= p" is ``start=p``.
- ``positions``: only these absolute positions (a list of ints).
- ``region="prompt"`` / ``"generated"``: inside :func:`interpkv.generate` (or
  ``compare_generation``), the prompt's positions / the generated tokens'
  positions of each row; outside one it is an error (use ``start``/``stop``
  with the prompt length).

Padding (position -1) is never steered. The "last position" of a sequence has
no cached equivalent: the last position *so far* moves every step. Steer a
fixed position (``positions=[p]``) or the generated tokens instead.

>>> import interpkv, torch
>>> model = interpkv.zoo.load("gpt2")
>>> v = torch.ones(model.cfg.d_model)
>>> hook = interpkv.steering.add(v, start=1)  # every position but the first
>>> g = interpkv.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2,
...                       fwd_hooks=[("blocks.0.hook_resid_post", hook)])
>>> g.tokens.shape
torch.Size([1, 5])
"""

from typing import Callable, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interpkv.cache.provenance import declare
from interpkv.core import calls
from interpkv.core.axes import is_attention_hook
from interpkv.core.hookpos import hook_positions

__all__ = ["add", "replace", "positions_mask", "intervention"]

Bound = Optional[Union[int, Tensor]]


def _bound(value: Bound, positions: Tensor) -> Optional[Tensor]:
    if value is None:
        return None
    if isinstance(value, int):
        return torch.tensor(value, device=positions.device)
    value = torch.as_tensor(value, device=positions.device)
    if value.ndim == 1:
        if value.shape[0] != positions.shape[0]:
            raise ValueError(
                f"a per-row bound has {value.shape[0]} entries but the batch has {positions.shape[0]} rows"
            )
        return value[:, None]
    if value.ndim == 0:
        return value
    raise ValueError(f"start/stop is an int or a [batch] tensor, got shape {tuple(value.shape)}")


def positions_mask(
    hook,
    act: Tensor,
    *,
    start: Bound = None,
    stop: Bound = None,
    positions: Optional[Sequence[int]] = None,
    region: Optional[str] = None,
) -> Bool[Tensor, "batch pos"]:
    """Which entries of ``act``'s ``pos`` axis are selected (see the module docstring)."""
    pos = hook_positions(hook, act)  # (B, T), -1 for padding
    selected = pos >= 0
    lower, upper = _bound(start, pos), _bound(stop, pos)
    if lower is not None:
        selected = selected & (pos >= lower)
    if upper is not None:
        selected = selected & (pos < upper)
    if positions is not None:
        wanted = torch.as_tensor(list(positions), dtype=pos.dtype, device=pos.device)
        selected = selected & torch.isin(pos, wanted)
    if region is not None:
        if region not in ("prompt", "generated"):
            raise ValueError(f'region is "prompt" or "generated", got {region!r}')
        first = calls.generation_start()
        if first is None:
            raise RuntimeError(
                f'region="{region}" is only known inside interpkv.generate / compare_generation; '
                "elsewhere pass start= or stop= with the prompt length"
            )
        first = first.to(pos.device)[:, None]  # (B, 1): first generated position per row
        selected = selected & ((pos >= first) if region == "generated" else (pos < first))
    return selected


def _checked(hook, act: Tensor, value: Tensor) -> Tensor:
    if is_attention_hook(hook.name):
        raise ValueError(
            f"{hook.name} is [batch, head_index, pos, kv_pos]: steer a [batch, pos, ...] hook point "
            "(resid, attn_out, mlp_out, z, ...) instead"
        )
    value = value.to(device=act.device, dtype=act.dtype)
    trailing = tuple(act.shape[2:])
    if value.ndim > len(trailing) or tuple(value.shape) != trailing[len(trailing) - value.ndim :]:
        raise ValueError(
            f"the steering value has shape {tuple(value.shape)} but {hook.name} has activations "
            f"{tuple(act.shape)}: it must match the trailing axes {tuple(act.shape[2:])}"
        )
    return value


def _select_where(act: Tensor, mask: Tensor, new: Tensor) -> Tensor:
    mask = mask.reshape(*mask.shape, *([1] * (act.ndim - 2)))
    return torch.where(mask, new, act)


def add(
    vector: Float[Tensor, "..."],
    *,
    scale: float = 1.0,
    start: Bound = None,
    stop: Bound = None,
    positions: Optional[Sequence[int]] = None,
    region: Optional[str] = None,
) -> Callable:
    """A hook adding ``scale * vector`` to the activation at the selected absolute positions.

    Args:
        vector: broadcast over ``[batch, pos]``: ``[d_model]`` for resid hooks,
            ``[head_index, d_head]`` for ``hook_z``, and so on.
        scale: multiplier.
        start, stop, positions, region: which positions (module docstring).

    Returns:
        A TransformerLens hook function ``hook(act, hook) -> act`` for ``fwd_hooks``.
    """

    def hook(act: Tensor, hook) -> Tensor:
        value = _checked(hook, act, vector) * scale
        mask = positions_mask(hook, act, start=start, stop=stop, positions=positions, region=region)
        return _select_where(act, mask, act + value)

    hook.__name__ = "steering.add"
    if isinstance(scale, int):  # scale=2 and scale=2.0 are one intervention (and read the same)
        scale = float(scale)
    plain = isinstance(scale, float)
    return declare(hook, "steering.add", values=(vector, scale), start=start, stop=stop, positions=positions,
                   region=region, shown=(("v", vector),) + (() if plain else (("scale", scale),)),
                   keywords=(("scale", scale),) if plain and scale != 1.0 else ())


def replace(
    value: Float[Tensor, "..."],
    *,
    start: Bound = None,
    stop: Bound = None,
    positions: Optional[Sequence[int]] = None,
    region: Optional[str] = None,
) -> Callable:
    """A hook setting the activation to ``value`` at the selected absolute positions (a patch).

    ``value`` broadcasts over ``[batch, pos]`` like :func:`add`'s ``vector``.
    """

    def hook(act: Tensor, hook) -> Tensor:
        new = _checked(hook, act, value).expand_as(act)
        mask = positions_mask(hook, act, start=start, stop=stop, positions=positions, region=region)
        return _select_where(act, mask, new)

    hook.__name__ = "steering.replace"
    return declare(hook, "steering.replace", values=(value,), start=start, stop=stop, positions=positions,
                   region=region, shown=(("value", value),))


def intervention(
    fn: Callable,
    *,
    name: Optional[str] = None,
    start: Bound = None,
    stop: Bound = None,
    positions: Optional[Sequence[int]] = None,
    region: Optional[str] = None,
) -> Callable:
    """``fn`` as a hook with a stated identity and, optionally, the positions it acts on.

    A cache records which hooks wrote its positions and warns
    (:class:`~interpkv.ProvenanceWarning`) when a call continues it under
    other ones (:mod:`interpkv.cache.provenance`). Hooks are compared by a
    digest of their code and captured values, which needs no help for
    functions, lambdas, ``functools.partial`` and bound methods over tensors,
    numbers and modules. Wrap a hook here when:

    - its behaviour depends on state the digest cannot read (a C object, a
      file, a random generator, a global changed between calls): give it a
      ``name``; equal names are the same intervention, so change the name
      when its behaviour changes;
    - it acts only on some positions (e.g. only on new tokens, through
      :func:`interpkv.hook_positions`): declare them, and a cache whose stored
      positions it never touches is continued without a warning. The wrapper
      enforces the declaration: entries outside the declared positions keep
      the activation ``fn`` was given.

    Args:
        fn: a TransformerLens hook ``fn(act, hook) -> act or None``.
        name: the identity (default: a digest of ``fn``).
        start, stop, positions, region: the positions it acts on, as in
            :func:`add` (default: every position).

    Returns:
        A hook for ``fwd_hooks``.

    >>> v = torch.ones(model.cfg.d_model)
    >>> hook = interpkv.intervention(lambda act, hook: act + v, name="plus-ones", start=5)
    """
    declared = any(x is not None for x in (start, stop, positions, region))

    def hook(act: Tensor, hook) -> Optional[Tensor]:
        if not declared:
            return fn(act, hook)
        mask = positions_mask(hook, act, start=start, stop=stop, positions=positions, region=region)  # (B, T)
        if is_attention_hook(hook.name):  # [batch, head_index, pos, kv_pos]: the query axis
            mask = mask[:, None, :, None]
        else:
            mask = mask.reshape(*mask.shape, *([1] * (act.ndim - 2)))
        before = act.clone()
        out = fn(act, hook)
        return torch.where(mask, act if out is None else out, before)

    fn_name = getattr(fn, "__name__", type(fn).__name__)
    hook.__name__ = name or fn_name
    return declare(hook, "intervention", values=(fn,), name=name, start=start, stop=stop,
                   positions=positions, region=region, shown=((fn_name, fn),))
