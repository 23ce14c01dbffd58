"""The two layouts of a Record's position axis: by token column (default) and by absolute position.

TransformerLens users index activations by the columns of the tokens they
ran: ``run_with_cache(tokens, attention_mask=...)`` on a left-padded batch
puts every row's last real token in the last column, so ``cache["resid_post",
-1][:, -1]`` is each row's last token. A Record uses the same rule by default
(``layout="tokens"``):

- column ``c`` of row ``b`` is column ``c`` of the tokens that were run
  (the ``tokens`` given to :func:`interpkv.capture`, or ``Generation.tokens``);
- when the run continued a cache that already held positions, those come
  first, as columns of their own, left-padded to the longest row's history
  (so the last ``tokens.shape[1]`` columns still line up with the tokens);
- padding columns are marked, never guessed from values: ``record.positions[b, c]``
  is ``-1`` there (else the absolute position of the column's token),
  ``record.valid[b, c]`` is False, and entries hold the fill of
  :mod:`interpkv.diagnostics.assemble` (0, ``-inf`` attention scores). In
  attention hooks both axes are columns: ``[batch, head_index, query_col, key_col]``.

For a rectangular batch (no padding, or the same padding and history in every
row) the two layouts coincide and nothing is copied.

The *absolute* layout (``layout="absolute"``, :meth:`Record.absolute`) puts
position ``p`` of every row at index ``p``: a chunked cached run and an
uncached one line up entry for entry whatever their padding, which is what
:func:`interpkv.diff` and :func:`interpkv.compare` read. A ragged row there
ends early (zeros after its last token), so ``[:, -1]`` is not its last token.
"""

from typing import Optional

import torch
from jaxtyping import Int
from torch import Tensor

from interpkv.core.axes import PAD_POSITION, fill_value, is_attention_hook

__all__ = ["LAYOUTS", "TOKENS", "ABSOLUTE", "column_positions", "to_columns", "to_absolute", "check_layout"]

TOKENS = "tokens"
"""Layout name: the position axis is the columns of the tokens run (left padding included)."""

ABSOLUTE = "absolute"
"""Layout name: index ``p`` of the position axis is absolute position ``p`` in every row."""

LAYOUTS = (TOKENS, ABSOLUTE)


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(
            f"layout={layout!r}: use 'tokens' (columns of the tokens run, as run_with_cache) "
            "or 'absolute' (index = absolute position)"
        )
    return layout


def column_positions(
    token_positions: Int[Tensor, "batch pos"], history: Optional[Int[Tensor, " batch"]] = None
) -> Int[Tensor, "batch col"]:
    """Absolute position of every column of the token layout, ``-1`` for padding.

    Args:
        token_positions: absolute positions of the tokens run, column by column
            (``-1`` for padding), as :func:`interpkv.core.positions.absolute_positions` gives.
        history: positions each row already held in a cache before the run
            (None: none); they become leading columns, left-padded.

    >>> column_positions(torch.tensor([[-1, 0, 1], [0, 1, 2]]))
    tensor([[-1,  0,  1],
            [ 0,  1,  2]])
    >>> column_positions(torch.tensor([[2, 3], [1, 2]]), torch.tensor([2, 1]))
    tensor([[ 0,  1,  2,  3],
            [-1,  0,  1,  2]])
    """
    token_positions = token_positions.long()
    if history is None:
        return token_positions
    history = history.to(token_positions.device).long()
    width = int(history.max()) if history.numel() else 0
    past = torch.arange(width, device=token_positions.device)[None, :] - (width - history)[:, None]  # (B, H)
    past = past.masked_fill(past < 0, PAD_POSITION)
    return torch.cat([past, token_positions], dim=1)


def _identity(positions: Tensor, n_positions: int) -> bool:
    return positions.shape[1] == n_positions and bool(
        (positions == torch.arange(n_positions, device=positions.device)).all()
    )


def _gather_pos(full: Tensor, positions: Tensor, fill: float) -> Tensor:
    """``out[b, c] = full[b, positions[b, c]]`` (``fill`` where ``positions < 0``)."""
    out = full.new_full((full.shape[0], positions.shape[1], *full.shape[2:]), fill)
    rows, cols = (positions >= 0).nonzero(as_tuple=True)
    out[rows, cols] = full[rows, positions[rows, cols]]
    return out


def _gather_attention(full: Tensor, positions: Tensor, fill: float) -> Tensor:
    """``out[b, h, qc, kc] = full[b, h, positions[b, qc], positions[b, kc]]`` (``fill`` at padding)."""
    n_cols = positions.shape[1]
    out = full.new_full((full.shape[0], full.shape[1], n_cols, n_cols), fill)
    for b in range(full.shape[0]):
        cols = (positions[b] >= 0).nonzero(as_tuple=True)[0]
        pos = positions[b, cols]
        out[b][:, cols[:, None], cols[None, :]] = full[b][:, pos[:, None], pos[None, :]]  # (H, n, n)
    return out


def _scatter_pos(part: Tensor, positions: Tensor, n_positions: int, fill: float) -> Tensor:
    out = part.new_full((part.shape[0], n_positions, *part.shape[2:]), fill)
    rows, cols = (positions >= 0).nonzero(as_tuple=True)
    out[rows, positions[rows, cols]] = part[rows, cols]
    return out


def _scatter_attention(part: Tensor, positions: Tensor, n_positions: int, fill: float) -> Tensor:
    out = part.new_full((part.shape[0], part.shape[1], n_positions, n_positions), fill)
    for b in range(part.shape[0]):
        cols = (positions[b] >= 0).nonzero(as_tuple=True)[0]
        pos = positions[b, cols]
        out[b][:, pos[:, None], pos[None, :]] = part[b][:, cols[:, None], cols[None, :]]
    return out


def to_columns(record, positions: Int[Tensor, "batch col"]):
    """An absolute-layout Record laid out by token columns (see the module docstring).

    Args:
        record: a Record in the absolute layout.
        positions: :func:`column_positions` of the run.
    """
    Record = type(record)  # the Record class, without importing record (which imports this module)

    positions = positions.to(record.valid.device).long()
    n_positions = record.n_positions
    if _identity(positions, n_positions):
        return Record(
            record.activations, record.logits, record.valid, record.meta, skipped=record.skipped,
            computed_masks=record.computed_masks, layout=TOKENS, positions=positions,
        )
    if positions.numel() and int(positions.max()) >= n_positions:
        raise ValueError(
            f"column positions reach {int(positions.max())} but the record has {n_positions} positions"
        )
    acts = {}
    for name in list(record.activations):
        full = record.activations[name]
        gather = _gather_attention if is_attention_hook(name) else _gather_pos
        acts[name] = gather(full, positions, fill_value(name))
    logits = _gather_pos(record.logits, positions, 0.0)
    valid = _gather_pos(record.valid, positions, False)
    masks = {n: _gather_pos(m, positions, False) for n, m in record.computed_masks.items()}
    return Record(
        acts, logits, valid, dict(record.meta), skipped=dict(record.skipped), computed_masks=masks,
        layout=TOKENS, positions=positions,
    )


def to_absolute(record):
    """A token-layout Record laid out by absolute position (index ``p`` = position ``p``)."""
    Record = type(record)  # the Record class, without importing record (which imports this module)

    positions = record.positions
    n_positions = int(positions.max()) + 1 if positions.numel() else 0
    if _identity(positions, n_positions):
        return Record(
            record.activations, record.logits, record.valid, record.meta, skipped=record.skipped,
            computed_masks=record.computed_masks, layout=ABSOLUTE,
        )
    acts = {}
    for name, part in record.activations.items():
        scatter = _scatter_attention if is_attention_hook(name) else _scatter_pos
        acts[name] = scatter(part, positions, n_positions, fill_value(name))
    logits = _scatter_pos(record.logits, positions, n_positions, 0.0)
    valid = _scatter_pos(record.valid, positions, n_positions, False)
    masks = {n: _scatter_pos(m, positions, n_positions, False) for n, m in record.computed_masks.items()}
    return Record(
        acts, logits, valid, dict(record.meta), skipped=dict(record.skipped), computed_masks=masks,
        layout=ABSOLUTE,
    )
