"""Engine ``"transformer_lens"``: TransformerLens's own ``past_kv_cache`` path, audited.

The run under test feeds the tokens chunk by chunk through a fresh
``TransformerLensKeyValueCache`` (``HookedTransformerKeyValueCache`` in older
releases)::

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)
    model(chunk, past_kv_cache=cache, attention_mask=chunk_mask)

How TransformerLens 3.9 handles the mask in cached mode (read from
``HookedTransformer.input_to_embed`` and ``AbstractAttention``): the mask
passed with a chunk covers that chunk's tokens only, must have the chunk's
shape, and the cache appends it to the masks of earlier calls
(``append_attention_mask``); every layer then sees the mask of all tokens so
far. Rotary and learned positions number each row's real tokens from the
first one (``get_offset_position_ids``), so left padding is handled; ALiBi
biases by slot index, which under left padding only adds a per-row constant.
A model without a tokenizer cannot infer a mask, so one is always passed
(all ones when the caller gave none).

Hooks fire with TransformerLens's names. In cached mode ``hook_rot_k``
covers every key slot (keys are cached before rotation and rotated again at
every call); only its new slots are recorded, so it lines up with the
uncached run. ``hook_attn_scores`` / ``hook_pattern`` cover every key slot
and are recorded at the keys' absolute positions.

TransformerLens keeps state between calls: each attention layer memoizes its
ALiBi matrix (``attn.alibi``) and slices later, shorter calls out of it.
The uncached reference must not leave its (longer) matrix behind for the run
under test, so :func:`run` restores that state after every run: both runs
of a comparison start from the state the caller left, and an audit leaves
the model as it found it (see :func:`isolated_state`). A stale matrix from
the caller's own earlier, longer call is still there, and shows.
"""

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

from interpkv.core import calls
from interpkv.core import tl as _tl
from interpkv.diagnostics.capture import NamesFilter, Sink, names_filter
from interpkv.diagnostics.engines._common import chunk_bounds, layout
from interpkv.diagnostics.layouts import Layouts, is_routing_hook
from interpkv.diagnostics.record import is_attention_hook

__all__ = ["run", "isolated_state", "run_generate", "STATE_ATTRIBUTES"]

STATE_ATTRIBUTES = ("alibi",)
"""Per-layer attributes TransformerLens 3.9 memoizes across forward calls."""


@contextlib.contextmanager
def isolated_state(model) -> Iterator[None]:
    """Undo, on exit, what forward calls memoized on ``model`` (the ALiBi matrices)."""
    saved = [(block.attn, name, getattr(block.attn, name, None)) for block in model.blocks for name in STATE_ATTRIBUTES]
    try:
        yield
    finally:
        for attn, name, value in saved:
            if hasattr(attn, name):
                setattr(attn, name, value)


class _Feeder:
    """Hands TransformerLens hook activations of the current chunk to a sink."""

    def __init__(self, sink: Sink, batch: int, names: NamesFilter):
        self.sink = sink
        self.wanted = names_filter(names)
        self.layouts = Layouts(batch)  # qk-norm, MoE routing and expert hooks, as in capture
        self.skipped: set = set()
        self.q_pos: Tensor = torch.empty(0)
        self.k_pos: Tensor = torch.empty(0)

    def observes(self, name: str) -> bool:
        """Hooks to register: the wanted ones, and MoE routing (expert hooks need it)."""
        return self.wanted(name) or is_routing_hook(name)

    def begin(self, q_pos: Tensor, k_pos: Tensor) -> None:
        self.q_pos, self.k_pos = q_pos, k_pos

    def hook(self, act: Tensor, hook) -> None:
        name, act = hook.name, act.detach()
        if is_routing_hook(name):
            self.layouts.observe_routing(name, act)
        if name in self.skipped or not self.wanted(name):
            return
        q_pos, n = self.q_pos, self.q_pos.shape[1]
        if is_attention_hook(name):
            if act.shape[-2:] != (n, self.k_pos.shape[1]):
                raise ValueError(
                    f"{name} has shape {tuple(act.shape)} but this call has {n} queries and "
                    f"{self.k_pos.shape[1]} key slots"
                )
            self.sink.activation(name, act, q_pos, self.k_pos)
            return
        if act.ndim >= 2 and act.shape[0] == q_pos.shape[0] and act.shape[1] == self.k_pos.shape[1] != n:
            act = act[:, -n:]  # hook_rot_k (every key slot) or a whole-sequence hook: the new slots
        placed = self.layouts.to_batch_pos(name, act, n)
        if isinstance(placed, str):  # no position axis: skipped, with the reason
            self.skipped.add(name)
            self.sink.skip(name, placed)
            return
        self.sink.activation(name, placed, self.layouts.positions(name, q_pos), None)


def run(
    model,
    tokens: Tensor,
    sink_factory: Callable[[Tensor], Sink],
    *,
    steps: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
    names: NamesFilter = None,
) -> Sink:
    """Run a HookedTransformer through TransformerLens's own cache (or uncached), feeding a sink.

    Args:
        model: a HookedTransformer.
        tokens: ``[batch, pos]`` token ids.
        sink_factory: ``sink_factory(valid)`` builds the sink (see :func:`interpkv.diagnostics.capture.run`).
        steps: chunk lengths through a fresh TransformerLens cache; None is one
            uncached call (the reference). Either way the model's memoized
            state is restored afterwards.
        attention_mask: ``[batch, pos]``, 1 = real, 0 = padding.
        names: hooks to record (as in :func:`interpkv.capture`).

    Returns:
        The sink, after ``finish()``.
    """
    lay = layout(tokens, attention_mask)
    batch = lay.tokens.shape[0]
    sink = sink_factory(lay.valid)
    feeder = _Feeder(sink, batch, names)
    cached = steps is not None
    cache = _tl.TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch) if cached else None
    with torch.no_grad(), isolated_state(model), calls.hooks(model, [(feeder.observes, feeder.hook)]):
        for start, end in chunk_bounds(lay.tokens.shape[1], steps):
            q_pos = lay.true_pos[:, start:end]
            feeder.begin(q_pos, lay.true_pos[:, :end] if cached else q_pos)
            if cached:
                mask = lay.mask[:, start:end]  # this chunk only: the cache appends it to the earlier ones
                logits = model(lay.tokens[:, start:end], past_kv_cache=cache, attention_mask=mask)
            else:
                logits = model(lay.tokens, attention_mask=lay.given_mask)
            sink.logits(logits.detach(), q_pos)
    sink.finish()
    return sink


class _GenerateFeeder(_Feeder):
    """Positions of the tokens ``HookedTransformer.generate`` consumes at each step."""

    def __init__(self, sink: Sink, batch: int, names: NamesFilter = None):
        super().__init__(sink, batch, names)
        self.batch = batch

    def step(self, pos_offset: int, length: int) -> None:
        q_pos = torch.arange(pos_offset, length)[None].expand(self.batch, -1)  # (B, n): consumed tokens
        self.begin(q_pos, torch.arange(length)[None].expand(self.batch, -1))


def run_generate(
    model, tokens: Tensor, sink_factory: Callable[[Tensor], Sink], *, max_new_tokens: int, names: NamesFilter = None
) -> Tuple[Sink, Tensor]:
    """Greedy ``model.generate(tokens, use_past_kv_cache=True)``, its activations fed to a sink.

    Each step's activations are recorded at the absolute positions of the
    tokens that step consumes (the whole prompt, then the last token), so
    the record lines up with an uncached run on the generated tokens minus
    the last one. Hooks that see the whole sequence at a step
    (``hook_pos_embed`` inside ``get_residual``) are recorded for the
    consumed tokens only. No attention mask: this is the call as a user
    without a tokenizer makes it.

    Returns:
        ``(sink, generated)``: the sink after ``finish()`` and the generated
        ids ``[batch, pos + max_new_tokens]`` (prompt included).
    """
    if tokens.ndim == 1:
        tokens = tokens[None]
    batch, prompt = tokens.shape
    fed = prompt + max_new_tokens - 1
    sink = sink_factory(torch.ones(batch, fed, dtype=torch.bool))
    feeder = _GenerateFeeder(sink, batch, names)
    get_residual, forward = model.get_residual, model.forward

    def residual(embed, pos_offset, *args, **kwargs):
        feeder.step(int(pos_offset), embed.shape[1])
        return get_residual(embed, pos_offset, *args, **kwargs)

    def forward_logged(*args, **kwargs):
        logits = forward(*args, **kwargs)
        sink.logits(logits.detach()[:, -feeder.q_pos.shape[1]:], feeder.q_pos)
        return logits

    model.get_residual, model.forward = residual, forward_logged
    try:
        with torch.no_grad(), calls.hooks(model, [(feeder.observes, feeder.hook)]):
            generated = model.generate(
                tokens, max_new_tokens=max_new_tokens, do_sample=False, use_past_kv_cache=True,
                stop_at_eos=False, verbose=False, return_type="tokens",
            )
    finally:
        del model.get_residual, model.forward
    sink.finish()
    return sink, generated
