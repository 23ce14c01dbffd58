"""``Record``: activations of one run, laid out as TransformerLens lays them out.

A Record holds, for every captured hook point, one tensor with a position
axis. Its **layout** says what an index on that axis means
(:mod:`interpkv.diagnostics.tokenlayout`):

- ``record.layout == "tokens"`` (what :func:`interpkv.capture` and
  ``Generation.record`` return): index ``c`` is column ``c`` of the tokens
  that were run, left padding included, as in ``run_with_cache(tokens,
  attention_mask=...)``; so ``record["resid_post", -1][:, -1]`` is every row's
  last real token of a left-padded batch. ``record.positions[b, c]`` is that
  column's absolute position, ``-1`` at padding.
- ``record.layout == "absolute"`` (``capture(..., layout="absolute")``,
  :meth:`Record.absolute`): index ``p`` is absolute position ``p`` (see
  :mod:`interpkv.core.axes`), so a run fed in chunks through a cache and a
  one-shot uncached run line up entry for entry whatever their padding; a
  ragged row ends early.

Without padding the two are the same tensors. Shapes:

- ``[batch, pos, ...]`` hooks (residuals, q/k/v, z, MLP...) keep their
  trailing axes: ``record["blocks.0.attn.hook_q"]`` is
  ``[batch, pos, head_index, d_head]``.
- attention-shaped hooks (``hook_attn_scores``, ``hook_pattern``) are
  ``[batch, head_index, pos, pos]``, query then key index (column or
  absolute position), however many chunks the key axis was assembled from.

Entries read like TransformerLens's ``ActivationCache`` and are never NaN
(see :mod:`interpkv.diagnostics.assemble`): in an attention pattern a key the
query may not attend (after the query, padding, evicted, outside a local
window) is 0, and the scores hold TransformerLens's masked value there
(``attn.IGNORE``, -inf), so ``record["pattern", 0].sum(-1)`` is 1 at every
computed query, as in ``run_with_cache``. An entry that was never computed
(a padding column; an earlier position a cached run did not recompute; a
token an expert was not routed)
holds 0 and is named by an explicit mask, never by its value:
``record.valid[b, p]`` says whether row ``b`` has a token at index ``p`` in
this run (False at padding), and :meth:`Record.computed` says where a given
hook was written.
Integer hooks (``hook_tokens``) keep their dtype.

Entries are looked up as in TransformerLens's ``ActivationCache``: by full
name (``record["blocks.0.hook_resid_pre"]``), by short name and layer
(``record["resid_pre", 0]``, ``record["pattern", 1]``, ``record["q", -1]``,
resolved by ``transformer_lens.utils.get_act_name``), and
:meth:`Record.to_activation_cache` hands the whole record to TransformerLens.

Hooks of other shapes are put on these axes where their rows' positions are
known (Q/K norms, mixture-of-experts routing and experts; see
:mod:`interpkv.diagnostics.layouts`). A hook that fired but has no single
value per position is not recorded: ``record.skipped`` maps its name to the
reason, and every report built from the record carries it.
"""

import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interpkv.core import tl as _tl
from interpkv.core.axes import ATTENTION_HOOKS, is_attention_hook
from interpkv.diagnostics import tokenlayout

__all__ = ["Record", "ATTENTION_HOOKS", "LOGITS", "is_attention_hook", "split_hook_name"]

LOGITS = "logits"
"""Name under which a Record and a report list the model's output."""

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def split_hook_name(name: str) -> Tuple[Optional[int], str]:
    """``"blocks.3.attn.hook_q"`` -> ``(3, "attn.hook_q")``; ``"hook_embed"`` -> ``(None, "hook_embed")``."""
    match = _BLOCK.match(name)
    if match is None:
        return None, name
    return int(match.group(1)), match.group(2)


@dataclass
class Record:
    """Activations and logits of one run (see the module docstring for the layouts).

    Attributes:
        activations: hook name -> tensor (see module docstring), in the order
            the hooks first fired during the forward pass.
        logits: ``[batch, pos, d_vocab]``, on the same position axis.
        valid: ``[batch, pos]``, True where the row has a token this run
            computed (False at padding).
        skipped: hook name -> why it fired but was not recorded (e.g. it fires
            once per q/k/v input under ``use_split_qkv_input``).
        computed_masks: hook name -> ``[batch, pos]`` bool, where the hook was
            written (query rows for attention hooks); read it through
            :meth:`computed`, which falls back to ``valid``.
        layout: ``"tokens"`` or ``"absolute"`` (module docstring).
        positions: ``[batch, pos]`` absolute position of each index, ``-1``
            at padding (token layout; None in the absolute layout, where the
            index is the position).
    """

    activations: Dict[str, Tensor]
    logits: Float[Tensor, "batch pos d_vocab"]
    valid: Bool[Tensor, "batch pos"]
    meta: Dict[str, object] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    computed_masks: Dict[str, Tensor] = field(default_factory=dict, repr=False)
    layout: str = tokenlayout.ABSOLUTE
    positions: Optional[Tensor] = field(default=None, repr=False)

    def __post_init__(self):
        tokenlayout.check_layout(self.layout)
        if self.layout == tokenlayout.TOKENS and self.positions is None:
            raise ValueError("a token-layout Record needs positions (absolute position of each column)")

    @property
    def padding(self) -> Bool[Tensor, "batch pos"]:
        """``[batch, pos]``, True at padding columns (no token); always False in the absolute layout."""
        if self.positions is None:
            return torch.zeros_like(self.valid)
        return self.positions < 0

    def absolute(self) -> "Record":
        """This Record in the absolute layout: index ``p`` is absolute position ``p`` in every row.

        A run fed in chunks through a cache and an uncached one then line up
        whatever their padding (:func:`interpkv.diff` compares that way). A
        ragged row ends early: entries after its last position hold the fill.
        Shares the tensors when there is no padding.

        >>> import interpkv, torch
        >>> model = interpkv.zoo.load("gpt2")
        >>> record = interpkv.capture(model, torch.tensor([[0, 4, 5], [1, 2, 3]]),
        ...                           attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
        >>> record.positions.tolist(), record.absolute().valid.tolist()
        ([[-1, 0, 1], [0, 1, 2]], [[True, True, False], [True, True, True]])
        """
        if self.layout == tokenlayout.ABSOLUTE:
            return self
        return tokenlayout.to_absolute(self)

    @property
    def order(self) -> List[str]:
        """Hook names in forward (firing) order, ``"logits"`` last."""
        return [*self.activations, LOGITS]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def n_positions(self) -> int:
        return self.valid.shape[1]

    def computed(self, *key) -> Bool[Tensor, "batch pos"]:
        """Where an entry was computed: ``[batch, pos]`` bool (query positions for attention hooks).

        Values elsewhere are the fill of :mod:`interpkv.diagnostics.assemble`
        (0, or -inf scores), not measurements: reduce over this mask.

        Args:
            key: as for ``record[...]``: ``computed("blocks.0.hook_resid_pre")``,
                ``computed("resid_pre", 0)``.

        >>> import interpkv, torch
        >>> model = interpkv.zoo.load("gpt2")
        >>> record = interpkv.capture(model, torch.tensor([[1, 2, 3], [0, 4, 5]]),
        ...                           attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))
        >>> record.computed("resid_pre", 0).tolist()
        [[True, True, True], [False, True, True]]
        >>> sums = record["pattern", 0].sum(-1).transpose(1, 2)  # [batch, query pos, head]
        >>> bool(torch.allclose(sums[record.computed("pattern", 0)], torch.tensor(1.0)))
        True
        """
        name = self._name(key[0] if len(key) == 1 else tuple(key))
        self[name]  # KeyError naming what was captured
        return self.computed_masks.get(name, self.valid)

    def __getitem__(self, key: Union[str, Tuple]) -> Tensor:
        """An entry by full hook name, or as ``ActivationCache`` resolves keys.

        Args:
            key: a full name (``"blocks.0.attn.hook_pattern"``, ``"logits"``), a
                short one (``"embed"``), or ``(name, layer[, layer_type])`` as
                ``transformer_lens.utils.get_act_name`` takes them; a negative
                layer counts from the last.

        >>> import interpkv, torch
        >>> record = interpkv.capture(interpkv.zoo.load("gpt2"), torch.arange(5))
        >>> record["resid_pre", 0] is record["blocks.0.hook_resid_pre"]
        True
        >>> record["pattern", -1].shape
        torch.Size([1, 4, 5, 5])
        """
        name = self._name(key)
        if name == LOGITS:
            return self.logits
        try:
            return self.activations[name]
        except KeyError:
            if name in self.skipped:
                raise KeyError(f"{name!r} was skipped: {self.skipped[name]}") from None
            raise KeyError(
                f"{key!r} ({name!r}) was not captured; captured hooks: "
                f"{', '.join(self.activations) or 'none'} (pass names=None to capture every hook)"
            ) from None

    def _name(self, key) -> str:
        if isinstance(key, str):
            if key == LOGITS or key in self.activations:
                return key
            return _tl.get_act_name(key)
        if not isinstance(key, tuple) or not key or not isinstance(key[0], str):
            raise KeyError(f"Record keys are hook names or (name, layer) tuples, got {key!r}")
        if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
            n_layers = self.meta.get("n_layers")
            if n_layers is None:
                raise KeyError(f"{key!r}: a negative layer needs the model's n_layers, not recorded here")
            key = (key[0], n_layers + key[1], *key[2:])
        return _tl.get_act_name(*key)

    def __contains__(self, key) -> bool:
        try:
            name = self._name(key)
        except (KeyError, ValueError, AssertionError):
            return False
        return name == LOGITS or name in self.activations

    def to_activation_cache(self, model) -> "_tl.ActivationCache":
        """These activations as a TransformerLens ``ActivationCache`` for ``model``.

        Its tools then work on a capture, chunked and cached or not:
        ``accumulated_resid``, ``decompose_resid``, ``stack_activation``,
        ``logit_attrs``... Entries keep the Record's layout: in the default
        token layout that is ``run_with_cache(tokens, attention_mask=...)``'s
        for the same (ragged, left-padded) tokens, ``[batch, pos, ...]`` and
        ``[batch, head_index, query_pos, key_pos]`` for ``hook_pattern`` /
        ``hook_attn_scores``, so ``pos_slice=-1`` is every row's last token.

        Entries hold what ``run_with_cache`` holds where a query may not look
        (0 pattern, -inf scores); at padding columns (``record.padding``) and
        positions this run never computed they hold 0 where TransformerLens
        would hold the value it computed for a pad token, which no real token
        reads. :meth:`computed` names the computed entries. The tensors are
        shared, not copied; logits are not part of an ``ActivationCache``.

        Args:
            model: the HookedTransformer the record was captured from.

        Returns:
            A ``transformer_lens.ActivationCache`` (with a batch dimension).

        >>> import interpkv, torch
        >>> model = interpkv.zoo.load("gpt2")
        >>> record = interpkv.capture(model, torch.arange(6)[None], steps=[4, 1, 1])
        >>> resid = record.to_activation_cache(model).accumulated_resid()
        >>> resid.shape  # [n_layers + 1, batch, pos, d_model]
        torch.Size([3, 1, 6, 64])
        """
        return _tl.ActivationCache(dict(self.activations), model, has_batch_dim=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.activations) + 1

    def __repr__(self) -> str:
        skipped = f", {len(self.skipped)} skipped (see .skipped)" if self.skipped else ""
        return (
            f"Record({len(self.activations)} hooks + logits, batch={self.batch_size}, "
            f"positions={self.n_positions}, layout={self.layout!r}{skipped})"
        )

    def _repr_html_(self) -> str:
        from interpkv._repr import html_summary, short_list

        families: Dict[str, List] = {}
        for name, tensor in self.activations.items():
            layer, family = split_hook_name(name)
            entry = families.setdefault(family, [family, 0, list(tensor.shape)])
            entry[1] += layer is not None
        rows = [[family, layers or "-", str(shape)] for family, layers, shape in families.values()]
        rows.append([LOGITS, "-", str(list(self.logits.shape))])
        fields = [
            ("hooks", f"{len(self.activations)} + logits"),
            ("batch", self.batch_size),
            ("positions", self.n_positions),
            ("layout", self.layout),
            ("real tokens per row", short_list(self.valid.sum(dim=1).tolist())),
        ]
        return html_summary("Record", fields, (["hook family", "layers", "shape"], rows))
