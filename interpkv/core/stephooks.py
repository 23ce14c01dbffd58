"""The seam where code outside the core (``interpkv.faults``) can alter a cached forward.

:class:`StepHooks` names the points a forward call through a caller's cache
passes, each a no-op here. An object overriding some of them is installed on
a model with :func:`install`; :func:`installed` returns what a forward must
consult (None almost always, and then every point is skipped by an
``if hooks`` test, so the plain path is the core code, bit for bit). A
``cache=None`` call, the reference every comparison is made against, never
consults them. The core never imports the module that defines the overrides.

The points, in the order a forward call reaches them:

- :meth:`StepHooks.query_offsets`: the per-row offset added to the new tokens'
  positions (``cache.next_positions`` normally).
- :meth:`StepHooks.before_step`: cache surgery before the call's slots are
  reserved.
- :meth:`StepHooks.bias_positions`: query positions the ALiBi bias is built from.
- :meth:`StepHooks.allowed`: which key slots are attended.
- :meth:`StepHooks.stored_kv`: the key/value tensors written to the cache.
"""

import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["StepHooks", "install", "uninstall", "installed"]


class StepHooks:
    """No-op step hooks; subclasses override the points they change."""

    def query_offsets(self, cache, offsets: Tensor) -> Tensor:
        """Per-row offset of the new tokens' positions (``[batch]``)."""
        return offsets

    def before_step(self, model: torch.nn.Module, cache) -> None:
        """Called before the cache reserves this call's slots."""

    def bias_positions(self, cache, q_pos: Tensor) -> Tensor:
        """Query positions the ALiBi bias rows are taken for (``[batch, pos]``)."""
        return q_pos

    def allowed(self, cache, slots, mask: Tensor) -> Tensor:
        """Which key slots may be attended (``[batch, 1, pos, kv_pos]`` bool)."""
        return mask

    def stored_kv(self, layer_cache, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Keys and values as written to the cache, ``[batch, pos, kv_head, d_head]``."""
        return k, v


class _Chain(StepHooks):
    """Several installed hook objects applied in installation order."""

    def __init__(self, hooks: List[StepHooks]):
        self.hooks = hooks

    def query_offsets(self, cache, offsets):
        for h in self.hooks:
            offsets = h.query_offsets(cache, offsets)
        return offsets

    def before_step(self, model, cache):
        for h in self.hooks:
            h.before_step(model, cache)

    def bias_positions(self, cache, q_pos):
        for h in self.hooks:
            q_pos = h.bias_positions(cache, q_pos)
        return q_pos

    def allowed(self, cache, slots, mask):
        for h in self.hooks:
            mask = h.allowed(cache, slots, mask)
        return mask

    def stored_kv(self, layer_cache, k, v):
        for h in self.hooks:
            k, v = h.stored_kv(layer_cache, k, v)
        return k, v


# model -> installed hook objects (a model that is garbage-collected takes them with it).
_INSTALLED: "weakref.WeakKeyDictionary[torch.nn.Module, List[StepHooks]]" = weakref.WeakKeyDictionary()


def install(model: torch.nn.Module, hooks: StepHooks) -> None:
    """Make ``model``'s forwards through a caller's cache consult ``hooks``."""
    _INSTALLED.setdefault(model, []).append(hooks)


def uninstall(model: torch.nn.Module, hooks: StepHooks) -> None:
    """Undo one :func:`install` of ``hooks`` (no-op if it is not installed)."""
    installed_hooks = _INSTALLED.get(model)
    if installed_hooks and hooks in installed_hooks:
        installed_hooks.remove(hooks)
        if not installed_hooks:
            del _INSTALLED[model]


def installed(model: torch.nn.Module) -> Optional[StepHooks]:
    """What a forward through a caller's cache must consult: None when nothing is installed."""
    hooks = _INSTALLED.get(model)
    if not hooks:
        return None
    unique = list(dict.fromkeys(hooks))  # the same object installed twice (nested) acts once
    return unique[0] if len(unique) == 1 else _Chain(unique)
