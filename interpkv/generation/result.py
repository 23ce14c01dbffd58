"""Results of generation: ``Generation`` (one run) and ``GenerationDiff`` (two runs compared).

``GenerationDiff`` holds the per-step agreement of two generations of the same prompt.

Produced by ``interpkv.compare_generation`` (cached vs uncached greedy
generation) and consumed by :func:`interpkv.plot.generation`. It is a plain
dataclass so any generation loop can build one, most simply from the logits
of each step with :meth:`GenerationDiff.from_step_logits`.
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interpkv.diagnostics.record import Record
from interpkv.tolerances import DEFAULT_ATOL

__all__ = ["Generation", "GenerationDiff"]


@dataclass
class Generation:
    """The result of :func:`generate`.

    Attributes:
        tokens: ``Int[Tensor, "batch prompt+new"]``: the prompt followed by the
            generated tokens. For an embedding prompt there are no prompt ids,
            so it holds only the generated tokens (``prompt_length == 0``).
        attention_mask: same shape as ``tokens``: 1 for real tokens, 0 for the
            prompt's left padding and for the pad value written after a row
            stopped.
        prompt_length: number of leading columns of ``tokens`` that are prompt.
        finished: ``Bool[Tensor, "batch"]``: rows that emitted a stop token.
        logits: ``Float[Tensor, "batch new d_vocab"]``, the logits each new token
            was chosen from (only with ``keep_logits=True``, else None).
        records: one :class:`~interpkv.diagnostics.record.Record` per step when ``capture``
            was given (else None): the captured hook points and the logits of
            that step's new tokens, at their absolute positions (earlier
            positions are NaN; ``record.valid`` marks the step's tokens).
        tokenizer: the model's tokenizer at generation time (None without one),
            which :attr:`text` and :attr:`new_text` decode with.
        single: the prompt was one string or one ``[pos]`` row of ids (or a
            one-row cache was continued): :attr:`text` is then a ``str``.
    """

    tokens: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    prompt_length: int
    finished: Bool[Tensor, "batch"]
    logits: Optional[Float[Tensor, "batch new d_vocab"]] = None
    records: Optional[List[Record]] = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    single: bool = False

    @property
    def new_tokens(self) -> Int[Tensor, "batch new"]:
        """Only the generated tokens."""
        return self.tokens[:, self.prompt_length :]

    @property
    def text(self) -> Union[str, List[str]]:
        """Prompt and generated tokens decoded, without padding.

        Its shape follows the prompt: a ``str`` for a single string (or
        ``[pos]`` ids, or a one-row cache continued), else a list with one
        string per row (also for a list holding one string). Padding (the
        prompt's left padding, the pad written after a row stopped) is left
        out; a stop token is kept. An embedding prompt has no ids, so only the
        generated text is there.

        Raises:
            ValueError: the model had no tokenizer.

        >>> import interpkv
        >>> model = interpkv.zoo.load("gpt2", trained=True)
        >>> out = interpkv.generate(model, ["def ", "Return the"], max_new_tokens=3)
        >>> len(out.text), out.text[1].startswith("Return the"), len(out.text[1])
        (2, True, 13)
        """
        return self._decode(self.tokens, self.attention_mask)

    @property
    def new_text(self) -> Union[str, List[str]]:
        """Only the generated tokens decoded (same shape rules as :attr:`text`)."""
        return self._decode(self.new_tokens, self.attention_mask[:, self.prompt_length :])

    def _decode(self, tokens: Tensor, mask: Tensor) -> Union[str, List[str]]:
        if self.tokenizer is None:
            raise ValueError(
                "this generation has no tokenizer (the model had none): decode .tokens yourself "
                "(e.g. interpkv.zoo.charvocab.decode), or set one with model.set_tokenizer(...)"
            )
        rows = [
            self.tokenizer.decode(row[keep == 1].tolist(), clean_up_tokenization_spaces=False)
            for row, keep in zip(tokens, mask)
        ]
        return rows[0] if self.single and len(rows) == 1 else rows


@dataclass
class GenerationDiff:
    """Per generated step: how far run ``a`` is from reference ``b``.

    All lists have one entry per generated step (step 0 is the first new
    token), each reduced over the batch by its worst row.

    Attributes:
        logits_max_abs: ``max |a - b|`` over the step's logits.
        kl: ``KL(softmax(b) || softmax(a))`` of the step's next-token
            distribution (largest over rows).
        top1_agree: True when every row's argmax token is the same in both.
        first_divergent_step: first step whose ``logits_max_abs`` exceeds
            ``atol`` or whose top-1 tokens differ; None if there is none.
        atol: the tolerance ``first_divergent_step`` was computed with.
        tokens_a, tokens_b: optional generated tokens ``[batch, steps]``.
    """

    logits_max_abs: List[float]
    kl: List[float]
    top1_agree: List[bool]
    first_divergent_step: Optional[int]
    atol: float = DEFAULT_ATOL
    tokens_a: Optional[Tensor] = field(default=None, repr=False)
    tokens_b: Optional[Tensor] = field(default=None, repr=False)

    def __post_init__(self):
        n = len(self.logits_max_abs)
        if len(self.kl) != n or len(self.top1_agree) != n:
            raise ValueError(
                f"per-step lists differ in length: logits_max_abs {n}, kl {len(self.kl)}, "
                f"top1_agree {len(self.top1_agree)}; give one entry per generated step"
            )

    @property
    def n_steps(self) -> int:
        return len(self.logits_max_abs)

    @property
    def ok(self) -> bool:
        """No divergent step."""
        return self.first_divergent_step is None

    @classmethod
    def from_step_logits(
        cls,
        a: Sequence[Float[Tensor, "batch d_vocab"]],
        b: Sequence[Float[Tensor, "batch d_vocab"]],
        *,
        atol: float = DEFAULT_ATOL,
        tokens_a: Optional[Tensor] = None,
        tokens_b: Optional[Tensor] = None,
    ) -> "GenerationDiff":
        """Build from the next-token logits of each step of both runs.

        Args:
            a: one ``[batch, d_vocab]`` tensor per step (the run under test).
            b: the same for the reference run.
            atol: logit tolerance for ``first_divergent_step``.

        >>> d = GenerationDiff.from_step_logits([torch.zeros(1, 3)], [torch.zeros(1, 3)])
        >>> d.logits_max_abs, d.top1_agree, d.first_divergent_step
        ([0.0], [True], None)
        """
        if len(a) != len(b):
            raise ValueError(f"runs have {len(a)} and {len(b)} steps; compare equal lengths")
        max_abs, kl, agree = [], [], []
        first = None
        for step, (x, y) in enumerate(zip(a, b)):
            x, y = x.double(), y.double()
            max_abs.append(float((x - y).abs().max()))
            log_x, log_y = F.log_softmax(x, dim=-1), F.log_softmax(y, dim=-1)
            kl.append(float((log_y.exp() * (log_y - log_x)).sum(-1).max()))
            agree.append(bool((x.argmax(-1) == y.argmax(-1)).all()))
            if first is None and (max_abs[-1] > atol or not agree[-1]):
                first = step
        return cls(max_abs, kl, agree, first, atol, tokens_a, tokens_b)
