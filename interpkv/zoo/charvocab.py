"""The character vocabulary of the trained zoo models (97 ids).

Id 0 is newline, ids 1-95 are the printable ASCII characters ``" "`` (32) to
``"~"`` (126) in code-point order, and id 96 (:data:`UNK`) stands for every other
character (tabs, non-ASCII letters, ...). Decoding :data:`UNK` gives
``"\\N{REPLACEMENT CHARACTER}"``, so ``decode(encode(s)) == s`` exactly when
``s`` uses only newline and printable ASCII.

>>> from interpkv.zoo import charvocab
>>> ids = charvocab.encode("def f():\\n")
>>> ids.tolist()
[69, 70, 71, 1, 71, 9, 10, 27, 0]
>>> charvocab.decode(ids)
'def f():\\n'
>>> charvocab.decode(charvocab.encode("café"))
'caf\\ufffd'
"""

from typing import NamedTuple, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = [
    "CHARS",
    "UNK",
    "UNK_CHAR",
    "VOCAB_SIZE",
    "encode",
    "decode",
    "CharTokenizer",
    "TOKENIZER",
    "hf_tokenizer",
]

CHARS: str = "\n" + "".join(chr(c) for c in range(32, 127))
"""The characters of ids 0 .. 95, in id order."""

UNK: int = len(CHARS)
"""Id of the unknown character (96)."""

UNK_CHAR: str = "\N{REPLACEMENT CHARACTER}"
"""What :data:`UNK` decodes to."""

VOCAB_SIZE: int = len(CHARS) + 1
"""Number of ids (97): newline, 95 printable ASCII characters, unknown."""

_ID = {c: i for i, c in enumerate(CHARS)}


def encode(text: str) -> Int[Tensor, " pos"]:
    """Encode a string as one id per character.

    Args:
        text: Any string; characters outside newline + printable ASCII map to
            :data:`UNK`.

    Returns:
        A 1-D ``torch.long`` tensor of length ``len(text)``. Add a batch axis
        (``ids[None]``) before passing it to a model.
    """
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return torch.tensor([_ID.get(c, UNK) for c in text], dtype=torch.long)


def decode(ids: Union[Int[Tensor, "*rows pos"], Sequence[int]]) -> str:
    """Decode ids back to text.

    Args:
        ids: A 1-D tensor (or a ``[1, pos]`` tensor, or a list) of ids in
            ``[0, VOCAB_SIZE)``.

    Returns:
        The decoded string; :data:`UNK` becomes :data:`UNK_CHAR`.

    Raises:
        ValueError: If ``ids`` has more than one row or an id is out of range.
    """
    if isinstance(ids, Tensor):
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise ValueError(
                f"decode expects a 1-D tensor of ids (or shape [1, pos]), got shape "
                f"{tuple(ids.shape)}; decode each row separately"
            )
        ids = ids.tolist()
    out = []
    for i in ids:
        i = int(i)
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"id {i} is outside the character vocabulary [0, {VOCAB_SIZE})")
        out.append(CHARS[i] if i < UNK else UNK_CHAR)
    return "".join(out)


class CharTokenizer(NamedTuple):
    """The vocabulary as one object, returned by :func:`interpkv.zoo.tokenizer`.

    Attributes:
        encode: :func:`encode`.
        decode: :func:`decode`.
        vocab_size: :data:`VOCAB_SIZE`.
    """

    encode: object
    decode: object
    vocab_size: int


TOKENIZER = CharTokenizer(encode=encode, decode=decode, vocab_size=VOCAB_SIZE)
"""The tokenizer shared by every trained zoo model."""


def hf_tokenizer():
    """The vocabulary as a HuggingFace ``PreTrainedTokenizerFast`` (same ids as :func:`encode`).

    Built with the ``tokenizers`` library (a BPE model without merges: one
    token per character, every other character :data:`UNK`, decoded by
    concatenation), so TransformerLens's ``model.to_tokens`` / ``to_string`` /
    ``generate`` work on the trained zoo models, which carry one.

    The models were trained on random windows of text with no BOS, so they are
    loaded with ``cfg.default_prepend_bos = False``. BOS, EOS and padding are
    all :data:`UNK_CHAR` (id 96): a character prompts never contain, so
    TransformerLens's left-padding mask (leading pad ids) never eats real
    text, and ``model.generate`` stops only if the model emits an unknown
    character. Newline (id 0, the HF config's ``bos/eos_token_id``) is kept
    an ordinary character: stopping on it would end every generation after
    one line.

    Returns:
        A fresh tokenizer (TransformerLens mutates the one it is given), with
        ``padding_side="left"`` and ``clean_up_tokenization_spaces=False``.

    >>> tok = hf_tokenizer()
    >>> tok("def f():\\n")["input_ids"] == encode("def f():\\n").tolist()
    True
    >>> tok.decode(tok("a , b")["input_ids"])
    'a , b'
    """
    from tokenizers import Tokenizer, decoders, models  # deferred: tokenizers, only for hf_tokenizer
    from transformers import PreTrainedTokenizerFast  # deferred: transformers, only for hf_tokenizer

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab[UNK_CHAR] = UNK
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_CHAR))
    backend.decoder = decoders.Fuse()  # concatenate: no spaces between characters
    # No bos_token: TransformerLens's set_tokenizer sets BOS = EOS itself. An
    # in-memory tokenizer with its own BOS makes TransformerLens 3.9 reload it
    # by name (get_tokenizer_with_bos), which fails: it has no name_or_path.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_CHAR,
        eos_token=UNK_CHAR,
        pad_token=UNK_CHAR,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=int(1e30),
    )
