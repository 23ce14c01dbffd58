"""absolute_positions / validate_mask: table-driven."""

import pytest
import torch

from interpkv.core.positions import absolute_positions, validate_mask

CASES = [
    # (mask, offsets, expected)
    ("no padding", [[1, 1, 1]], [0], [[0, 1, 2]]),
    ("offset continues", [[1, 1]], [7], [[7, 8]]),
    ("left padding", [[0, 0, 1, 1]], [0], [[-1, -1, 0, 1]]),
    ("ragged rows", [[0, 1, 1], [1, 1, 1]], [0, 0], [[-1, 0, 1], [0, 1, 2]]),
    ("per-row offsets", [[1], [1], [0]], [3, 0, 5], [[3], [0], [-1]]),
    ("padding in the middle", [[1, 0, 1]], [2], [[2, -1, 3]]),
    ("all padding", [[0, 0]], [4], [[-1, -1]]),
]


@pytest.mark.parametrize("mask,offsets,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_absolute_positions(mask, offsets, expected):
    got = absolute_positions(torch.tensor(mask), torch.tensor(offsets))
    assert got.tolist() == expected


def test_validate_mask_defaults_to_ones():
    tokens = torch.zeros(2, 5, dtype=torch.long)
    assert validate_mask(tokens, None).tolist() == [[1] * 5] * 2


def test_validate_mask_accepts_bool():
    tokens = torch.zeros(1, 2, dtype=torch.long)
    assert validate_mask(tokens, torch.tensor([[False, True]])).tolist() == [[0, 1]]


@pytest.mark.parametrize(
    "mask,message",
    [
        (torch.ones(2, 4, dtype=torch.long), r"shape \(2, 4\).*shape \(2, 5\)"),
        (torch.ones(2, 5, dtype=torch.long) * 2, "only 0 .* and 1"),
        (torch.ones(2, 5), "only 0 .* and 1"),
    ],
    ids=["wrong-shape", "value-2", "float"],
)
def test_validate_mask_errors(mask, message):
    with pytest.raises(ValueError, match=message):
        validate_mask(torch.zeros(2, 5, dtype=torch.long), mask)
