"""The one input normalisation every entry point uses.

:func:`as_inputs` turns what a caller passes (token ids of any integer dtype,
``[pos]`` or ``[batch, pos]``; token embeddings ``[batch, pos, d_model]``; a
string or list of strings when the model has a tokenizer) and an optional
attention mask into ``(inputs, mask)``: inputs on the model's device (ids as
int64), mask as int64 0/1 of shape ``[batch, pos]``. Every error names what
was wrong and how to fix it.
"""

from typing import Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float, Int, Integer
from torch import Tensor

from interpkv.core.hostread import checks_on_device, host_array
from interpkv.core.padding import inferred_mask
from interpkv.core.positions import validate_mask

__all__ = ["as_inputs", "as_pair", "is_text", "TokensLike", "refuse_right_padding", "left_aligned"]

TokensLike = Union[
    str, Sequence[str], Integer[Tensor, "batch pos"], Integer[Tensor, " pos"], Float[Tensor, "batch pos d_model"]
]


def is_text(tokens) -> bool:
    """Whether ``tokens`` is a string or a non-empty list/tuple of strings."""
    return isinstance(tokens, str) or (
        isinstance(tokens, (list, tuple)) and bool(tokens) and all(isinstance(t, str) for t in tokens)
    )


def _from_text(model, text: Union[str, Sequence[str]]) -> Tuple[Tensor, Tensor]:
    if getattr(model, "tokenizer", None) is None:
        raise TypeError(
            "tokens is text but this model has no tokenizer; pass token ids [batch, pos] "
            "(or set model.tokenizer, e.g. interpkv.zoo.load(name, trained=True) carries one)"
        )
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("text input must be a string or a non-empty list of strings")
    tokens = model.to_tokens(texts, padding_side="left")  # (B, T)
    pad_id = model.tokenizer.pad_token_id
    if len(texts) == 1 or pad_id is None:
        return tokens, torch.ones_like(tokens)
    # Left padding: each row's real tokens are its last len(row) columns.
    lengths = [len(model.to_tokens(t)[0]) for t in texts]
    mask = torch.zeros_like(tokens)
    for row, n in enumerate(lengths):
        mask[row, tokens.shape[1] - n :] = 1
    return tokens, mask


def as_inputs(
    model,
    tokens: TokensLike,
    attention_mask: Optional[Tensor] = None,
    *,
    embeddings: bool = True,
    what: str = "tokens",
    infer_padding: bool = True,
) -> Tuple[Tensor, Int[Tensor, "batch pos"]]:
    """Normalise ``tokens`` and ``attention_mask`` for ``model``.

    Token ids with pad runs and no mask get the mask TransformerLens would
    infer from the model's tokenizer (:mod:`interpkv.core.padding`), unless
    ``infer_padding`` is False (a chunk continuing a cache).

    Args:
        model: a HookedTransformer.
        tokens: token ids (any integer dtype, ``[pos]`` or ``[batch, pos]``), token
            embeddings ``[batch, pos, d_model]`` (when ``embeddings``), or a string /
            list of strings (models with a tokenizer; left-padded for you).
        attention_mask: ``[batch, pos]`` or ``[pos]``, 1 = real, 0 = padding.
        embeddings: whether float embeddings are accepted.
        what: the argument's name, for error messages.
        infer_padding: infer a mask from the tokenizer's pad id when none is given.

    Returns:
        ``(inputs, mask)``: ids as int64 ``[batch, pos]`` (or embeddings) on the
        model's device, and an int64 0/1 mask ``[batch, pos]``.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("gpt2")
    >>> ids, mask = as_inputs(model, torch.tensor([1, 2, 3], dtype=torch.uint8))
    >>> ids.dtype, ids.shape, mask.tolist()
    (torch.int64, torch.Size([1, 3]), [[1, 1, 1]])
    """
    device = model.cfg.device
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor [batch, pos] of 0/1, got {type(attention_mask).__name__}; "
            "e.g. torch.tensor(mask)"
        )
    if is_text(tokens):
        ids, text_mask = _from_text(model, tokens)
        if attention_mask is None:
            attention_mask = text_mask
        return ids.to(device), validate_mask(ids, attention_mask.to(ids.device))
    if not isinstance(tokens, Tensor):
        raise TypeError(
            f"{what} must be a torch.Tensor of token ids [batch, pos] (or a string when the model "
            f"has a tokenizer), got {type(tokens).__name__}"
        )
    if tokens.is_floating_point() or tokens.is_complex():
        if not embeddings:
            raise TypeError(f"{what} must be integer token ids [batch, pos], got a {tokens.dtype} tensor")
        if tokens.ndim != 3 or tokens.shape[-1] != model.cfg.d_model:
            raise ValueError(
                f"float input must be token embeddings [batch, pos, d_model={model.cfg.d_model}], "
                f"got shape {tuple(tokens.shape)}"
            )
        inputs = tokens.to(device)
    else:
        if tokens.dtype == torch.bool:
            raise TypeError(
                f"{what} is a bool tensor; token ids must be integers (a mask goes in attention_mask=)"
            )
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(f"{what} must have shape [batch, pos], got {tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise ValueError(f"{what} has no positions (shape [batch, 0]); pass at least one token")
        _check_ids(tokens, model.cfg.d_vocab)
        inputs = tokens.to(device=device, dtype=torch.long)
    if attention_mask is not None and attention_mask.ndim == 1:
        attention_mask = attention_mask[None]
    if attention_mask is None and infer_padding and not inputs.is_floating_point():
        attention_mask = inferred_mask(model, inputs)
    return inputs, validate_mask(inputs, attention_mask)


def _check_ids(tokens: Tensor, d_vocab: int) -> None:
    """Raise unless every id lies in ``[0, d_vocab)``; read on the host (see :mod:`interpkv.core.hostread`)."""
    if not tokens.numel():
        return
    ids = host_array(tokens)
    if ids is not None:
        low, high = int(ids.min()), int(ids.max())
    elif checks_on_device(tokens):
        low, high = int(tokens.min()), int(tokens.max())  # one read per prompt
    else:
        return  # a one-position step on an accelerator: no sync (the embedding still fails)
    if low < 0 or high >= d_vocab:
        raise ValueError(f"tokens hold ids outside [0, d_vocab={d_vocab}): min {low}, max {high}")


def as_pair(
    model,
    clean: TokensLike,
    corrupt: TokensLike,
    attention_mask: Optional[Tensor] = None,
) -> Tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Normalise two prompts that must line up column for column (activation patching).

    Text is tokenized in one call (so both are left-padded to one length) and
    each clean row must have as many tokens as its corrupt row: patching copies
    column ``p`` of one run into column ``p`` of the other.

    Args:
        model: a HookedTransformer.
        clean, corrupt: token ids ``[batch, pos]`` / ``[pos]`` of the same shape, or
            two strings / equally long lists of strings (model with a tokenizer).
        attention_mask: ``[batch, pos]``, shared by both (default: from the text's
            padding, else all ones).

    Returns:
        ``(clean_ids, corrupt_ids, mask)``, int64 on the model's device.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("llama", trained=True)
    >>> a, b, mask = as_pair(model, ["the cat", "a dog"], ["the car", "a cow"])
    >>> a.shape == b.shape, mask.tolist()
    (True, [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    """
    if is_text(clean) != is_text(corrupt):
        raise TypeError(
            "clean and corrupt must both be text or both be token ids; tokenize the text one "
            "with model.to_tokens(text, padding_side='left') first"
        )
    if is_text(clean):
        a = [clean] if isinstance(clean, str) else list(clean)
        b = [corrupt] if isinstance(corrupt, str) else list(corrupt)
        if len(a) != len(b):
            raise ValueError(f"{len(a)} clean prompts but {len(b)} corrupt ones; pass one corrupt per clean")
        ids, mask = as_inputs(model, a + b, None, embeddings=False)
        n = len(a)
        differ = (mask[:n].sum(1) != mask[n:].sum(1)).nonzero().flatten().tolist()
        if differ:
            raise ValueError(
                f"prompt rows {differ} tokenize to different lengths for clean and corrupt "
                f"({mask[:n].sum(1)[differ].tolist()} vs {mask[n:].sum(1)[differ].tolist()} tokens); "
                "patching copies column p into column p, so each pair must have as many tokens "
                "(check with model.to_str_tokens)"
            )
        if attention_mask is None:
            attention_mask = mask[n:]
        return ids[:n], ids[n:], validate_mask(ids[n:], attention_mask.to(ids.device))
    a, _ = as_inputs(model, clean, None, embeddings=False, what="clean_tokens")
    b, mask = as_inputs(model, corrupt, attention_mask, embeddings=False, what="corrupt_tokens")
    if a.shape != b.shape:
        raise ValueError(
            f"clean_tokens {tuple(a.shape)} and corrupt_tokens {tuple(b.shape)} must have the same "
            "shape [batch, pos]: patching copies column p of the clean run into column p of the "
            "corrupted one (pad the shorter prompts on the left)."
        )
    return a, b, mask


def refuse_right_padding(model, tokens: Tensor) -> None:
    """Refuse ids that look right-padded when no attention_mask says which are real.

    TransformerLens's ``model.to_tokens([...])`` pads on the RIGHT by default.
    Without a mask every column counts as real, so a short row would be
    continued after its pad tokens. The pad id is often a real token too
    (GPT-2's pad is its EOS), so no mask is guessed: when some rows but not
    all end with the tokenizer's pad id, this raises, naming both fixes.

    Raises:
        ValueError: the rows end differently with the pad id.
    """
    tokenizer = getattr(model, "tokenizer", None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None or tokens.is_floating_point() or tokens.ndim != 2 or tokens.shape[0] < 2:
        return
    if getattr(tokenizer, "padding_side", "left") == "right":
        return  # trailing pads are the padding TransformerLens infers (interpkv.core.padding)
    ends = tokens[:, -1] == pad_id
    if bool(ends.any()) and not bool(ends.all()):
        raise ValueError(
            f"rows {ends.nonzero().flatten().tolist()} end with the pad id {pad_id} and others do not: "
            "these look right-padded (model.to_tokens pads right by default), and without a mask the "
            "pads would be read as real tokens. Tokenize with model.to_tokens(texts, "
            "padding_side='left'), pass the strings themselves, or pass attention_mask="
        )


def left_aligned(inputs: Tensor, mask: Int[Tensor, "batch pos"]) -> Tuple[Tensor, Int[Tensor, "batch pos"]]:
    """Each row's real tokens moved to the right end, in order (padding first).

    Padding takes no position, so this changes no computation, only the
    layout: a right-padded (or gapped) prompt becomes left-padded, and every
    row's last column is its last real token.

    >>> ids, mask = left_aligned(torch.tensor([[5, 6, 0], [7, 8, 9]]), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    >>> ids.tolist(), mask.tolist()
    ([[0, 5, 6], [7, 8, 9]], [[0, 1, 1], [1, 1, 1]])
    """
    order = torch.sort(mask, dim=1, stable=True).indices  # padding (0) first, real tokens in order
    index = order if inputs.ndim == 2 else order[..., None].expand_as(inputs)
    return inputs.gather(1, index), mask.gather(1, order)
