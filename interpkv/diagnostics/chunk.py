"""Query and key positions of the chunk a capture is running (see :mod:`interpkv.diagnostics.capture`).

Absolute positions are the capture's own, never read back from the run: a
faulty run (``interpkv.faults``) that misplaces its tokens is still recorded at
the positions the tokens really have.
"""

from typing import Optional

import torch
from torch import Tensor

from interpkv.cache.kvcache import KVCache

__all__ = ["Chunk"]


class Chunk:
    """Query and key positions of the chunk being run, as this capture knows them.

    A stored slot is identified by its id (:attr:`KVCache.slot_ids`), which
    follows it when a windowed cache evicts and compacts. ``table[b, id]`` is
    the position this capture assigned to the slot it appended with that id;
    slots it did not append (a cache passed in with history, slots a fault
    added) take the position the cache gives them.
    """

    _UNKNOWN = -2

    def __init__(self, cache: Optional[KVCache], batch: int, device):
        self.cache = cache
        width = cache.appended if cache is not None else 0
        self.table = torch.full((batch, width), self._UNKNOWN, dtype=torch.long, device=device)
        self.q_pos = self.table[:, :0]
        self._k_pos: Optional[Tensor] = None

    def begin(self, q_pos: Tensor) -> None:
        self.q_pos = q_pos
        self._k_pos = None

    def key_positions(self) -> Tensor:
        """Stored slots' positions, then the new tokens' (read while the chunk runs)."""
        if self._k_pos is None:
            stored = self.q_pos[:, :0]
            if self.cache is not None and self.cache.seq_len:
                ids = self.cache.slot_ids  # (B, S): the slots stored before this chunk
                known = (ids >= 0) & (ids < self.table.shape[1])
                mine = self.table.gather(1, torch.where(known, ids, torch.zeros_like(ids)))
                mine = torch.where(known, mine, torch.full_like(mine, self._UNKNOWN))
                stored = torch.where(mine == self._UNKNOWN, self.cache.positions, mine)
            self._k_pos = torch.cat([stored, self.q_pos], dim=1)  # (B, S)
        return self._k_pos

    def end(self) -> None:
        """Remember the positions of the slots this chunk appended (none if frozen)."""
        if self.cache is None:
            return
        appended, width = self.cache.appended, self.table.shape[1]
        if appended == width:
            return
        n = self.q_pos.shape[1]
        grown = self.table.new_full((self.table.shape[0], appended), self._UNKNOWN)
        grown[:, :width] = self.table
        grown[:, appended - n :] = self.q_pos
        self.table = grown
