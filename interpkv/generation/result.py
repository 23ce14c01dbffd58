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

from interpkv._repr import html_summary, short_list
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
        finished: ``Bool[Tensor, " batch"]``: rows that emitted a stop token.
        logits: ``Float[Tensor, "batch new d_vocab"]``, the logits each new token
            was chosen from (only with ``keep_logits=True``, else None).
        records: one :class:`~interpkv.diagnostics.record.Record` per step when ``capture``
            was given (else None): the captured hook points and the logits of
            that step's new tokens, at their absolute positions (earlier
            positions hold 0; ``record.valid`` marks the step's tokens). Cut
            from :attr:`record` when a step is read.
        record: with ``capture``, ONE Record over every position of
            ``tokens`` (``[batch, history + prompt + new]`` at absolute
            positions; a left-padded row has fewer). ``record.to_activation_cache(model)``
            is ``run_with_cache(tokens)``'s cache (row by row without the padding).
        tokenizer: the model's tokenizer at generation time (None without one),
            which :attr:`text` and :attr:`new_text` decode with.
        single: the prompt was one string or one ``[pos]`` row of ids (or a
            one-row cache was continued): :attr:`text` is then a ``str``.
    """

    tokens: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    prompt_length: int
    finished: Bool[Tensor, " batch"]
    logits: Optional[Float[Tensor, "batch new d_vocab"]] = None
    records: Optional[Sequence[Record]] = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    single: bool = False
    record: Optional[Record] = field(default=None, repr=False, compare=False)

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

    def __repr__(self) -> str:
        batch, total = self.tokens.shape
        extras = "".join(
            [
                ", logits kept" if self.logits is not None else "",
                f", {len(self.records)} step records + .record" if self.records is not None else "",
            ]
        )
        return (
            f"Generation(batch={batch}, prompt_length={self.prompt_length}, "
            f"new_tokens={total - self.prompt_length}, finished={int(self.finished.sum())}/{batch}{extras})"
        )

    def _repr_html_(self) -> str:
        batch, total = self.tokens.shape
        new_mask = self.attention_mask[:, self.prompt_length :]
        prompt_mask = self.attention_mask[:, : self.prompt_length]
        rows = [
            [
                b,
                int(prompt_mask[b].sum()),
                int(new_mask[b].sum()),
                bool(self.finished[b]),
                short_list(self.new_tokens[b].tolist(), limit=12),
            ]
            for b in range(min(batch, 16))
        ]
        fields = [
            ("batch", batch),
            ("prompt columns", self.prompt_length),
            ("new tokens (max per row)", total - self.prompt_length),
            ("finished rows", f"{int(self.finished.sum())}/{batch}"),
            ("logits kept", self.logits is not None),
            ("step records", None if self.records is None else len(self.records)),
        ]
        note = f"first 16 of {batch} rows shown" if batch > 16 else ""
        header = ["row", "prompt tokens", "new tokens", "finished", "new token ids"]
        return html_summary("Generation", fields, (header, rows), note)


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
            ``atol`` or whose top-1 tokens differ on more than a tie; None if
            there is none.
        atol: the tolerance ``first_divergent_step`` was computed with.
        tokens_a, tokens_b: optional generated tokens ``[batch, steps]``.
        cause: None, or a short string naming the ``fwd_hooks`` that make the
            runs differ (set by :func:`interpkv.compare_generation` when the
            same comparison without them agrees).
        top1_tied: per step, True when the top-1 tokens differ only on a tie:
            in every differing row the reference scores ``a``'s token within
            ``atol`` of its own top-1 (an exact tie, or one the dtype's
            rounding decides). Such a flip is not a divergence. None: every
            flip counts (a diff built without logits).
        nonfinite: None, or where the first NaN (or an infinity the other run
            does not have) is: which run, step and row. Such a step is
            divergent whatever ``atol`` (its ``logits_max_abs`` and ``kl`` are inf).
    """

    logits_max_abs: List[float]
    kl: List[float]
    top1_agree: List[bool]
    first_divergent_step: Optional[int]
    atol: float = DEFAULT_ATOL
    tokens_a: Optional[Tensor] = field(default=None, repr=False)
    tokens_b: Optional[Tensor] = field(default=None, repr=False)
    cause: Optional[str] = None
    top1_tied: Optional[List[bool]] = None
    nonfinite: Optional[str] = None

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

    def divergent(self) -> List[bool]:
        """Per step: ``logits_max_abs > atol``, or the top-1 tokens differ on more than a tie (:attr:`top1_tied`)."""
        tied = self.top1_tied or [False] * self.n_steps
        return [
            err > self.atol or not (agree or tie)
            for err, agree, tie in zip(self.logits_max_abs, self.top1_agree, tied)
        ]

    def to_frame(self):
        """A pandas DataFrame with one row per generated step.

        Columns: ``step``, ``logits_max_abs``, ``kl``, ``top1_agree``,
        ``top1_tied`` and ``divergent`` (the step fails ``atol`` or its top-1
        tokens differ on more than a tie).

        >>> GenerationDiff([0.0, 0.5], [0.0, 0.1], [True, False], 1).to_frame().divergent.tolist()
        [False, True]
        """
        import pandas as pd  # deferred: pandas, only for to_frame

        return pd.DataFrame(
            {
                "step": list(range(self.n_steps)),
                "logits_max_abs": self.logits_max_abs,
                "kl": self.kl,
                "top1_agree": self.top1_agree,
                "top1_tied": self.top1_tied or [False] * self.n_steps,
                "divergent": self.divergent(),
            }
        )

    def __repr__(self) -> str:
        worst = max(self.logits_max_abs, default=0.0)
        worst_kl = max(self.kl, default=0.0)
        return (
            f"GenerationDiff({self.n_steps} steps, first_divergent_step={self.first_divergent_step}, "
            f"max logits_max_abs={worst:.3g}, max kl={worst_kl:.3g}, "
            f"top1 agree {sum(self.top1_agree)}/{self.n_steps}, atol={self.atol:g})"
            + (f"\ncause: {self.cause}" if self.cause else "")
            + (f"\nnot finite: {self.nonfinite}" if self.nonfinite else "")
        )

    def _repr_html_(self) -> str:
        limit = 20
        divergent = self.divergent()
        rows = [
            [s, self.logits_max_abs[s], self.kl[s], self.top1_agree[s], divergent[s]]
            for s in range(min(self.n_steps, limit))
        ]
        first = self.first_divergent_step
        if first is not None and first >= limit:  # always show the step that matters
            rows.append([first, self.logits_max_abs[first], self.kl[first], self.top1_agree[first], True])
        fields = [
            ("steps", self.n_steps),
            ("first divergent step", first),
            ("max logits |a-b|", max(self.logits_max_abs, default=0.0)),
            ("max KL", max(self.kl, default=0.0)),
            ("top-1 agrees", f"{sum(self.top1_agree)}/{self.n_steps}"),
            ("atol", self.atol),
        ]
        if self.cause:
            fields.append(("cause", self.cause))
        if self.nonfinite:
            fields.append(("not finite", self.nonfinite))
        note = f"first {limit} of {self.n_steps} steps shown; to_frame() has all" if self.n_steps > limit else ""
        header = ["step", "logits max |a-b|", "KL", "top-1 agrees", "divergent"]
        return html_summary("GenerationDiff", fields, (header, rows), note)

    @classmethod
    def from_step_logits(
        cls,
        a: Sequence[Float[Tensor, "batch d_vocab"]],
        b: Sequence[Float[Tensor, "batch d_vocab"]],
        *,
        atol: float = DEFAULT_ATOL,
        tokens_a: Optional[Tensor] = None,
        tokens_b: Optional[Tensor] = None,
        names: Sequence[str] = ("a", "b"),
    ) -> "GenerationDiff":
        """Build from the next-token logits of each step of both runs.

        A step where either run's logits hold a NaN, or an infinity the other
        run does not have, is divergent with ``logits_max_abs`` and ``kl`` inf,
        and :attr:`nonfinite` names the first such run, step and row.

        Args:
            a: one ``[batch, d_vocab]`` tensor per step (the run under test).
            b: the same for the reference run.
            atol: logit tolerance for ``first_divergent_step``; a top-1 flip
                where the reference scores ``a``'s token within ``atol`` of its
                own top-1 is a tie, not a divergence (:attr:`top1_tied`).
            names: what ``a`` and ``b`` are, for :attr:`nonfinite`.

        >>> d = GenerationDiff.from_step_logits([torch.zeros(1, 3)], [torch.zeros(1, 3)])
        >>> d.logits_max_abs, d.top1_agree, d.first_divergent_step
        ([0.0], [True], None)
        >>> tie = GenerationDiff.from_step_logits([torch.tensor([[1.0, 1.01]])], [torch.tensor([[1.01, 1.0]])], atol=0.05)
        >>> tie.top1_agree, tie.top1_tied, tie.first_divergent_step
        ([False], [True], None)
        """
        if len(a) != len(b):
            raise ValueError(f"runs have {len(a)} and {len(b)} steps; compare equal lengths")
        max_abs, kl, agree, tied = [], [], [], []
        first, nonfinite = None, None
        for step, (x, y) in enumerate(zip(a, b)):
            x, y = x.double(), y.double()
            err = (x - y).abs()
            # A NaN, or an infinity the other run does not have (equal infinities are no error).
            bad_x = torch.isnan(x) | (torch.isinf(x) & (x != y) & ~torch.isnan(y))
            bad_y = torch.isnan(y) | (torch.isinf(y) & (x != y) & ~torch.isnan(x))
            log_x, log_y = F.log_softmax(x, dim=-1), F.log_softmax(y, dim=-1)
            if bool(bad_x.any() or bad_y.any()):
                max_abs.append(float("inf"))
                kl.append(float("inf"))
                agree.append(False)
                tied.append(False)
                if nonfinite is None:
                    side = names[0] if bool(bad_x.any()) else names[1]
                    if bool(bad_x.any()) and bool(bad_y.any()):
                        side = f"both {names[0]} and {names[1]}"
                    row = int((bad_x | bad_y).any(-1).nonzero()[0, 0]) if x.dim() > 1 else 0
                    nonfinite = f"NaN/inf logits in {side} at step {step} (row {row})"
            else:
                max_abs.append(float(err.max()))
                kl.append(float((log_y.exp() * (log_y - log_x)).sum(-1).max()))
                chosen = x.argmax(-1)  # (B,)
                same = chosen == y.argmax(-1)
                agree.append(bool(same.all()))
                margin = y.max(-1).values - y.gather(-1, chosen[:, None])[:, 0]  # reference's regret, >= 0
                tied.append(not agree[-1] and bool((same | (margin <= atol)).all()))
            if first is None and (max_abs[-1] > atol or not (agree[-1] or tied[-1])):
                first = step
        return cls(max_abs, kl, agree, first, atol, tokens_a, tokens_b, top1_tied=tied, nonfinite=nonfinite)
