"""``interpkv.forward``: one forward pass, through a cache or not, with hooks."""

from typing import Callable, Optional, Sequence, Tuple, Union

from jaxtyping import Float, Int, Integer
from torch import Tensor

from interpkv.cache.kvcache import KVCache
from interpkv.core import calls, returns, routing, stephooks
from interpkv.core import tl as _tl
from interpkv.core.attention import Step
from interpkv.core.inputs import as_inputs
from interpkv.core.overlay import overlay
from interpkv.core.positions import absolute_positions
from interpkv.core.schemes import scheme_for

__all__ = ["forward"]

Hook = Tuple[Union[str, Callable[[str], bool]], Callable]


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

    Returns:
        Logits ``[batch, pos, d_vocab]`` for the new positions (padding rows hold
        unspecified values), or ``[batch, 1, d_vocab]`` with ``logits="last"``;
        the loss, ``Output(logits, loss)`` or None as ``return_type`` says.

    Raises:
        ValueError: bad shapes or token ids, or a position past ``n_ctx`` for
            learned position embeddings.
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
    if logits not in ("all", "last"):
        raise ValueError(f'logits must be "all" or "last", got {logits!r}')
    inputs, mask = as_inputs(model, tokens, attention_mask)
    returns.check_return_type(return_type, loss_per_token, logits, inputs)
    last_only = logits == "last" or return_type is None
    scheme = scheme_for(model)
    batch, n_new = inputs.shape[:2]
    hooks = None  # step hooks (interpkv.faults) only ever touch a caller's cache
    if cache is None:
        cache = KVCache.for_model(model, batch, capacity=n_new)
    else:
        cache.check_compatible(model, batch, inputs.device)
        hooks = stephooks.installed(model)

    offsets = cache.next_positions
    if hooks:
        offsets = hooks.query_offsets(cache, offsets)
        hooks.before_step(model, cache)
    q_pos = absolute_positions(mask, offsets)
    limit = scheme.max_positions()
    if limit is not None and int(q_pos.max()) >= limit:
        raise ValueError(
            f"position {int(q_pos.max())} is past this model's n_ctx={limit}: its learned "
            f"position embedding has only {limit} rows (the cache already holds up to "
            f"position {int(cache.next_positions.max()) - 1}). Crop the cache or use a "
            "windowed cache; positions are never wrapped or clamped."
        )
    slots = cache.begin(q_pos)
    step = Step(cache, scheme, slots, hooks)

    # The model is shared: this call routes its modules (interpkv.core.routing)
    # through a view of it and gates its hooks to this context (interpkv.core.calls), never changing
    # what another thread's call, or a plain TransformerLens call, runs.
    ids = None if inputs.is_floating_point() else inputs
    view = overlay(model, routing.routes(model, step.attention_for, ids, last_logits_only=last_only))
    with calls.hooks(model, fwd_hooks), calls.positions(q_pos):
        if inputs.is_floating_point():
            embed = inputs
        else:
            if model.cfg.use_hook_tokens:
                inputs = view.hook_tokens(inputs)
            embed = view.hook_embed(model.embed(inputs))  # (B, T, d_model)
        residual, shortformer_pos_embed = scheme.embed(model, embed, q_pos)
        out = view(residual, start_at_layer=0, shortformer_pos_embed=shortformer_pos_embed)
    cache.commit(slots)
    return returns.finish(return_type, out[:, -1:] if last_only else out, inputs, mask, loss_per_token)
