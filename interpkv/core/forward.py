"""``interpkv.forward``: one forward pass, through a cache or not, with hooks."""

import contextlib
from typing import Any, Optional, Sequence, Union

from jaxtyping import Float, Int, Integer
from torch import Tensor

from interpkv.cache import provenance
from interpkv.cache.kvcache import KVCache
from interpkv.core import calls, heldback, returns, routing, stephooks, tlkeywords
from interpkv.core import tl as _tl
from interpkv.core.attention import Step
from interpkv.core.calls import Hook
from interpkv.core.hostread import host_array
from interpkv.core.inputs import as_inputs
from interpkv.core.overlay import overlay
from interpkv.core.positions import absolute_positions
from interpkv.core.schemes import scheme_for

__all__ = ["forward", "Hook"]

_NOT_NOTING = contextlib.nullcontext(((), ()))


@calls.entry
def forward(
    model: "_tl.HookedTransformer",
    tokens: Union[Integer[Tensor, "batch pos"], Integer[Tensor, " pos"], Float[Tensor, "batch pos d_model"]],
    *,
    cache: Optional[KVCache] = None,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    fwd_hooks: Sequence[Hook] = (),
    logits: str = "all",
    return_type: Optional[str] = "logits",
    loss_per_token: bool = False,
    stop_at_layer: Optional[int] = None,
    start_at_layer: Optional[int] = None,
    **tl_kwargs,
) -> Optional[Union[Float[Tensor, "batch pos d_vocab"], Tensor, returns.Output]]:
    """Run ``model`` on new tokens, through ``cache`` if given.

    With a cache, only ``tokens`` are computed: their keys and values are
    appended (unless the cache is frozen) and each token is placed at its
    row's next absolute position, which the cache tracks. Without one it is an
    ordinary uncached forward, through the same code. TransformerLens hook
    points fire under their usual names; ``fwd_hooks`` take TransformerLens's
    ``(name or filter, hook)`` form.

    Args:
        model: a HookedTransformer.
        tokens: new token ids ``[batch, pos]`` (or ``[pos]``), or token
            embeddings ``[batch, pos, d_model]`` (taken as ``hook_embed``'s output).
        cache: a :class:`KVCache` made for ``model`` with this batch size.
        attention_mask: ``[batch, pos]`` for the new tokens: 1 = real, 0 =
            padding. Left padding and ragged rows are fine; padding takes no
            position and is never attended to.
        fwd_hooks: hooks active for this call only.
        logits: ``"all"`` (default): logits for every new position. ``"last"``:
            only the last column's, ``[batch, 1, d_vocab]`` (what a decode loop
            needs; saves the unembedding of the rest of a long prompt, as HF's
            ``logits_to_keep=1``). Hook points fire as usual either way.
        return_type: as TransformerLens's: ``"logits"`` (default), ``"loss"``
            (next-token cross-entropy of ``tokens``), ``"both"``
            (``Output(logits, loss)``) or None (run for the hooks and the
            cache only). Through a cache the loss covers this call's tokens:
            each new token after the first, predicted from the one before
            (see :mod:`interpkv.core.returns`); padding pairs are left out.
        loss_per_token: the loss as ``[batch, pos - 1]`` instead of its mean.
        stop_at_layer: as TransformerLens's: run the blocks before it and
            return the residual stream ``[batch, pos, d_model]`` (negative
            counts from the end). With a cache only inside ``cache.freeze()``.
        start_at_layer: as TransformerLens's: ``tokens`` is the residual
            stream ``[batch, pos, d_model]`` entering that block. With a cache
            only inside ``cache.freeze()`` (the earlier layers store nothing).
            Other TransformerLens keywords are refused with the interpkv form
            (:mod:`interpkv.core.tlkeywords`).

    Returns:
        Logits ``[batch, pos, d_vocab]`` for the new positions (padding rows hold
        unspecified values), or ``[batch, 1, d_vocab]`` with ``logits="last"``;
        the loss, ``Output(logits, loss)`` or None as ``return_type`` says.

    Raises:
        ValueError: bad shapes or token ids, or a position past ``n_ctx`` for
            learned position embeddings. (Ids and masks already on an
            accelerator are checked for a prompt but not for a one-position
            step, which reads nothing back: :mod:`interpkv.core.hostread`.)
        CacheMismatchError: the cache belongs to another model, batch size,
            dtype or device.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("llama")
    >>> cache = interpkv.KVCache.for_model(model)
    >>> prompt = interpkv.forward(model, torch.tensor([[5, 6, 7]]), cache=cache)
    >>> step = interpkv.forward(model, torch.tensor([[8]]), cache=cache)
    >>> full = interpkv.forward(model, torch.tensor([[5, 6, 7, 8]]))
    >>> torch.allclose(step[:, -1], full[:, -1], atol=1e-5)
    True
    >>> float(interpkv.forward(model, torch.tensor([[5, 6, 7, 8]]), return_type="loss")) > 0
    True
    """
    _tl.require_hooked(model, "interpkv.forward")
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(f"cache must be an interpkv.KVCache (KVCache.for_model(model, batch_size)), got {type(cache).__name__}")
    if tl_kwargs:
        tlkeywords.refuse("interpkv.forward", tl_kwargs, tlkeywords.REFUSED)
    if logits not in ("all", "last"):
        raise ValueError(f'logits must be "all" or "last", got {logits!r}')
    # Pads are inferred only where a computation starts (interpkv.core.padding).
    infer = cache is None or cache.seq_len == 0
    inputs, mask = as_inputs(model, tokens, attention_mask, infer_padding=infer)
    if attention_mask is None and infer and getattr(model, "tokenizer", None) is not None:
        attention_mask = mask  # possibly inferred: what _all_real must read
    returns.check_return_type(return_type, loss_per_token, logits, inputs)
    last_only = logits == "last" or return_type is None
    scheme = scheme_for(model)
    batch, n_new = inputs.shape[:2]
    hooks = None  # step hooks (interpkv.faults) only ever touch a caller's cache
    acting = None  # the interventions this call writes under (a caller's cache only)
    start, stop = 0, None
    if start_at_layer is not None or stop_at_layer is not None:
        start, stop = tlkeywords.forward_layers(
            model.cfg.n_layers, start_at_layer, stop_at_layer, cache, cache is not None
        )
        if start > 0 and (not inputs.is_floating_point() or inputs.shape[-1] != model.cfg.d_model):
            raise ValueError(
                f"start_at_layer={start_at_layer} takes the residual stream [batch, pos, d_model="
                f"{model.cfg.d_model}] entering that block, got {tuple(inputs.shape)} {inputs.dtype}"
            )
    if cache is None:
        cache = KVCache.for_model(model, batch, capacity=n_new)
    else:
        cache.check_compatible(model, batch, inputs.device)
        if heldback.IDS in cache.row_state:  # generate held a token back: not continued without it
            heldback.refuse_held_back(cache)
        hooks = stephooks.installed(model)
        acting = provenance.NONE
    first_slot_id = cache.appended

    offsets = cache.next_positions
    if hooks:
        offsets = hooks.query_offsets(cache, offsets)
        hooks.before_step(model, cache)
    q_pos = absolute_positions(mask, offsets)
    limit = scheme.max_positions()
    # The limit is checked against the cache's host-side bound (no read of
    # q_pos); only a call that may reach it reads the positions back.
    if limit is not None and _may_reach(cache, n_new, limit, hooks) and int(q_pos.max()) >= limit:
        raise ValueError(
            f"position {int(q_pos.max())} is past this model's n_ctx={limit}: its learned "
            f"position embedding has only {limit} rows (the cache already holds up to "
            f"position {int(cache.next_positions.max()) - 1}). Crop the cache or use a "
            "windowed cache; positions are never wrapped or clamped."
        )
    slots = cache.begin(q_pos)
    all_real = _all_real(tokens, attention_mask)
    step = Step(cache, scheme, slots, hooks, all_real=all_real)

    # The model is shared: this call routes its modules (interpkv.core.routing)
    # through a view of it and gates its hooks to this context (interpkv.core.calls), never changing
    # what another thread's call, or a plain TransformerLens call, runs.
    ids = None if inputs.is_floating_point() else inputs
    view = overlay(model, routing.routes(model, step.attention_for, ids, last_logits_only=last_only))
    # Through a caller's cache, what edits activations is noted (interpkv.cache.provenance).
    noting: Any = _NOT_NOTING
    if acting is not None:
        points = provenance.model_hook_points(model)
        if fwd_hooks or points or calls.active_hooks():  # else nothing can edit: nothing to note
            noting = calls.edits(model, points)
    with noting as edited, calls.hooks(model, fwd_hooks), calls.positions(q_pos):
        if start > 0:  # TransformerLens's start_at_layer: the input is the residual stream
            shortformer_pos_embed = None
            if getattr(scheme, "shortformer", False):  # every block adds it to its attention input
                _, shortformer_pos_embed = scheme.embed(model, inputs.new_zeros(inputs.shape), q_pos)
            residual = inputs
        else:
            if inputs.is_floating_point():
                embed = inputs
            else:
                if model.cfg.use_hook_tokens:
                    inputs = view.hook_tokens(inputs)
                embed = view.hook_embed(view.embed(inputs))  # (B, T, d_model); the view: a routed embedding norm
            residual, shortformer_pos_embed = scheme.embed(model, embed, q_pos)
        out = view(residual, start_at_layer=start, stop_at_layer=stop, shortformer_pos_embed=shortformer_pos_embed)
    if acting is not None:
        # Before the commit: a ProvenanceWarning raised as an error leaves the stored history as it was.
        acting = provenance.check(model, cache, edited, hooks)
    cache.commit(slots)
    if acting is not None and not cache.frozen:
        provenance.written(cache, acting, first_slot_id)
    if stop is not None:
        return out  # the residual stream entering block `stop` (B, T, d_model), as TransformerLens
    return returns.finish(return_type, out[:, -1:] if last_only else out, inputs, mask, loss_per_token)


def _may_reach(cache: KVCache, n_new: int, limit: int, hooks) -> bool:
    """Whether this call's positions may reach ``limit``, from the cache's host-side bound.

    Reads the positions back only when the bound says they may (near ``limit``).
    """
    if hooks:  # step hooks may move the offsets
        return True
    if cache.bound.get(cache.next_positions) + n_new <= limit:
        return False
    return cache.bound.tighten(cache.next_positions) + n_new > limit


def _all_real(tokens, attention_mask) -> Optional[bool]:
    """Whether every new column is a real token, as far as the host knows (None: the mask is on a device)."""
    if attention_mask is None:
        return True if isinstance(tokens, Tensor) else None  # text makes its own mask
    values = host_array(attention_mask)
    return None if values is None else bool(values.all())
