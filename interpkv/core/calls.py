"""What one interpkv call sees and no other call can: its hooks and its positions.

A model is shared: a notebook's threads, a steering server's request
handlers and a plain TransformerLens call may all run it at once. So an
interpkv call never changes a module of the model for its duration (the
routing of its attention goes through a per-call view, :mod:`interpkv.core.overlay`),
and what it must put on the model, the caller's ``fwd_hooks``, is *gated*:

- :func:`hooks` registers each hook on the model's own hook point (the only
  place every hook point can be reached from, SAELens's SAE hook points
  included) wrapped in a gate that runs it only when the calling context is
  the one that registered it. Contexts are :mod:`contextvars`: each thread
  (and each asyncio task) has its own, so another thread's call, or a plain
  ``model(tokens)`` at the same time, passes the gate untouched. The handles
  are removed on exit, whatever ends the block (an exception, a
  ``KeyboardInterrupt``), and TransformerLens's ``reset_hooks`` in another
  thread cannot remove them early (they are not in its registry).
- :func:`positions` holds the absolute position of each new token of the
  forward running in this context, read by :func:`interpkv.hook_positions`.
- :func:`generation` holds, inside a generation, where each row's generated
  tokens start (``interpkv.steering``'s ``region=``).
- :func:`is_hooked` is "does anything hook this point *for this call*": a
  gated hook of another call does not count, so a fast path chosen by one call
  never depends on what another thread is doing; :func:`has_hooks` is the same
  for any module a hook point may have been replaced by (an SAE wrapper).
"""

import contextlib
import contextvars
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Int
from torch import Tensor

from interpkv.core.tl import HookPoint

__all__ = [
    "hooks",
    "positions",
    "current_positions",
    "generation",
    "generation_start",
    "is_hooked",
    "has_hooks",
    "hook_points",
]

Hook = Tuple[Union[str, Callable[[str], bool]], Callable]

# The gates open in this context, innermost last (a capture's hooks stay open
# for the forwards it makes inside them).
_OPEN: contextvars.ContextVar[Tuple[object, ...]] = contextvars.ContextVar("interpkv_open_hooks", default=())
_POSITIONS: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar("interpkv_positions", default=None)
_GENERATED_FROM: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar(
    "interpkv_generated_from", default=None
)

_GLOBAL_HOOKS = (
    torch.nn.modules.module._global_forward_hooks,
    torch.nn.modules.module._global_forward_pre_hooks,
    torch.nn.modules.module._global_backward_hooks,
    torch.nn.modules.module._global_backward_pre_hooks,
)


def hook_points(model: torch.nn.Module, name) -> List[torch.nn.Module]:
    """The hook points a ``fwd_hooks`` name (a string or a filter on names) selects."""
    if isinstance(name, str):
        try:
            return [model.mod_dict[name]]
        except KeyError:
            close = [n for n in model.hook_dict if name.split(".")[-1] in n][:5]
            raise ValueError(
                f"fwd_hooks names {name!r}, which is not a hook point of this model"
                + (f" (similar: {', '.join(close)})" if close else "")
                + "; see model.hook_dict for the names"
            ) from None
    if not callable(name):
        raise TypeError(f"a fwd_hooks entry is (name or filter, hook); got {type(name).__name__} as its name")
    return [point for point_name, point in model.hook_dict.items() if name(point_name)]


def _gated(hook: Callable, owner: object) -> Callable:
    """A torch forward hook running TransformerLens-style ``hook(act, hook=point)`` for ``owner`` only."""

    def gate(point, inputs, output):
        if owner not in _OPEN.get():
            return None  # another context's call, or a call outside any interpkv call
        conversion = getattr(point, "hook_conversion", None)  # as HookPoint.add_hook does
        if conversion is not None:
            output = conversion.convert(output)
        result = hook(output, hook=point)
        if result is not None and conversion is not None:
            result = conversion.revert(result)
        return result

    gate._interpkv_owner = owner  # type: ignore[attr-defined]  # read by is_hooked
    gate.__name__ = getattr(hook, "__name__", type(hook).__name__)
    return gate


@contextlib.contextmanager
def hooks(model: torch.nn.Module, fwd_hooks: Sequence[Hook]) -> Iterator[None]:
    """Run ``fwd_hooks`` (TransformerLens ``(name or filter, hook)`` pairs) in this context only.

    Hooks fire in the order given, after hooks already on a point (permanent
    ones, an enclosing ``model.hooks(...)``), as TransformerLens orders them.
    """
    if not fwd_hooks:
        yield
        return
    owner = object()
    handles: list = []
    token = _OPEN.set(_OPEN.get() + (owner,))
    try:
        for name, hook in fwd_hooks:
            if not callable(hook):
                raise TypeError(f"the hook for {name!r} in fwd_hooks is a {type(hook).__name__}, not a function")
            for point in hook_points(model, name):
                handles.append(point.register_forward_hook(_gated(hook, owner)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        _OPEN.reset(token)


@contextlib.contextmanager
def _holding(var: contextvars.ContextVar, value) -> Iterator[None]:
    """``var`` holds ``value`` in this context for the block, then what it held before."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def positions(q_pos: Int[Tensor, "batch pos"]):
    """Make ``q_pos`` the positions of the forward running in this context (a context manager)."""
    return _holding(_POSITIONS, q_pos)


def current_positions() -> Optional[Int[Tensor, "batch pos"]]:
    """The absolute positions of the interpkv forward running in this context, or None."""
    return _POSITIONS.get()


def generation(first_generated: Int[Tensor, " batch"]):
    """Mark this context as a generation whose tokens start at ``first_generated`` (per row).

    Set by :func:`interpkv.generate` and by ``compare_generation``'s uncached
    reference, read by ``interpkv.steering``'s ``region="prompt" | "generated"``.
    A context manager.
    """
    return _holding(_GENERATED_FROM, first_generated)


def generation_start() -> Optional[Int[Tensor, " batch"]]:
    """Per row, the absolute position of the first generated token, inside a generation; else None."""
    return _GENERATED_FROM.get()


def _counts(hook_fn, open_owners) -> bool:
    owner = getattr(hook_fn, "_interpkv_owner", None)
    return owner is None or owner in open_owners


def is_hooked(module: torch.nn.Module) -> bool:
    """Whether anything hooks ``module`` (a HookPoint) for the call running in this context.

    Sees hooks added by TransformerLens (``add_hook``, ``model.hooks(...)``), by
    plain ``register_forward_hook``, backward ones and torch's global module
    hooks; a gated hook of another context's call does not count.
    """
    if module._forward_hooks:
        open_owners = _OPEN.get()
        # tuple() copies in one step: another thread may register or remove meanwhile
        if any(_counts(h, open_owners) for h in tuple(module._forward_hooks.values())):
            return True
    return bool(
        module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or any(_GLOBAL_HOOKS)
    )


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether anything hooks ``module`` (a HookPoint) for the call in this context.

    See :func:`is_hooked`: TransformerLens's hooks, plain
    torch module hooks (forward or backward, global ones too) and this call's
    own ``fwd_hooks`` count; another thread's call's ``fwd_hooks`` do not.
    Anything that is not a plain HookPoint any more (SAELens puts an SAE
    wrapper where the hook point was) always counts: it computes something.
    """
    return type(module) is not HookPoint or is_hooked(module)
