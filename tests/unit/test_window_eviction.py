"""Pure eviction rules of windowed caches (interpkv.window), table-driven."""

import pytest
import torch

from interpkv.cache.window import compact_positions, compaction_index, kept_slots, required_positions

P = -1  # padding slot


@pytest.mark.parametrize(
    "positions, next_positions, window, sinks, expected",
    [
        # no window: every real slot is kept, padding never
        ([[P, 0, 1]], [2], None, 0, [[False, True, True]]),
        # window 2, newest 4: keep p > 2
        ([[0, 1, 2, 3, 4]], [5], 2, 0, [[False, False, False, True, True]]),
        # sinks 1 keeps position 0 forever
        ([[0, 1, 2, 3, 4]], [5], 2, 1, [[True, False, False, True, True]]),
        # ragged rows drop different slots
        ([[0, 1, 2, 3], [P, P, 0, 1]], [4, 2], 2, 0, [[False, False, True, True], [False, False, True, True]]),
        # window larger than history: nothing dropped but padding
        ([[P, 0, 1]], [2], 8, 1, [[False, True, True]]),
    ],
    ids=["no-window", "window", "sinks", "ragged", "not-full"],
)
def test_kept_slots(positions, next_positions, window, sinks, expected):
    got = kept_slots(torch.tensor(positions), torch.tensor(next_positions), window, sinks)
    assert got.tolist() == expected


@pytest.mark.parametrize(
    "keep, index, real",
    [
        ([[True, True]], [[0, 1]], [[True, True]]),
        ([[False, True, False, True]], [[1, 3]], [[True, True]]),
        ([[True, False, True], [False, False, True]], [[0, 2], [1, 2]], [[True, True], [False, True]]),
        ([[False, False]], [[]], [[]]),
    ],
    ids=["all-kept", "gaps", "ragged-right-aligned", "nothing-kept"],
)
def test_compaction_index_right_aligns_kept_slots_in_order(keep, index, real):
    got_index, got_real = compaction_index(torch.tensor(keep))
    assert got_index.tolist() == index and got_real.tolist() == real


def test_compact_positions_marks_front_padding():
    positions = torch.tensor([[0, 5, 6], [P, 3, 4]])
    index, real = compaction_index(torch.tensor([[True, False, True], [False, False, True]]))
    assert compact_positions(positions, index, real).tolist() == [[0, 6], [P, 4]]


@pytest.mark.parametrize(
    "next_positions, window, sinks, limit, expected",
    [
        ([3], None, 0, 4, [[True, True, True, False]]),
        ([6], 2, 1, 6, [[True, False, False, False, True, True]]),
        ([2, 0], 2, 1, 2, [[True, True], [False, False]]),
    ],
    ids=["no-window", "window-sinks", "empty-row"],
)
def test_required_positions(next_positions, window, sinks, limit, expected):
    assert required_positions(torch.tensor(next_positions), window, sinks, limit).tolist() == expected
