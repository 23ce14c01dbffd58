"""``Record``: activations of one run, indexed by absolute position.

A Record holds, for every captured hook point, one tensor whose position axis
is the **absolute** position of each token (see :mod:`interpkv._types`), so a
run fed in chunks through a cache and a one-shot uncached run line up entry
for entry:

- ``[batch, pos, ...]`` hooks (residuals, q/k/v, z, MLP...) keep their
  trailing axes: ``record["blocks.0.attn.hook_q"]`` is
  ``[batch, pos, head_index, d_head]``.
- attention-shaped hooks (``hook_attn_scores``, ``hook_pattern``) are
  ``[batch, head_index, pos, pos]``, query then key absolute position, however
  many chunks the key axis was assembled from.

Missing entries are NaN: positions a row does not have (left padding takes no
position, so a padded row simply has fewer), keys a query never saw (evicted,
or padding), and every key after its query (causally masked in every scheme;
a chunked run never computes them, so both kinds of run leave them NaN).
``record.valid[b, p]`` says whether row ``b`` has a token at position ``p``.
Integer hooks (``hook_tokens``) are stored as float64 so they can hold NaN.

Hooks of other shapes are put on these axes where their rows' positions are
known (Q/K norms, mixture-of-experts routing and experts; see
:mod:`interpkv.diagnostics.layouts`). A hook that fired but has no single
value per position is not recorded: ``record.skipped`` maps its name to the
reason, and every report built from the record carries it.
"""

import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["Record", "ATTENTION_HOOKS", "LOGITS", "is_attention_hook", "split_hook_name"]

ATTENTION_HOOKS = ("hook_attn_scores", "hook_pattern")
"""Hook suffixes shaped ``[batch, head_index, query pos, key pos]``."""

LOGITS = "logits"
"""Name under which a Record and a report list the model's output."""

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def is_attention_hook(name: str) -> bool:
    """Whether hook ``name`` is shaped ``[batch, head_index, pos, kv_pos]``."""
    return name.rsplit(".", 1)[-1] in ATTENTION_HOOKS


def split_hook_name(name: str) -> Tuple[Optional[int], str]:
    """``"blocks.3.attn.hook_q"`` -> ``(3, "attn.hook_q")``; ``"hook_embed"`` -> ``(None, "hook_embed")``."""
    match = _BLOCK.match(name)
    if match is None:
        return None, name
    return int(match.group(1)), match.group(2)


@dataclass
class Record:
    """Activations and logits of one run, at absolute positions.

    Attributes:
        activations: hook name -> tensor (see module docstring), in the order
            the hooks first fired during the forward pass.
        logits: ``[batch, pos, d_vocab]`` at absolute positions.
        valid: ``[batch, pos]``, True where the row has a token.
        skipped: hook name -> why it fired but was not recorded (e.g. it fires
            once per q/k/v input under ``use_split_qkv_input``).
    """

    activations: Dict[str, Tensor]
    logits: Float[Tensor, "batch pos d_vocab"]
    valid: Bool[Tensor, "batch pos"]
    meta: Dict[str, object] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)

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

    def __getitem__(self, name: str) -> Tensor:
        if name == LOGITS:
            return self.logits
        try:
            return self.activations[name]
        except KeyError:
            if name in self.skipped:
                raise KeyError(f"{name!r} was skipped: {self.skipped[name]}") from None
            raise KeyError(
                f"{name!r} was not captured; captured hooks: {', '.join(self.activations) or 'none'} "
                "(pass names=None to capture every hook)"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name == LOGITS or name in self.activations

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.activations) + 1

    def __repr__(self) -> str:
        skipped = f", {len(self.skipped)} skipped (see .skipped)" if self.skipped else ""
        return (
            f"Record({len(self.activations)} hooks + logits, batch={self.batch_size}, "
            f"positions={self.n_positions}{skipped})"
        )
