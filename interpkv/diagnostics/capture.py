"""``interpkv.capture``: record every hook point of a (possibly chunked) run.

The run is one uncached pass (``steps=None, cache=None``) or the tokens fed
in chunks through a cache, one ``interpkv.forward`` call per chunk. Every
activation (a private copy, on ``[batch, pos, ...]`` axes: see
:mod:`interpkv.diagnostics.layouts`) is handed, once its forward call
returns, to a *sink* together with the absolute positions of its queries
(and, for attention-shaped hooks, of its keys); one that cannot be placed is
handed to ``sink.skip`` with the reason. The
default sink assembles a :class:`~interpkv.diagnostics.record.Record`;
:func:`interpkv.compare` passes one that compares against a reference and
keeps only statistics, so two full sets of activations never coexist.

Absolute positions are computed here from the attention mask (and the
offsets of a cache passed in), never read back from the run: a faulty run
(``interpkv.faults``) that misplaces its tokens is still recorded at the
positions the tokens really have. Key positions are those of the cache's
stored slots, followed by the new tokens'; slots this capture appended
itself carry the positions capture assigned to them.
"""

from typing import Callable, Iterable, List, Optional, Sequence, cast

import torch
from jaxtyping import Int
from torch import Tensor

from interpkv.cache.kvcache import KVCache
from interpkv.core import calls, tlkeywords
from interpkv.core import tl as _tl
from interpkv.core.arguments import int_list
from interpkv.core.forward import Hook, forward
from interpkv.core.inputs import TokensLike, as_inputs
from interpkv.core.positions import absolute_positions
from interpkv.diagnostics import tokenlayout
from interpkv.diagnostics.assemble import Assembler, attention_rows  # noqa: F401 (attention_rows: re-export)
from interpkv.diagnostics.chunk import Chunk
from interpkv.diagnostics.layouts import Layouts, is_routing_hook
from interpkv.diagnostics.names import NamesFilter, resolve_names
from interpkv.diagnostics.record import Record, is_attention_hook

__all__ = ["capture", "NamesFilter"]



def names_filter(names: NamesFilter) -> Callable[[str], bool]:
    """A hook-name predicate from ``names``.

    ``None``: every hook. A string: hooks whose name contains it (so an exact
    name selects that hook). A list of strings: exactly those names. A
    callable: used as is (TransformerLens's ``names_filter``).
    """
    if names is None:
        return lambda name: True
    if callable(names):
        return names
    if isinstance(names, str):
        return lambda name: names in name
    wanted = set(names)
    bad = [n for n in wanted if not isinstance(n, str)]
    if bad:
        raise TypeError(f"names must be hook-name strings, got {bad[:3]}")
    return lambda name: name in wanted


def split_steps(n_tokens: int, steps: Optional[Iterable[int]]) -> List[int]:
    """Validate ``steps`` (chunk lengths) against ``n_tokens``.

    >>> split_steps(12, [6, 1, 1, 4])
    [6, 1, 1, 4]
    """
    if steps is None:
        return [n_tokens]
    steps = int_list("steps", steps)
    if any(s < 1 for s in steps):
        raise ValueError(f"every step must be at least 1 token, got steps={steps}")
    if sum(steps) != n_tokens:
        raise ValueError(
            f"steps {steps} sum to {sum(steps)} but the tokens have {n_tokens} positions; "
            f"the chunks must cover the tokens exactly (e.g. steps=[{n_tokens}])"
        )
    return steps


class Sink:
    """Receives a run's activations as they fire (see module docstring).

    ``copies`` (class attribute): the sink copies what it keeps inside
    :meth:`activation`, so the run hands each activation over as it fires,
    without a private copy held until the forward call returns (a hook firing
    twice in one call is handed over twice; the last one must win).
    """

    copies = False  # see the class docstring; honoured for one-chunk runs only

    def activation(
        self,
        name: str,
        act: Tensor,
        q_pos: Int[Tensor, "batch pos"],
        k_pos: Optional[Int[Tensor, "batch kv_pos"]],
    ) -> None:
        raise NotImplementedError

    def logits(self, logits: Tensor, q_pos: Int[Tensor, "batch pos"]) -> None:
        raise NotImplementedError

    def skip(self, name: str, reason: str) -> None:
        """``name`` cannot be recorded (see :mod:`interpkv.diagnostics.layouts`): drop what it sent."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last chunk."""


class RecordBuilder(Sink):
    """The default sink: every activation into an :class:`Assembler` over the run's positions."""

    copies = True  # the Assembler copies each activation into its buffers at once

    def __init__(self, valid: Tensor, keep_logits: bool = True):
        self.valid = valid
        self.parts = Assembler(*valid.shape, keep_logits=keep_logits)
        self.skipped: dict = {}

    def activation(self, name, act, q_pos, k_pos):
        if k_pos is None:
            self.parts.put(name, act, q_pos)
        else:
            self.parts.put_attention(name, act, q_pos, k_pos)

    def logits(self, logits, q_pos):
        self.parts.put_logits(logits, q_pos)

    def skip(self, name, reason):
        self.parts.drop(name)
        self.skipped[name] = reason

    def record(self, meta: dict) -> Record:
        return self.parts.record(self.valid, meta, self.skipped)


def run(
    model,
    tokens: TokensLike,
    sink_factory: Callable[[Tensor], Sink],
    *,
    cache: Optional[KVCache] = None,
    steps: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
    names: NamesFilter = None,
    fwd_hooks: Sequence[Hook] = (),
) -> Sink:
    """Run ``model`` over ``tokens`` (chunked by ``steps``), feeding a sink.

    ``sink_factory(valid)`` builds the sink once the absolute positions are
    known (``valid``: ``[batch, pos]``, True where a row has a token). The
    sink's ``token_positions`` (absolute position of each token column, -1
    at padding) is set for :mod:`interpkv.diagnostics.tokenlayout`.
    ``fwd_hooks`` are registered before the recording hooks, so a hook that
    edits an activation is recorded edited (as ``run_with_cache`` inside
    ``model.hooks(...)`` would).
    """
    tokens, mask = as_inputs(model, tokens, attention_mask, infer_padding=cache is None or cache.seq_len == 0)
    batch, n_tokens = tokens.shape[:2]
    if cache is not None:  # before its positions are read: a cache of another batch or model says so
        cache.check_compatible(model, batch, tokens.device)
    chunks = split_steps(n_tokens, steps)
    if cache is None and steps is not None:
        cache = KVCache.for_model(model, batch)

    offsets = cache.next_positions if cache is not None else mask.new_zeros(batch)
    true_pos = absolute_positions(mask, offsets)  # (B, T), -1 for padding
    n_positions = int(true_pos.max()) + 1 if true_pos.numel() else 0
    if n_positions <= 0:
        raise ValueError("attention_mask marks every token as padding: nothing to capture")
    valid = torch.zeros(batch, n_positions, dtype=torch.bool, device=true_pos.device)
    rows, cols = (true_pos >= 0).nonzero(as_tuple=True)
    valid[rows, true_pos[rows, cols]] = True
    sink = sink_factory(valid)
    sink.token_positions = true_pos
    wanted = names_filter(names)

    chunk = Chunk(cache, batch, true_pos.device)

    layouts = Layouts(batch)
    skipped: set = set()
    # This forward call's activations, emitted when it returns: a hook that
    # fires more than once per call keeps its last value, as in TransformerLens's
    # run_with_cache (ln1 runs on the query, key and value inputs in turn; under
    # use_split_qkv_input with GQA the three differ in head count).
    latest: dict = {}

    hand_over = sink.copies and len(chunks) == 1  # no private copies held until the call returns

    def hook(act: Tensor, hook) -> None:
        name = hook.name
        if is_routing_hook(name):
            layouts.observe_routing(name, act)  # expert hooks need it, wanted or not
        if name in skipped or not wanted(name):
            return
        act = act.detach()
        q_pos = chunk.q_pos
        if is_attention_hook(name):
            k_pos = chunk.key_positions()
            if act.shape[-1] != k_pos.shape[1] or act.shape[-2] != q_pos.shape[1]:
                raise ValueError(
                    f"{name} has shape {tuple(act.shape)} but this call has {q_pos.shape[1]} "
                    f"queries and {k_pos.shape[1]} key slots"
                )
            if hand_over:
                sink.activation(name, act, q_pos, k_pos)
            else:
                latest[name] = (act.clone(), q_pos, k_pos)
            return
        placed = layouts.to_batch_pos(name, act, q_pos.shape[1])
        if isinstance(placed, str):  # no position axis: skipped, with the reason
            skipped.add(name)
            latest.pop(name, None)
            sink.skip(name, placed)
            return
        if hand_over:
            sink.activation(name, placed, layouts.positions(name, q_pos), None)
        else:  # a copy: a later operation may modify the tensor in place before the emit
            latest[name] = (placed.clone(), layouts.positions(name, q_pos), None)

    hook._interpkv_observer = True  # records, never edits: not an intervention (interpkv.cache.provenance)
    # Hooks are registered once for the whole run, not once per chunk.
    start = 0
    observed = lambda name: wanted(name) or is_routing_hook(name)  # noqa: E731
    with torch.no_grad(), calls.hooks(model, [*fwd_hooks, (observed, hook)]):
        for n in chunks:
            chunk.begin(true_pos[:, start : start + n])
            logits = forward(
                model, tokens[:, start : start + n], cache=cache, attention_mask=mask[:, start : start + n]
            )
            for name, (act, q_pos, k_pos) in latest.items():  # in first-firing order
                sink.activation(name, act, q_pos, k_pos)
            latest.clear()
            sink.logits(cast(Tensor, logits).detach(), chunk.q_pos)
            chunk.end()
            start += n
    sink.finish()
    return sink


@calls.entry
def capture(
    model,
    tokens: TokensLike,
    *,
    cache: Optional[KVCache] = None,
    steps: Optional[Sequence[int]] = None,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    names: NamesFilter = None,
    fwd_hooks: Sequence[Hook] = (),
    names_filter: NamesFilter = None,
    layout: str = "tokens",
    logits: bool = True,
    **tl_kwargs,
) -> Record:
    """Record activations at every matching hook point, laid out as ``run_with_cache`` does.

    Args:
        model: a HookedTransformer.
        tokens: token ids ``[batch, pos]`` (or ``[pos]``), token embeddings
            ``[batch, pos, d_model]``, or (model with a tokenizer) a string or a
            list of strings, left-padded for you.
        cache: feed the tokens through this cache (its history is kept and
            the tokens continue after it). Default: a fresh cache when
            ``steps`` is given, else no cache.
        steps: chunk lengths, e.g. ``[6, 1, 1, 4]``; must sum to ``pos``.
            Each chunk is one ``interpkv.forward`` call through the cache.
            ``steps=None`` feeds all tokens in one call.
        attention_mask: ``[batch, pos]``, 1 = real, 0 = padding; chunked
            with the tokens. Padding has no position and is not computed: its
            columns hold 0 and are marked (``record.padding``, ``record.valid``).
        names: which hooks to record: None (all), a hook name, a short name
            (``"resid_post"``: every layer), a part of hook names, a list of
            those, or a predicate on names (:mod:`interpkv.diagnostics.selection`);
            matching no hook point is an error.
        fwd_hooks: TransformerLens ``(name or filter, hook)`` pairs active for
            the whole run (every chunk), as in :func:`interpkv.forward`. They
            run before recording, so an edited activation is recorded edited.
        names_filter: TransformerLens's spelling of ``names`` (same meaning;
            see :mod:`interpkv.diagnostics.names`). Not with ``names``.
        layout: ``"tokens"`` (default): the position axis is the columns of
            ``tokens`` (after the cache's earlier positions, if ``cache`` held
            any), as ``run_with_cache(tokens, attention_mask=...)`` lays a
            ragged batch out: ``[:, -1]`` is every row's last real token of a
            left-padded batch. ``"absolute"``: index ``p`` is absolute position
            ``p`` in every row (see :mod:`interpkv.diagnostics.tokenlayout`).
        logits: False leaves the logits out (``record.logits`` is then
            ``[batch, pos, 0]``): ``d_vocab`` floats per position, often most
            of a Record's memory.
        **tl_kwargs: TransformerLens's ``run_with_cache`` keywords are refused
            with one line naming the interpkv form (``remove_batch_dim``,
            ``stop_at_layer``...; :mod:`interpkv.core.tlkeywords`).

    Returns:
        A :class:`~interpkv.diagnostics.record.Record`, logits included; its
        entries read like ``run_with_cache``'s (0 pattern, -inf scores for keys
        a query may not attend) and :meth:`~interpkv.Record.computed` names
        the entries this run computed.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("gpt2", dtype=torch.float64)
    >>> tokens = torch.arange(10)[None]
    >>> record = interpkv.capture(model, tokens, steps=[6, 1, 1, 2])
    >>> record["blocks.0.attn.hook_pattern"].shape
    torch.Size([1, 4, 10, 10])
    """
    _tl.require_hooked(model, "interpkv.capture")
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(f"cache must be an interpkv.KVCache (KVCache.for_model(model, batch_size)), got {type(cache).__name__}")
    if tl_kwargs:
        tlkeywords.refuse("interpkv.capture", tl_kwargs, tlkeywords.CAPTURE_REFUSED)
    tokenlayout.check_layout(layout)
    names = resolve_names(names, names_filter, model=model)
    history = cache.next_positions.clone() if cache is not None else None
    sink = run(
        model,
        tokens,
        lambda valid: RecordBuilder(valid, keep_logits=logits),
        cache=cache,
        steps=steps,
        attention_mask=attention_mask,
        names=names,
        fwd_hooks=fwd_hooks,
    )
    meta = {"steps": list(steps) if steps is not None else None, "n_layers": model.cfg.n_layers}
    record = sink.record(meta)
    if layout == tokenlayout.ABSOLUTE:
        return record
    return tokenlayout.to_columns(record, tokenlayout.column_positions(sink.token_positions, history))
