"""Put every activation on ``[batch, pos, ...]`` axes, or say why it cannot be.

Most TransformerLens hooks fire once per forward pass with ``[batch, pos,
...]`` activations; attention-shaped ones (``[batch, head_index, pos,
kv_pos]``) are handled by the capture itself. A few fire otherwise:

- Q/K norms (Qwen3, Gemma-3: ``attn.q_norm.hook_scale``, ``hook_normalized``)
  run on ``[batch * pos * head_index, d_head]``: reshaped to
  ``[batch, pos, head_index, ...]``.
- Mixture-of-experts routing (``mlp.hook_expert_weights``,
  ``mlp.hook_expert_indices``) is ``[batch * pos, ...]``: reshaped to
  ``[batch, pos, ...]``.
- Each expert's MLP hooks (``mlp.experts.{e}.hook_pre`` ...) see only the
  tokens routed to expert ``e``, ``[n_routed, d_mlp]``, in TransformerLens's
  order (top-1 choices first, then top-2, each by token). They are scattered
  back to ``[batch, pos, d_mlp]`` using the routing of the same forward pass;
  tokens not routed to ``e`` hold 0 and are not computed there:
  :meth:`Layouts.positions` gives them position -1 (like padding), so a
  Record's :meth:`~interpkv.Record.computed` leaves them out.

A hook that fires several times per forward pass (``ln1`` runs on the
query, key and value inputs in turn) keeps its last value, as TransformerLens's
``run_with_cache`` does. A hook of any other shape has no known position
axis: it is *skipped* with the reason (``Record.skipped``,
``DivergenceReport.skipped``), never recorded wrongly.
"""

import re
from typing import Dict, Union

import torch
from torch import Tensor

__all__ = ["Layouts", "ROUTING_SUFFIX", "is_routing_hook"]

ROUTING_SUFFIX = "mlp.hook_expert_indices"
"""The hook whose value says which tokens each expert saw (always observed)."""

_EXPERT = re.compile(r"^(?P<mlp>.*\.mlp)\.experts\.(?P<expert>\d+)\.hook_\w+$")
_FLAT_HEADS = re.compile(r"\.(q_norm|k_norm)\.hook_\w+$")
_FLAT_TOKENS = re.compile(r"\.mlp\.hook_expert_(weights|indices)$")


def is_routing_hook(name: str) -> bool:
    """Whether ``name`` is a mixture-of-experts routing hook (``mlp.hook_expert_indices``)."""
    return name.endswith(ROUTING_SUFFIX)


class Layouts:
    """Reshapes one capture's activations to ``[batch, pos, ...]`` (see module docstring).

    Args:
        batch: rows of the run.
    """

    def __init__(self, batch: int):
        self.batch = batch
        self._routing: Dict[str, Tensor] = {}  # "blocks.L.mlp" -> [batch*pos, k] expert ids
        self._routed: Dict[str, Tensor] = {}  # expert hook -> [batch, pos] routed to it (last call)

    def observe_routing(self, name: str, indices: Tensor) -> None:
        """Keep the expert choice of ``blocks.L.mlp`` for this forward pass."""
        self._routing[name[: -len(".hook_expert_indices")]] = indices.detach()

    def positions(self, name: str, q_pos: Tensor) -> Tensor:
        """``q_pos`` for hook ``name``'s last placed value: -1 where an expert saw no token."""
        routed = self._routed.get(name)
        if routed is None or routed.shape != q_pos.shape:
            return q_pos
        return q_pos.masked_fill(~routed.to(q_pos.device), -1)

    def to_batch_pos(self, name: str, act: Tensor, n_pos: int) -> Union[Tensor, str]:
        """``act`` as ``[batch, pos, ...]``, or the reason it cannot be placed.

        Args:
            name: hook name.
            act: the activation as the hook saw it.
            n_pos: query positions of this forward call.
        """
        batch = self.batch
        if act.ndim >= 2 and tuple(act.shape[:2]) == (batch, n_pos):
            return act
        tokens = batch * n_pos
        if _FLAT_HEADS.search(name) and act.ndim >= 1 and tokens and act.shape[0] % tokens == 0:
            return act.reshape(batch, n_pos, act.shape[0] // tokens, *act.shape[1:])
        if _FLAT_TOKENS.search(name) and act.ndim >= 1 and act.shape[0] == tokens:
            return act.reshape(batch, n_pos, *act.shape[1:])
        match = _EXPERT.match(name)
        if match is not None:
            return self._scatter_expert(name, act, match, n_pos)
        return (
            f"shape {tuple(act.shape)} does not start with [batch, pos] = {(batch, n_pos)} and "
            "interpkv does not know which position each row belongs to"
        )

    def _scatter_expert(self, name: str, act: Tensor, match, n_pos: int) -> Union[Tensor, str]:
        routing = self._routing.get(match.group("mlp"))
        tokens = self.batch * n_pos
        if routing is None or routing.shape[0] != tokens:
            return f"the routing of {match.group('mlp')} in this forward pass was not observed"
        expert = int(match.group("expert"))
        # TransformerLens's MoE: torch.where(one_hot(indices)[expert]) over [k, tokens].
        _, token = torch.where((routing == expert).T)  # (n_routed,) flat token index
        if token.shape[0] != act.shape[0]:
            return (
                f"{act.shape[0]} rows but the routing sends {token.shape[0]} tokens to expert {expert}"
            )
        full = act.new_zeros((tokens, *act.shape[1:]))
        full[token] = act
        routed = torch.zeros(tokens, dtype=torch.bool, device=act.device)
        routed[token] = True
        self._routed[name] = routed.reshape(self.batch, n_pos)
        return full.reshape(self.batch, n_pos, *act.shape[1:])  # (B, T, ...)

