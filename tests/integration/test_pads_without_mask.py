"""Token tensors with pad runs and no attention_mask: the pads are padding, as TransformerLens reads them.

The trained llama's tokenizer pads on the left, so ``model.to_tokens([...])``
gives short rows a leading run of pad ids. interpkv infers the mask
TransformerLens infers (``utils.get_attention_mask``) instead of reading the
pads as text; a chunk continuing a cache is never guessed at.
"""

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.core.padding import inferred_mask


@pytest.fixture(scope="module")
def llama():
    return zoo.load("llama", trained=True)


def _padded(model):
    ids = model.to_tokens(["def add(a, b):", "x"], prepend_bos=False)
    pad = model.tokenizer.pad_token_id
    assert (ids[1, :-1] == pad).all() and ids[1, -1] != pad  # the premise: row 1 is pads then "x"
    return ids


def test_generate_continues_a_left_padded_row_as_its_text_alone(llama):
    ids = _padded(llama)
    out = interpkv.generate(llama, ids, max_new_tokens=4)
    alone = interpkv.generate(llama, ids[1:, -1:], max_new_tokens=4)
    assert torch.equal(out.new_tokens[1], alone.new_tokens[0])
    assert out.attention_mask[1, : ids.shape[1] - 1].sum() == 0


def test_forward_and_capture_read_pads_as_transformer_lens_does(llama):
    ids = _padded(llama)
    mask = inferred_mask(llama, ids)
    ours = interpkv.forward(llama, ids)
    theirs = llama(ids)  # TransformerLens infers the same mask from the tokenizer
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-4
    record = interpkv.capture(llama, ids, names="resid_post")
    assert record.valid.sum(1).tolist() == [ids.shape[1], 1]
    report = interpkv.compare(llama, ids, steps=[6, 1, ids.shape[1] - 7])
    assert report.ok()


def test_a_continuation_chunk_starting_with_the_pad_id_is_text(llama):
    pad = llama.tokenizer.pad_token_id
    cache = interpkv.KVCache.for_model(llama)
    interpkv.forward(llama, torch.tensor([[5, 6, 7]]), cache=cache)
    interpkv.forward(llama, torch.tensor([[pad, 8]]), cache=cache)
    assert cache.seq_len == 5 and cache.positions.tolist() == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize(
    "side,prepend_bos,ids,expected",
    [
        ("left", False, [[9, 9, 5, 9], [4, 9, 5, 6]], [[0, 0, 1, 1], [1, 1, 1, 1]]),
        ("left", True, [[9, 9, 5, 6], [9, 4, 5, 6]], [[0, 1, 1, 1], [1, 1, 1, 1]]),  # pad == BOS kept
        ("right", False, [[5, 9, 6, 9], [4, 5, 6, 7]], [[1, 1, 1, 0], [1, 1, 1, 1]]),
    ],
    ids=["left", "left-bos", "right"],
)
def test_inferred_mask_equals_transformer_lens(side, prepend_bos, ids, expected):
    from transformer_lens import utils

    class Tok:  # the fields get_attention_mask reads
        pad_token_id = bos_token_id = 9
        padding_side = side

    class Cfg:
        default_prepend_bos = prepend_bos

    class Model:
        tokenizer, cfg = Tok(), Cfg()

    ids = torch.tensor(ids)
    got = inferred_mask(Model(), ids)
    assert got.tolist() == expected
    assert got.tolist() == utils.get_attention_mask(Tok(), ids, prepend_bos).tolist()
