"""The character vocabulary of the trained zoo models."""

import pytest
import torch

from interpkv.zoo import charvocab

CASES = [
    # (text, ids, decoded)
    ("", [], ""),
    ("\n", [0], "\n"),
    (" ", [1], " "),
    ("~", [95], "~"),
    ("def f():\n", [69, 70, 71, 1, 71, 9, 10, 27, 0], "def f():\n"),
    ("\t", [96], "\ufffd"),  # tab is not in the vocabulary
    ("café", [68, 66, 71, 96], "caf\ufffd"),
]


@pytest.mark.parametrize("text,ids,decoded", CASES, ids=[repr(c[0]) for c in CASES])
def test_encode_decode_table(text, ids, decoded):
    got = charvocab.encode(text)
    assert got.dtype == torch.long and got.shape == (len(text),)
    assert got.tolist() == ids
    assert charvocab.decode(got) == decoded
    assert charvocab.decode(ids) == decoded


def test_vocabulary_layout():
    assert charvocab.VOCAB_SIZE == 97 == len(charvocab.CHARS) + 1
    assert charvocab.UNK == 96
    every = "".join(charvocab.CHARS)
    assert charvocab.decode(charvocab.encode(every)) == every  # lossless on the vocabulary


def test_decode_accepts_one_row_and_rejects_batches():
    ids = charvocab.encode("ab")
    assert charvocab.decode(ids[None]) == "ab"
    with pytest.raises(ValueError, match="1-D.*shape \\(2, 2\\)"):
        charvocab.decode(torch.stack([ids, ids]))


@pytest.mark.parametrize("bad", [-1, 97], ids=["negative", "vocab_size"])
def test_decode_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match=f"id {bad} is outside"):
        charvocab.decode([bad])


def test_encode_rejects_non_str():
    with pytest.raises(TypeError, match="expects a str"):
        charvocab.encode(b"bytes")
