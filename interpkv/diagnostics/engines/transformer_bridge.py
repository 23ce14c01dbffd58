"""Engine ``"transformer_bridge"``: a TransformerLens ``TransformerBridge`` through its own cache, audited.

TransformerLens 4 serves models through ``TransformerBridge``, which wraps a
``transformers`` model and hands caching to HF's ``Cache`` objects. The run
under test is the bridge's own cached path, as a bridge user runs it::

    cache = DynamicCache(config=bridge.original_model.config)   # or a StaticCache
    for each chunk [start, end):
        logits = bridge(tokens[:, start:end], attention_mask=mask[:, :end], past_key_values=cache)

``attention_mask`` covers every token so far (HF's convention; all ones when
the caller gave none). No ``position_ids`` are passed: deriving them from the
mask (left padding) is the bridge's job, and part of what is audited. The
reference is the same bridge run once on all tokens without a cache
(``bridge(tokens, attention_mask=mask)``).

Sites are the bridge's own hook points, under every TransformerLens name the
bridge gives them (``blocks.0.hook_resid_pre`` and its alias
``blocks.0.hook_in`` are one hook point, recorded under both names), at
absolute positions from the mask (:mod:`._common`), never from the bridge.
``hook_attn_scores`` / ``hook_pattern`` are recorded at their keys' absolute
positions: a call's key axis is every slot so far (``DynamicCache``), the
whole preallocated ``StaticCache`` (slots past the tokens fed are empty and
ignored), or only the call's own tokens (a bridge that did not use its cache;
those keys are then recorded where the call put them, and the missing
history shows as a divergence).

Bridges are built offline from an HF model with
:func:`interpkv.zoo.bridge_from_hf` (``interpkv.zoo.load_bridge(name)`` for a
zoo model). Which TransformerLens:
``TransformerBridge`` exists in transformer-lens 3.9 and 4.x; this engine
needs no ``HookedTransformer``, so it runs under either.
"""

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from interpkv.diagnostics.capture import NamesFilter, Sink, names_filter
from interpkv.diagnostics.engines._common import chunk_bounds, layout
from interpkv.diagnostics.engines.hf import CacheFactory, dynamic_cache, static_cache
from interpkv.diagnostics.layouts import Layouts
from interpkv.diagnostics.record import is_attention_hook

__all__ = ["run", "hook_names", "dynamic_cache", "static_cache", "CacheFactory"]


def hook_names(bridge) -> Dict[int, List[str]]:
    """Every name of each distinct hook point of ``bridge``: ``{id(hook point): [names]}``, in registry order."""
    found: Dict[int, List[str]] = {}
    for name, hook in bridge.hook_dict.items():
        found.setdefault(id(hook), []).append(name)
    return found


class _Feeder:
    """Torch forward hooks on the bridge's hook points, feeding the current call's positions to a sink."""

    def __init__(self, bridge, sink: Sink, batch: int, names: NamesFilter):
        self.sink = sink
        self.batch = batch
        self.layouts = Layouts(batch)
        self.skipped: set = set()
        self.nonfinite: Optional[tuple] = None  # (hook, row, position) of the first NaN at a real token
        self.q_pos: Tensor = torch.empty(0)
        self.k_pos: Tensor = torch.empty(0)
        wanted = names_filter(names)
        points = dict((id(hook), hook) for hook in bridge.hook_dict.values())
        self.handles = []
        for key, all_names in hook_names(bridge).items():
            chosen = [n for n in all_names if wanted(n)]
            if chosen:
                self.handles.append(points[key].register_forward_hook(self._hook(chosen)))

    def begin(self, q_pos: Tensor, k_pos: Tensor) -> None:
        self.q_pos, self.k_pos = q_pos, k_pos

    def _hook(self, chosen: List[str]):
        def hook(module, args, output):
            if isinstance(output, Tensor):
                for name in chosen:
                    self.feed(name, output.detach())

        return hook

    def feed(self, name: str, act: Tensor) -> None:
        if name in self.skipped:
            return
        n = self.q_pos.shape[1]
        if is_attention_hook(name) and act.ndim == 4:
            self.sink.activation(name, act, self.q_pos, self._key_positions(name, act))
            return
        if act.ndim >= 2 and act.shape[0] == self.batch and act.shape[1] == self.k_pos.shape[1] != n:
            act = act[:, -n:]  # a hook over every slot so far: the new slots
        placed = self.layouts.to_batch_pos(name, act, n)
        if isinstance(placed, str):  # no position axis (rotary tables, ...): skipped, with the reason
            self.skipped.add(name)
            self.sink.skip(name, placed)
            return
        real = self.q_pos >= 0
        if self.nonfinite is None and placed.is_floating_point() and bool(torch.isnan(placed[real]).any()):
            row, col = torch.isnan(placed.flatten(2).sum(-1)).logical_and(real).nonzero()[0].tolist()
            self.nonfinite = (name, row, int(self.q_pos[row, col]))
        self.sink.activation(name, placed, self.q_pos, None)

    def check_finite(self) -> None:
        """Raise when the bridge produced NaN at a real token: NaN compares to nothing, so no report can pass it."""
        if self.nonfinite is not None:
            name, row, pos = self.nonfinite
            raise ValueError(
                f"the TransformerBridge produced NaN at a real token ({name}, batch row {row}, position {pos}); "
                "NaN compares to nothing, so this run cannot be compared. HF's eager attention in float64 under "
                "left padding does this (its float32 softmax turns fully masked rows NaN): run in float32, or without padding"
            )

    def _key_positions(self, name: str, act: Tensor) -> Tensor:
        """Absolute positions of the key axis of ``act`` (see the module docstring)."""
        n_keys, so_far, n = act.shape[-1], self.k_pos.shape[1], self.q_pos.shape[1]
        if n_keys == so_far:
            return self.k_pos
        if n_keys > so_far:  # a StaticCache's preallocated slots: those not yet written are empty
            empty = self.k_pos.new_full((self.batch, n_keys - so_far), -1)
            return torch.cat([self.k_pos, empty], dim=1)
        if n_keys == n:  # the call attended its own tokens only: the cache was not used
            return self.q_pos
        raise ValueError(
            f"{name} has shape {tuple(act.shape)}: {n_keys} key slots, but this call has {n} queries and "
            f"{so_far} tokens so far; leave it out with names=..."
        )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _make_cache(bridge, cache: Union[None, object, CacheFactory], batch: int, n_tokens: int):
    made = dynamic_cache if cache is None else cache
    return made(bridge.original_model, batch, n_tokens) if callable(made) else made


def run(
    bridge,
    tokens: Tensor,
    sink_factory: Callable[[Tensor], Sink],
    *,
    steps: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
    names: NamesFilter = None,
    cache: Union[None, object, CacheFactory] = None,
) -> Sink:
    """Run a TransformerBridge through its own HF cache (or uncached), feeding a sink.

    Args:
        bridge: a ``transformer_lens.model_bridge.TransformerBridge``.
        tokens: ``[batch, pos]`` token ids.
        sink_factory: builds the sink from the ``[batch, pos]`` valid grid.
        steps: chunk lengths through the cache; None is one uncached call.
        attention_mask: ``[batch, pos]``, 1 = real, 0 = padding (left padding allowed).
        names: hooks to record (TransformerLens names, as in :func:`interpkv.capture`).
        cache: an empty ``transformers`` Cache, or a factory
            ``(hf_model, batch_size, max_len) -> Cache`` called with
            ``bridge.original_model`` (default :func:`dynamic_cache`;
            :func:`static_cache` for a ``StaticCache``). Ignored when ``steps`` is None.

    Returns:
        The sink, after ``finish()``.
    """
    lay = layout(tokens, attention_mask)
    batch, n_tokens = lay.tokens.shape
    sink = sink_factory(lay.valid)
    cached = steps is not None
    hf_cache = _make_cache(bridge, cache, batch, n_tokens) if cached else None
    feeder = _Feeder(bridge, sink, batch, names)
    try:
        with torch.no_grad():
            for start, end in chunk_bounds(n_tokens, steps):
                q_pos = lay.true_pos[:, start:end]
                feeder.begin(q_pos, lay.true_pos[:, :end] if cached else q_pos)
                if cached:
                    logits = bridge(
                        lay.tokens[:, start:end], attention_mask=lay.mask[:, :end], past_key_values=hf_cache
                    )
                else:
                    logits = bridge(lay.tokens, attention_mask=lay.given_mask)
                sink.logits(logits.detach(), q_pos)
    finally:
        feeder.remove()
    feeder.check_finite()
    sink.finish()
    return sink
