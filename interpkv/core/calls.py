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

Interrupts. Every public entry point is wrapped by :func:`entry`: the call
runs in a copy of the caller's :mod:`contextvars` context (so the gates it
opens and the positions it sets vanish with it, however it ends) inside a
scope whose cleanup is the standard library's ``ExitStack`` calling torch's
``RemovableHandle.remove`` and torch's grad-mode setter: no interpkv line runs
during that cleanup, so an exception (a ``KeyboardInterrupt``) that arrives at
any line of interpkv, the cleanup of a ``with`` or ``finally`` included, leaves
no hook of the call registered or open and grad mode as it was. A hook's
removal is put on the scope *before* the hook is added to its point, and the
adding is one dict store: there is no instant at which a hook is on the model
and not on the list of hooks to remove.
"""

import contextlib
import contextvars
import functools
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Int
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from interpkv.core.tl import HookPoint

__all__ = [
    "Hook",
    "entry",
    "track",
    "on_exit",
    "hooks",
    "positions",
    "current_positions",
    "generation",
    "generation_start",
    "is_hooked",
    "has_hooks",
    "hook_points",
    "active_hooks",
    "edits",
]

Hook = Tuple[Union[str, Callable[[str], bool]], Callable]
"""A TransformerLens ``fwd_hooks`` entry: ``(name or filter on names, hook function)``; defined once, here."""

# The gates open in this context, innermost last (a capture's hooks stay open
# for the forwards it makes inside them).
_OPEN: contextvars.ContextVar[Tuple[object, ...]] = contextvars.ContextVar("interpkv_open_hooks", default=())
_POSITIONS: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar("interpkv_positions", default=None)
# The fwd_hooks entries of the interpkv calls open in this context, outermost first
# (read by interpkv.cache.provenance: what a forward inside them runs under).
_ACTIVE: contextvars.ContextVar[Tuple[Hook, ...]] = contextvars.ContextVar("interpkv_active_hooks", default=())
# Inside a forward through a caller's cache: the (hook point name, hook) pairs that edited an activation.
_EDITS: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("interpkv_edits", default=None)
_GENERATED_FROM: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar(
    "interpkv_generated_from", default=None
)

_SCOPE: contextvars.ContextVar[Optional["_Scope"]] = contextvars.ContextVar("interpkv_call_scope", default=None)


class _Scope(contextlib.ExitStack, contextlib.ContextDecorator):
    """One entry-point call: its cleanup, run by ``ExitStack.__exit__`` (standard library code)."""

    def _recreate_cm(self):
        return _Scope()

    def __enter__(self):
        self.callback(torch._C._set_grad_enabled, torch.is_grad_enabled())  # C: restores grad mode
        _SCOPE.set(self)  # in the call's own context copy (see entry): no reset needed
        return self


def entry(fn: Callable) -> Callable:
    """Wrap a public entry point so that no exception can leave its hooks or state behind.

    See the module docstring. Nested entry points (``compare`` running
    ``capture``) each get their own scope; the innermost one holds the hooks
    registered while it runs.
    """
    scoped = _Scope()(fn)  # the ``with`` lives in contextlib's frame, not in interpkv's

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return contextvars.copy_context().run(scoped, *args, **kwargs)

    return call


def track(handle) -> None:
    """Put ``handle.remove`` (a torch ``RemovableHandle``) on the running call's cleanup, if any."""
    on_exit(handle.remove)


def on_exit(undo: Callable, *args) -> None:
    """Run ``undo(*args)`` when the running entry-point call ends, however it ends (if inside one).

    ``undo`` must be idempotent (it also runs after a normal undo) and should
    be a C function or a library's (``set.discard``, ``RemovableHandle.remove``),
    so that no interpkv line runs during cleanup.
    """
    scope = _SCOPE.get()
    if scope is not None:
        scope.callback(undo, *args)


def _register(point: torch.nn.Module, hook: Callable, handles: list) -> None:
    """``point.register_forward_hook(hook)`` with its removal tracked before the hook is added.

    The handle is made (as torch makes it) and put on the cleanup first; the
    hook is then added in one dict store, so an interrupt at any instant leaves
    it either absent or removable.
    """
    handle = RemovableHandle(
        point._forward_hooks, extra_dict=[point._forward_hooks_with_kwargs, point._forward_hooks_always_called]
    )
    track(handle)
    handles.append(handle)
    point._forward_hooks[handle.id] = hook


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
        edits = _EDITS.get()
        if edits is None:
            result = hook(output, hook=point)
        else:  # a forward through a caller's cache notes which hooks edit (interpkv.cache.provenance)
            version = _version(output)
            result = hook(output, hook=point)
            if (result is not None and result is not output) or version is None or _version(output) != version:
                edits.append((point.name, hook))
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
    token = active = None
    try:
        token = _OPEN.set(_OPEN.get() + (owner,))
        active = _ACTIVE.set(_ACTIVE.get() + tuple(fwd_hooks))
        for name, hook in fwd_hooks:
            if not callable(hook):
                raise TypeError(f"the hook for {name!r} in fwd_hooks is a {type(hook).__name__}, not a function")
            for point in hook_points(model, name):
                _register(point, _gated(hook, owner), handles)
        yield
    finally:
        # An interrupt in these lines: the call's scope removes the rest (see entry).
        for handle in handles:
            handle.remove()
        if active is not None:
            _ACTIVE.reset(active)
        if token is not None:
            _OPEN.reset(token)


@contextlib.contextmanager
def _holding(var: contextvars.ContextVar, value) -> Iterator[None]:
    """``var`` holds ``value`` in this context for the block, then what it held before.

    An interrupt before the reset leaves it set only in the entry point's
    context copy, which ends with the call (see :func:`entry`).
    """
    token = None
    try:
        token = var.set(value)
        yield
    finally:
        if token is not None:
            var.reset(token)


def positions(q_pos: Int[Tensor, "batch pos"]):
    """Make ``q_pos`` the positions of the forward running in this context (a context manager)."""
    return _holding(_POSITIONS, q_pos)


def _version(t) -> Optional[int]:
    """``t._version`` (bumped by every in-place edit), or None where torch keeps none (inference mode)."""
    try:
        return t._version
    except (RuntimeError, AttributeError):
        return None


class edits:
    """Note what edits activations in this context's calls: ``with edits(model, points) as (hooks, points):``.

    The first list gets ``(point name, hook)`` for each gated ``fwd_hooks``
    entry that returned a new tensor or edited its input in place. For each of
    ``points`` (hook points holding the model's own hooks), two probes around
    those hooks put the point's name in the second list when they changed the
    activation. Enter it before :func:`hooks` (the probes must come before the
    call's own gated hooks on a point). A class, not a generator: it is
    entered by every decode step through a caller's cache.
    """

    __slots__ = ("model", "points", "found", "changed", "handles", "tokens")

    def __init__(self, model: torch.nn.Module, points: Sequence[str] = ()):
        self.model, self.points = model, points

    def __enter__(self) -> Tuple[list, list]:
        self.found: list = []
        self.changed: list = []
        self.handles: list = []
        self.tokens = [_EDITS.set(self.found)]
        if self.points:
            owner = object()
            self.tokens.append(_OPEN.set(_OPEN.get() + (owner,)))
            try:
                for name in self.points:
                    self.handles.extend(_probes(self.model.mod_dict[name], name, owner, self.changed))
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self.found, self.changed

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        if len(self.tokens) > 1:
            _OPEN.reset(self.tokens.pop())
        _EDITS.reset(self.tokens.pop())


def _probes(point: torch.nn.Module, name: str, owner: object, changed: list):
    seen: list = []

    def first(module, inputs, output):
        if owner in _OPEN.get():
            seen.append((output, _version(output)))

    def last(module, inputs, output):
        if owner in _OPEN.get() and seen:
            before, version = seen.pop()
            if output is not before or version is None or _version(output) != version:
                changed.append(name)

    first._interpkv_owner = last._interpkv_owner = owner  # type: ignore[attr-defined]
    return [point.register_forward_hook(first, prepend=True), point.register_forward_hook(last)]


def active_hooks() -> Tuple[Hook, ...]:
    """The ``fwd_hooks`` entries of the interpkv calls open in this context (outermost first)."""
    return _ACTIVE.get()


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
