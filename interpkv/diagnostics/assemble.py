"""Activations placed into preallocated ``[batch, pos, ...]`` buffers at absolute positions.

An :class:`Assembler` owns one buffer per hook, allocated once (when the hook
first fires) at the full size of the run, ``[batch, n_positions, ...]``, or
``[batch, head_index, n_positions, n_positions]`` for attention-shaped hooks.
Every later forward call writes its slice into it; nothing is concatenated
and no per-call copy is kept. :func:`interpkv.capture` uses one for a
(chunked) run, :func:`interpkv.generate` one for a whole generation.

Entries read like TransformerLens's ``ActivationCache``, never NaN:

- an attention pattern is 0 for every key its query may not attend (after
  the query, padding, evicted, outside a local window), and the scores hold
  TransformerLens's masked value there (:data:`MASKED_SCORE`, its
  ``attn.IGNORE``), as ``run_with_cache`` stores them;
- a position that was never computed (a row shorter than the longest, a
  token a mixture-of-experts expert was not routed) holds 0 in position
  hooks (0 pattern rows, ``MASKED_SCORE`` score rows) and is named by the
  explicit mask :meth:`Assembler.computed`, which becomes
  :meth:`~interpkv.diagnostics.record.Record.computed`.
"""

from typing import Dict, Optional

import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = ["Assembler", "MASKED_SCORE", "fill_value", "attention_rows"]

MASKED_SCORE = float("-inf")
"""``hook_attn_scores`` where a key is masked: TransformerLens's ``attn.IGNORE`` (``-inf``)."""


def fill_value(name: str) -> float:
    """What ``run_with_cache`` holds where hook ``name`` has no value: ``MASKED_SCORE`` for scores, else 0.

    >>> fill_value("blocks.0.attn.hook_attn_scores"), fill_value("blocks.0.attn.hook_pattern")
    (-inf, 0.0)
    """
    return MASKED_SCORE if name.endswith("hook_attn_scores") else 0.0


def attention_rows(
    act: Tensor,
    q_pos: Int[Tensor, "batch pos"],
    k_pos: Int[Tensor, "batch kv_pos"],
    n_positions: int,
    row: int,
    fill: float = 0.0,
):
    """Row ``row`` of a ``[batch, head_index, pos, kv_pos]`` activation with keys at absolute positions.

    Args:
        act: the activation as the hook saw it (keys in slot order).
        q_pos, k_pos: absolute positions of its queries and key slots (-1: padding).
        n_positions: length of the absolute key axis.
        row: the batch row.
        fill: the value of keys the query may not attend (:func:`fill_value`).

    Returns:
        ``(positions, rows)``: the absolute positions of the row's real
        queries ``[n]`` and ``[head_index, n, n_positions]`` values, ``fill``
        for keys not stored (padding, evicted) and for keys after their query.
    """
    q_abs, k_abs = q_pos[row], k_pos[row]
    if bool((q_abs >= 0).all()) and bool((k_abs >= 0).all()):
        src = act[row]  # no padding, nothing evicted: no gathers (an uncached run at 1,024 tokens)
    else:
        q_index = (q_abs >= 0).nonzero(as_tuple=True)[0]
        k_index = (k_abs >= 0).nonzero(as_tuple=True)[0]
        q_abs, k_abs = q_abs[q_index], k_abs[k_index]
        src = act[row][:, q_index][:, :, k_index]  # (H, nq, nk)
    future = k_abs[None, None, :] > q_abs[None, :, None]
    src = src.masked_fill(future, fill)
    n_k = k_abs.shape[0]
    if n_k == n_positions and bool((k_abs == torch.arange(n_k, device=k_abs.device)).all()):
        return q_abs, src  # keys already at their absolute positions (H, nq, P)
    rows = src.new_full((src.shape[0], src.shape[1], n_positions), fill)
    rows[:, :, k_abs] = src  # (H, nq, P)
    return q_abs, rows


class Assembler:
    """Preallocated buffers for one run's activations (see module docstring).

    Args:
        batch: rows of the run.
        n_positions: length of the absolute position axis (every position
            any call of the run may write).
        keep_logits: False: logits are not kept (the Record's are
            ``[batch, pos, 0]``): they are the largest entry of a whole-generation
            capture (``d_vocab`` floats per position).
    """

    def __init__(self, batch: int, n_positions: int, keep_logits: bool = True):
        self.batch, self.n_positions = batch, n_positions
        self.keep_logits = keep_logits
        self.buffers: Dict[str, Tensor] = {}
        self._computed: Dict[str, Tensor] = {}
        self.logits: Optional[Tensor] = None

    def _buffer(self, name: str, act: Tensor, shape) -> Tensor:
        full = self.buffers.get(name)
        # Within the first call (no logits yet) a hook firing again with another shape
        # replaces its first value, as run_with_cache keeps the last (ln1 on GQA's split
        # q/k/v inputs); later calls must match the buffer.
        if full is None or (self.logits is None and full.shape != shape):
            full = torch.full(shape, fill_value(name), dtype=act.dtype, device=act.device)
            self.buffers[name] = full
            self._computed[name] = torch.zeros(
                self.batch, self.n_positions, dtype=torch.bool, device=act.device
            )
        return full

    def _check(self, name: str, q_pos: Tensor) -> None:
        if q_pos.numel() and int(q_pos.max()) >= self.n_positions:
            raise ValueError(
                f"{name}: position {int(q_pos.max())} is past the {self.n_positions} positions "
                "this run allocated; allocate n_positions for every position the run writes"
            )

    def put(self, name: str, act: Tensor, q_pos: Int[Tensor, "batch pos"]) -> None:
        """Write a ``[batch, pos, ...]`` activation at its real tokens' positions (``q_pos >= 0``)."""
        self._check(name, q_pos)
        full = self._buffer(name, act, (self.batch, self.n_positions, *act.shape[2:]))
        rows, cols = (q_pos >= 0).nonzero(as_tuple=True)
        full[rows, q_pos[rows, cols]] = act[rows, cols].to(full.dtype)
        self._computed[name][rows, q_pos[rows, cols]] = True

    def put_attention(
        self, name: str, act: Tensor, q_pos: Int[Tensor, "batch pos"], k_pos: Int[Tensor, "batch kv_pos"]
    ) -> None:
        """Write a ``[batch, head_index, pos, kv_pos]`` activation: its query rows, keys by position."""
        self._check(name, q_pos)
        P = self.n_positions
        full = self._buffer(name, act, (self.batch, act.shape[1], P, P))
        fill = fill_value(name)
        for b in range(self.batch):
            # A query position belongs to exactly one call: its whole row is written here.
            q_abs, rows = attention_rows(act, q_pos, k_pos, P, b, fill)
            full[b][:, q_abs] = rows.to(full.dtype)
            self._computed[name][b, q_abs] = True

    def put_logits(self, logits: Tensor, q_pos: Int[Tensor, "batch pos"]) -> None:
        if not self.keep_logits:
            return
        self._check("logits", q_pos)
        if self.logits is None:
            self.logits = logits.new_zeros((self.batch, self.n_positions, logits.shape[-1]))
        rows, cols = (q_pos >= 0).nonzero(as_tuple=True)
        self.logits[rows, q_pos[rows, cols]] = logits[rows, cols].to(self.logits.dtype)

    def drop(self, name: str) -> None:
        """Forget ``name`` (it was skipped)."""
        self.buffers.pop(name, None)
        self._computed.pop(name, None)

    def computed(self, name: str) -> Bool[Tensor, "batch pos"]:
        """Where hook ``name`` was written (for attention hooks: which query rows)."""
        return self._computed[name]

    def record(self, valid: Bool[Tensor, "batch pos"], meta: dict, skipped: Dict[str, str]):
        """The buffers as a :class:`~interpkv.diagnostics.record.Record` (shared, not copied)."""
        from interpkv.diagnostics.record import Record

        logits = self.logits
        if logits is None:
            logits = torch.zeros(self.batch, self.n_positions, 0, device=valid.device)
        masks = {n: m for n, m in self._computed.items() if not torch.equal(m, valid)}
        return Record(dict(self.buffers), logits, valid, meta, skipped=dict(skipped), computed_masks=masks)
