"""Activation patching that runs the shared prefix of clean and corrupt prompts once.

TransformerLens's ``transformer_lens.patching.get_act_patch_*`` functions run
the whole corrupted batch once per patch. Clean and corrupted prompts usually
share a long prefix (a few-shot preamble, a document) and differ in a few
tokens near the end. Activations at a position depend only on the tokens up to
it, so on the shared prefix clean and corrupt activations are equal:

- a patch at a position inside the shared prefix changes nothing, and takes
  the unpatched metric without a run;
- every other patch only changes the suffix, which is recomputed through a
  frozen :class:`KVCache` holding the prefix (``with cache.freeze():`` reads
  the prefix keys and appends nothing, so every patch starts from the same
  cache). The logits handed to ``metric`` are the prefix logits (computed once)
  followed by the patched suffix logits: the same ``[batch, pos, d_vocab]``
  tensor TransformerLens would pass.

A hook already on the model (``model.add_hook``, ``model.hooks(...)``, a plain
``register_forward_hook``) may index positions (``act[:, -1] += v``), and a
prefix-sharing run shows it other columns than the full run does (the prefix
alone, then the suffix alone). So with such hooks ``share_prefix=True``
recomputes the whole sequence for every patch, as ``share_prefix=False`` does,
and says so with a :class:`SharedPrefixWarning` naming them: the values are
always TransformerLens's.

Results have TransformerLens's layout and values (see :data:`HOOKS`).
``hook`` is a short name (``"resid_pre"``, ``"pattern"``...) or a full
TransformerLens hook name such as ``utils.get_act_name("resid_pre", 0)`` =
``"blocks.0.hook_resid_pre"``, which stands for its family in every layer.
"""

import numbers
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interpkv.cache.kvcache import KVCache
from interpkv.cache.provenance import declare
from interpkv.core import calls
from interpkv.core import tl as _tl
from interpkv.core.forward import forward
from interpkv.core.inputs import TokensLike, as_pair
from interpkv.core.positions import validate_mask
from interpkv.diagnostics.selection import select_hooks

__all__ = ["patch", "HOOKS", "shared_prefix_length", "model_hooks", "SharedPrefixWarning"]


class SharedPrefixWarning(UserWarning):
    """``patch(share_prefix=True)`` recomputed the whole sequence because the model carries hooks."""


def model_hooks(model) -> List[str]:
    """Modules of ``model`` carrying forward hooks of their own (not interpkv's per-call ones).

    >>> import interpkv
    >>> model = interpkv.zoo.load("gpt2")
    >>> model.add_hook("blocks.0.hook_resid_post", lambda act, hook: act)
    >>> model_hooks(model)
    ['blocks.0.hook_resid_post']
    >>> model.reset_hooks()
    """
    found = []
    for name, module in model.named_modules():
        hooks = (*tuple(module._forward_hooks.values()), *tuple(module._forward_pre_hooks.values()))
        if any(getattr(h, "_interpkv_owner", None) is None for h in hooks):
            found.append(name or "the model itself")
    glob = torch.nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks:
        found.append("torch's global module hooks")
    return found


@dataclass(frozen=True)
class _Kind:
    hook_name: str  # format string with {layer}
    axes: Tuple[str, ...]  # result layout, as TransformerLens names it
    tl_function: str  # the transformer_lens.patching function with the same layout and values


HOOKS: Dict[str, _Kind] = {
    "resid_pre": _Kind("blocks.{layer}.hook_resid_pre", ("layer", "pos"), "get_act_patch_resid_pre"),
    "resid_mid": _Kind("blocks.{layer}.hook_resid_mid", ("layer", "pos"), "get_act_patch_resid_mid"),
    "resid_post": _Kind("blocks.{layer}.hook_resid_post", ("layer", "pos"), "generic_activation_patch"),
    "attn_out": _Kind("blocks.{layer}.hook_attn_out", ("layer", "pos"), "get_act_patch_attn_out"),
    "mlp_out": _Kind("blocks.{layer}.hook_mlp_out", ("layer", "pos"), "get_act_patch_mlp_out"),
    "z": _Kind("blocks.{layer}.attn.hook_z", ("layer", "head"), "get_act_patch_attn_head_out_all_pos"),
    "z_by_pos": _Kind(
        "blocks.{layer}.attn.hook_z", ("layer", "pos", "head"), "get_act_patch_attn_head_out_by_pos"
    ),
    **{
        f"{v}{suffix}": _Kind(f"blocks.{{layer}}.attn.hook_{v}", axes, f"get_act_patch_attn_head_{v}_{tl}")
        for v in ("q", "k", "v")
        for suffix, axes, tl in (("", ("layer", "head"), "all_pos"), ("_by_pos", ("layer", "pos", "head"), "by_pos"))
    },
    "pattern": _Kind(
        "blocks.{layer}.attn.hook_pattern", ("layer", "head"), "get_act_patch_attn_head_pattern_all_pos"
    ),
    "pattern_by_pos": _Kind(
        "blocks.{layer}.attn.hook_pattern", ("layer", "head", "pos"), "get_act_patch_attn_head_pattern_by_pos"
    ),
}
"""Supported ``hook`` values: result axes and the TransformerLens function they match.

``"z"``, ``"q"``, ``"k"``, ``"v"`` patch one head at every position (``[layer,
head]``); ``"z_by_pos"``, ``"q_by_pos"``... one head at one position (``[layer,
pos, head]``). ``"k"`` / ``"v"`` count key-value heads (``n_key_value_heads``
under grouped-query attention, as TransformerLens does). ``"pattern"`` patches
one head's whole attention pattern (``[layer, head]``); ``"pattern_by_pos"`` the
pattern row of one query (destination) position (``[layer, head, pos]``: the
head before the position, TransformerLens's ``[layer, head_index, dest_pos]``).
The TransformerLens names ``"attn_head_out_all_pos"`` and
``"attn_head_out_by_pos"`` are accepted as aliases, and every full hook name
(``"blocks.0.attn.hook_pattern"``) as its family (``"pattern"``).
"""

_ALIASES = {"attn_head_out_all_pos": "z", "attn_head_out_by_pos": "z_by_pos"}
_FULL_NAME = re.compile(r"^blocks\.\d+\.(?:attn\.)?hook_(\w+)$")


def shared_prefix_length(
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "batch pos"],
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> int:
    """Number of leading columns on which every row of clean and corrupt agree.

    Padding columns (mask 0) count as agreeing. Rows may differ at different
    columns; the batch shares the shortest of their prefixes.

    >>> shared_prefix_length(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 2, 0], [4, 0, 6]]))
    1
    """
    mask = validate_mask(corrupt_tokens, attention_mask)
    agree = (clean_tokens == corrupt_tokens) | (mask == 0)  # (B, T)
    differs = ~agree
    n_pos = agree.shape[1]
    # argmax of a bool row = its first True; rows that never differ share everything
    first = torch.where(differs.any(1), differs.long().argmax(1), torch.full_like(differs[:, 0], n_pos, dtype=torch.long))
    return int(first.min())


def _resolve(model, hook: str) -> _Kind:
    if not isinstance(hook, str):
        raise TypeError(f"hook must be a hook name such as 'resid_pre', got {type(hook).__name__} {hook!r}")
    full = _FULL_NAME.match(hook)
    if full and hook not in model.hook_dict:  # e.g. blocks.99.* on a 2-layer model: never silently its family
        select_hooks(model, [hook], kw="hook")  # raises, naming the closest hooks
    name = full.group(1) if full else _ALIASES.get(hook, hook)
    if name not in HOOKS and not full:  # a short name as Record[...] reads it ("attn" = pattern, "query" = q)
        as_tl = _FULL_NAME.match(_tl.get_act_name(hook, 0)) if hook and "." not in hook else None
        name = as_tl.group(1) if as_tl else name
    if name not in HOOKS:
        raise ValueError(
            f"hook={hook!r} is not supported; choose one of {sorted(HOOKS) + sorted(_ALIASES)} "
            "or a full TransformerLens name of one (e.g. 'blocks.0.hook_resid_pre')"
        )
    kind = HOOKS[name]
    missing = kind.hook_name.format(layer=0)
    if missing not in model.hook_dict:
        raise ValueError(
            f"hook={hook!r} needs the hook point {missing!r}, which this model does not have "
            "(attention-only and parallel-attention models have no resid_mid / mlp_out)."
        )
    return kind


def _positions(positions: Optional[Sequence[int]], n_pos: int) -> List[int]:
    if positions is None:
        return list(range(n_pos))
    if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
        raise TypeError(f"positions must be a sequence of column indices, got {type(positions).__name__} {positions!r}")
    out: list = []
    for p in positions.tolist() if isinstance(positions, torch.Tensor) else positions:
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            raise TypeError(
                f"positions holds {p!r} ({type(p).__name__}); each position is an integer column "
                f"index in [-{n_pos}, {n_pos})"
            )
        p = int(p)
        if not -n_pos <= p < n_pos:
            raise ValueError(f"positions: {p} is outside the {n_pos} columns of the tokens (pass -{n_pos}..{n_pos - 1})")
        out.append(p % n_pos)
    return out


@calls.entry
@torch.no_grad()
def patch(
    model: "_tl.HookedTransformer",
    clean_tokens: TokensLike,
    corrupt_tokens: TokensLike,
    *,
    hook: str,
    metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor],
    positions: Optional[Sequence[int]] = None,
    share_prefix: bool = True,
    progress: bool = True,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> Tensor:
    """Patch clean activations into the corrupted run, one site at a time.

    Same layout and values as TransformerLens's ``get_act_patch_*`` (with
    ``clean_cache = model.run_with_cache(clean_tokens)[1]``): entry ``[layer,
    pos]`` is ``metric(logits)`` of the corrupted run with hook ``hook`` of
    ``layer`` at column ``pos`` (every row) replaced by the clean activation.

    Args:
        model: a HookedTransformer.
        clean_tokens: ``[batch, pos]``, the run activations are copied from;
            or (model with a tokenizer) a string or list of strings, tokenized
            together with ``corrupt_tokens`` (each pair must have as many tokens).
        corrupt_tokens: ``[batch, pos]``, the run that is patched (same shape).
        hook: ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``, ``"attn_out"``,
            ``"mlp_out"`` (result ``[layer, pos]``), ``"z"`` / ``"q"`` / ``"k"`` /
            ``"v"`` (per head, all positions: ``[layer, head]``), their
            ``_by_pos`` forms (``[layer, pos, head]``), ``"pattern"``
            (``[layer, head]``) or ``"pattern_by_pos"`` (``[layer, head, pos]``);
            or a full TransformerLens name (``utils.get_act_name("resid_pre", 0)``)
            for its family. See :data:`HOOKS`.
        metric: ``logits [batch, pos, d_vocab] -> scalar`` (as in TransformerLens).
        positions: columns to patch (negative counts from the end). The ``pos``
            axis of the result follows this order; for ``"z"`` the head is
            patched at these columns together. Default: every column.
        share_prefix: run the shared prefix of clean and corrupt once into a
            cache and recompute only the suffix per patch. False recomputes the
            whole sequence (same values, for checking). When the model carries
            hooks of its own (:func:`model_hooks`) the whole sequence is
            recomputed anyway, with a :class:`SharedPrefixWarning`: a hook may
            index positions, which a prefix-sharing run would shift.
        progress: show a tqdm bar over the patch runs.
        attention_mask: ``[batch, pos]`` left-padding mask shared by clean and
            corrupt (1 = real, 0 = padding). Rows may have different padding
            and differ from corrupt at different columns.

    Returns:
        The metric per patch, in the model's dtype.

    Raises:
        ValueError: shapes differ, unknown hook, or a hook the model lacks.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("gpt2")
    >>> clean = torch.tensor([[5, 6, 7, 8, 9, 10]])
    >>> corrupt = torch.tensor([[5, 6, 7, 8, 9, 11]])
    >>> metric = lambda logits: logits[:, -1, 3].mean()
    >>> out = interpkv.patching.patch(model, clean, corrupt, hook="resid_pre", metric=metric, progress=False)
    >>> out.shape
    torch.Size([2, 6])
    """
    _tl.require_hooked(model, "interpkv.patching.patch")
    kind = _resolve(model, hook)
    if not callable(metric):
        raise TypeError(f"metric must be a function logits [batch, pos, d_vocab] -> scalar, got {type(metric).__name__}")
    clean_tokens, corrupt_tokens, mask = as_pair(model, clean_tokens, corrupt_tokens, attention_mask)
    device = corrupt_tokens.device
    batch, n_pos = corrupt_tokens.shape
    cols = _positions(positions, n_pos)
    by_pos = "pos" in kind.axes
    pattern = kind.hook_name.endswith("hook_pattern")  # [batch, head, query pos, key pos]
    kv = kind.hook_name.endswith(("hook_k", "hook_v"))
    n_heads = _tl.kv_head_count(model.cfg) if kv else model.cfg.n_heads
    layers = range(model.cfg.n_layers)

    if share_prefix:
        hooked = model_hooks(model)
        if hooked:
            warnings.warn(
                f"patch(share_prefix=True): the model carries hooks of its own on {hooked[:6]}; a hook "
                "that indexes positions (act[:, -1]) would see other columns in a prefix-sharing run, so "
                "every patch recomputes the whole sequence (as share_prefix=False). Remove them "
                "(model.reset_hooks()) to share the prefix.",
                SharedPrefixWarning,
                stacklevel=3,
            )
            share_prefix = False
    # Shared prefix, run once; at least one column is left to recompute.
    prefix = min(shared_prefix_length(clean_tokens, corrupt_tokens, mask), n_pos - 1) if share_prefix else 0
    cache = KVCache.for_model(model, batch, capacity=n_pos)
    prefix_logits: Optional[Tensor] = (
        cast(Tensor, forward(model, corrupt_tokens[:, :prefix], cache=cache, attention_mask=mask[:, :prefix]))
        if prefix
        else None
    )
    suffix_mask = mask[:, prefix:]

    def run(tokens: Tensor, fwd_hooks) -> Tensor:
        with cache.freeze():
            logits = forward(model, tokens[:, prefix:], cache=cache, attention_mask=suffix_mask, fwd_hooks=fwd_hooks)
        logits = cast(Tensor, logits)
        return logits if prefix_logits is None else torch.cat([prefix_logits, logits], dim=1)

    names = [kind.hook_name.format(layer=layer) for layer in layers]
    clean: Dict[str, Tensor] = {}

    def keep_clean(x: Tensor, hook) -> None:
        clean[hook.name] = x.clone()

    keep_clean._interpkv_observer = True  # type: ignore[attr-defined] # records only: not an intervention on the shared prefix
    run(clean_tokens, [(name, keep_clean) for name in names])
    # Patches act on suffix columns only: positions from each row's next position on (provenance).
    suffix_start = cache.next_positions.tolist()
    baseline = float(metric(run(corrupt_tokens, [])))

    # Every site: (index into the result, layer, suffix columns, head or None).
    sites = []
    for layer in layers:
        if by_pos:
            for i, col in enumerate(cols):
                for h in range(n_heads) if "head" in kind.axes else [None]:
                    axis = {"layer": layer, "pos": i, "head": h}
                    index = tuple(axis[a] for a in kind.axes)
                    sites.append((index, layer, [col - prefix] if col >= prefix else [], h))
        else:
            suffix_cols = [c - prefix for c in cols if c >= prefix]
            sites.extend(((layer, h), layer, suffix_cols, h) for h in range(n_heads))

    sizes = {"layer": model.cfg.n_layers, "pos": len(cols), "head": n_heads}
    shape = tuple(sizes[axis] for axis in kind.axes)
    dtype = model.cfg.dtype if model.cfg.dtype.is_floating_point else torch.float32
    result = torch.full(shape, baseline, dtype=dtype, device=device)  # no-op patches keep it
    todo = [site for site in sites if site[2]]
    bar = tqdm(todo, disable=not progress, desc=f"patch {hook} (shared prefix {prefix}/{n_pos})")
    for index, layer, suffix_cols, head in bar:
        source = clean[names[layer]]

        def set_clean(activation: Tensor, hook, cols=suffix_cols, head=head) -> Tensor:
            if head is None:
                activation[:, cols] = source[:, cols]
            elif pattern:  # rows of the query positions
                activation[:, head, cols] = source[:, head, cols]
            else:
                activation[:, cols, head] = source[:, cols, head]
            return activation

        declare(set_clean, "patching.patch", name=f"patch {names[layer]} cols {suffix_cols} head {head}",
                start=suffix_start)
        result[index] = float(metric(run(corrupt_tokens, [(names[layer], set_clean)])))
    return result
