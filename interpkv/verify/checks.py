"""Equivalence checks behind ``interpkv check`` and ``interpkv demo``.

One :class:`CheckResult` per model: the largest logit difference between a
cached run (a left-padded ragged batch fed as a prefill, single tokens and a
chunk) and an uncached run; where an HF twin exists, between the cached run and
the HF model under the same mask; and the first divergent site of
:func:`interpkv.compare` over every hook point on the same inputs.

One :class:`FaultResult` per (fault, model) of the bug zoo: the fault is
injected (:mod:`interpkv.faults`), :func:`interpkv.compare` localizes it, and
the result says whether the first divergence landed where the fault's
docstring says it must.
"""

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from interpkv import faults, tolerances, zoo
from interpkv.cache.kvcache import KVCache
from interpkv.core import tl as _tl
from interpkv.core.forward import forward
from interpkv.core.schemes import scheme_for
from interpkv.diagnostics.compare import compare
from interpkv.diagnostics.hf_reference import hf_difference, hf_difference_by_position, hf_logits
from interpkv.diagnostics.report import DivergenceReport, Site
from interpkv.generation.generate import generate
from interpkv.generation.result import GenerationDiff
from interpkv.tolerances import DEFAULT_ATOL
from interpkv.verify.models import Models
from interpkv.zoo import charvocab

HookedTransformer = _tl.HookedTransformer
PreTrainedModel = "transformers.PreTrainedModel"

__all__ = [
    "CheckResult",
    "FaultResult",
    "check_model",
    "check_zoo",
    "check_hf_dir",
    "hf_difference",
    "check_fault",
    "bug_zoo",
    "BUG_ZOO",
    "GenerationResult",
    "greedy_pair",
    "check_generation",
    "CACHED_TOL",
    "HF_TOL",
    "COMPARE_TOL",
    "INPUTS",
    "FAULT_INPUTS",
]

# The defaults and the reason for each number live in interpkv.tolerances.
CACHED_TOL = tolerances.CACHED_LOGITS
HF_TOL = tolerances.HF_LOGITS
COMPARE_TOL = tolerances.SITE


@dataclasses.dataclass
class CheckResult:
    """Outcome of checking one model.

    Attributes:
        model: zoo name (or a label for a user model).
        scheme: positional scheme description.
        dtype: dtype the check ran in.
        max_dlogit: max |cached - uncached| logit over real positions.
        max_dlogit_hf: max |cached - HF| logit, each position's logits centred
            over the vocabulary first (TransformerLens's ``center_unembed``
            shifts them by a constant), or None without an HF twin.
        splits: the chunk sizes the cached run used.
        first_divergence: the first divergent site of :func:`interpkv.compare`
            over every hook at ``COMPARE_TOL[dtype]``, or None.
        report: that :class:`~interpkv.diagnostics.diff.DivergenceReport` (for plots).
        hf_nan_rows: padded rows where HF's own logits are NaN, left out of
            ``max_dlogit_hf`` (see :func:`~interpkv.diagnostics.hf_reference.hf_difference`).
        hf_by_position: ``max_dlogit_hf`` per position (what a failing ``vs HF``
            row plots), or None without an HF twin.
    """

    model: str
    scheme: str
    dtype: torch.dtype
    max_dlogit: float
    max_dlogit_hf: Optional[float]
    splits: List[int]
    first_divergence: Optional[Site] = None
    report: Optional[DivergenceReport] = dataclasses.field(default=None, repr=False)
    hf_nan_rows: List[int] = dataclasses.field(default_factory=list)
    hf_by_position: Optional[List[float]] = dataclasses.field(default=None, repr=False)

    @property
    def hf_note(self) -> str:
        """Why ``max_dlogit_hf`` leaves rows out ("" when it judges every row)."""
        if not self.hf_nan_rows:
            return ""
        return f"HF reference n/a (NaN on padded rows {', '.join(map(str, self.hf_nan_rows))})"

    @property
    def ok(self) -> bool:
        """Every number within its tolerance and no divergent site."""
        if not self.max_dlogit < CACHED_TOL[self.dtype]:
            return False
        if self.first_divergence is not None:
            return False
        return self.max_dlogit_hf is None or self.max_dlogit_hf < HF_TOL[self.dtype]

    @property
    def first_divergence_label(self) -> str:
        """``"hook@pos"`` of the first divergent site, ``"-"`` when there is none."""
        site = self.first_divergence
        if site is None:
            return "-"
        return f"{site.hook}@{site.pos}" + (f" ({site.nonfinite})" if site.nonfinite else "")

    @property
    def verdict(self) -> str:
        return "PASS" if self.ok else "FAIL"


INPUTS = (
    "random tokens (seed 0), 3 rows x 24, rows 1 and 2 left-padded by 3 and 12; "
    "cached run fed in chunks 12, 1, 1, 1, 9"
)
"""What every check row's numbers come from (:func:`check_model` and ``check_engine`` defaults)."""


def _inputs(d_vocab: int, length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (3, length), generator=gen)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, : length // 2] = 0
    return tokens, mask


def check_model(
    model: "HookedTransformer",
    *,
    label: str,
    hf: "Optional[PreTrainedModel]" = None,
    length: int = 24,
    seed: int = 0,
    splits: Sequence[int] = (),
) -> CheckResult:
    """Check one HookedTransformer (and its HF twin, if given).

    Args:
        model: the HookedTransformer.
        label: name shown in reports.
        hf: an HF model computing the same function, or None.
        length: tokens per row.
        seed: seed for the tokens.
        splits: chunk sizes for the cached run (default: a prefill of half,
            three single tokens, then the rest in one chunk).

    Returns:
        A :class:`CheckResult`.
    """

    tokens, mask = _inputs(model.cfg.d_vocab, length, seed)
    if not splits:
        half = length // 2
        splits = [half, 1, 1, 1, length - half - 3]
    cache = KVCache.for_model(model, tokens.shape[0])
    pieces, start = [], 0
    with torch.no_grad():
        for size in splits:
            end = start + size
            pieces.append(forward(model, tokens[:, start:end], cache=cache, attention_mask=mask[:, start:end]))
            start = end
        cached = torch.cat(pieces, dim=1)
        uncached = forward(model, tokens, attention_mask=mask)
        report = compare(model, tokens, steps=list(splits), attention_mask=mask)
    tol = COMPARE_TOL.get(model.cfg.dtype, DEFAULT_ATOL)
    real = mask.bool()
    max_hf, nan_rows, by_position = None, [], None
    if hf is not None:
        reference = hf_logits(hf, tokens, mask)
        max_hf, nan_rows = hf_difference(cached, reference, mask)
        by_position = hf_difference_by_position(cached, reference, mask)
    return CheckResult(
        model=label,
        scheme=scheme_for(model).describe(),
        dtype=model.cfg.dtype,
        max_dlogit=(cached[real] - uncached[real]).abs().max().item(),
        max_dlogit_hf=max_hf,
        splits=list(splits),
        first_divergence=report.first_divergence(atol=tol, rtol=tol),
        report=report,
        hf_nan_rows=nan_rows,
        hf_by_position=by_position,
    )


def check_zoo(
    names: Sequence[str] = (), *, dtype: torch.dtype = torch.float32, models: Optional[Models] = None
) -> List[CheckResult]:
    """Check the named zoo models (default: all of them).

    ``models``: the run's :class:`~interpkv.verify.models.Models` (default: each model loaded fresh).
    """

    models = Models.of(models)
    results = []
    for name in names or zoo.names():
        model, hf = models.with_twin(name, dtype)
        results.append(check_model(model, label=name, hf=hf))
    return results


def check_hf_dir(path: str, *, dtype: torch.dtype = torch.float32, label: Optional[str] = None) -> CheckResult:
    """Check a HuggingFace causal LM saved in a local directory (no network).

    The directory (``save_pretrained`` output: ``config.json`` + weights) is
    loaded by :func:`interpkv.zoo.load_hf_dir` (local files only, eager
    attention, converted with :func:`interpkv.zoo.from_hf`), and checked
    against itself cached/uncached and against the HF model.

    Args:
        path: the model directory.
        dtype: float32 or float64.
        label: name shown in reports (default: the directory name).

    Returns:
        A :class:`CheckResult`.

    Raises:
        ValueError: ``path`` is not a directory with a ``config.json``.
    """


    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"{path!r} is not a HuggingFace model directory (no config.json); pass a zoo name "
            f"({', '.join(zoo.names())}) or a directory written by model.save_pretrained(dir)"
        )
    model, hf = zoo.load_hf_dir(path, dtype=dtype, return_hf=True)
    label = label or os.path.basename(os.path.normpath(path))
    return check_model(model, label=label, hf=hf)


@dataclasses.dataclass
class FaultResult:
    """Outcome of injecting one known cache bug and localizing it.

    Attributes:
        fault: fault name (see :func:`interpkv.faults.names`).
        model: zoo model it was injected on.
        scheme: that model's positional scheme.
        expected: ``(hook, pos)`` where the fault's docstring says it shows.
        found: the first divergent site, or None when nothing diverged.
        report: the :class:`~interpkv.diagnostics.diff.DivergenceReport` under the fault.
    """

    fault: str
    model: str
    scheme: str
    expected: Tuple[str, int]
    found: Optional[Site]
    report: Optional[DivergenceReport] = dataclasses.field(default=None, repr=False)

    @property
    def caught(self) -> bool:
        """The fault was detected and localized at its documented site."""
        return self.found is not None and (self.found.hook, self.found.pos) == tuple(self.expected)

    @property
    def found_label(self) -> str:
        return "-" if self.found is None else f"{self.found.hook}@{self.found.pos}"

    @property
    def expected_label(self) -> str:
        return f"{self.expected[0]}@{self.expected[1]}"


BUG_ZOO: Tuple[Tuple[str, str], ...] = (
    ("no_cache_history", "gpt2"),
    ("stale_position_offset", "gpt2"),
    ("stale_position_offset", "llama"),
    ("stale_position_offset", "bloom"),
    ("alibi_unsliced", "bloom"),
    ("zero_padded_resume", "neox"),
    ("kv_heads_repeated_before_cache", "llama"),
)
"""(fault, zoo model) pairs of the demo's bug zoo: every fault once, and the
stale offset on each positional scheme (learned, rotary, ALiBi), where it
shows at a different hook."""

_FAULT_STEPS = (8, 1, 1, 4)  # a prefill, two single tokens, a chunk: first cached position 8
FAULT_INPUTS = "random tokens (seed 0), 1 row x 14, cached run fed in chunks 8, 1, 1, 4; float64, site tolerance 1e-10"
"""What every bug-zoo (and engine-fault) row's numbers come from."""


def check_fault(fault: str, model_name: str, *, seed: int = 0, models: Optional[Models] = None) -> FaultResult:
    """Inject ``fault`` on zoo model ``model_name`` (float64) and localize it.

    Args:
        fault: a name from :func:`interpkv.faults.names`.
        model_name: a zoo model the fault applies to.
        seed: seed of the random tokens.
        models: the run's :class:`~interpkv.verify.models.Models` (default: a fresh model);
            the fault is undone when its block exits.

    Returns:
        A :class:`FaultResult`; ``caught`` is True when ``first_divergence``
        (at the float64 tolerance) is the fault's documented site.

    Examples:
        >>> r = check_fault("stale_position_offset", "llama")
        >>> r.caught, r.found_label
        (True, 'blocks.0.attn.hook_rot_q@8')
    """

    model = Models.of(models).load(model_name, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, sum(_FAULT_STEPS)), generator=gen)
    tol = COMPARE_TOL[torch.float64]
    with torch.no_grad(), faults.inject(model, fault) as f:
        report = compare(model, tokens, steps=list(_FAULT_STEPS))
        expected = f.expected_site(model, _FAULT_STEPS[0])
    return FaultResult(
        fault=fault,
        model=model_name,
        scheme=scheme_for(model).describe(),
        expected=tuple(expected),
        found=report.first_divergence(atol=tol, rtol=tol),
        report=report,
    )


def bug_zoo(pairs: Sequence[Tuple[str, str]] = BUG_ZOO, *, models: Optional[Models] = None) -> List[FaultResult]:
    """:func:`check_fault` for every ``(fault, model)`` pair (default :data:`BUG_ZOO`)."""
    return [check_fault(fault, model, models=models) for fault, model in pairs]


@dataclasses.dataclass
class GenerationResult:
    """A greedy generation run with the cache on and off.

    Attributes:
        model: model label.
        prompt: prompt text.
        cached: continuation from :func:`interpkv.generate` (KV cache, one
            token per step).
        uncached: continuation generated by re-running the whole sequence
            without a cache at every step.
        diff: a :class:`~interpkv.generation.result.GenerationDiff` of the per-step
            logits (cached = ``a``, uncached = reference ``b``).
    """

    model: str
    prompt: str
    cached: str
    uncached: str
    diff: GenerationDiff

    @property
    def identical(self) -> bool:
        """Same text, and every step's top-1 token agrees."""
        return self.cached == self.uncached and all(self.diff.top1_agree)


def greedy_pair(model, tokens: Tensor, max_new_tokens: int) -> Tuple[Tensor, Tensor, GenerationDiff]:
    """Greedy generation through a KV cache and by full uncached recompute.

    The cached run is :func:`interpkv.generate` (one cached forward per new
    token); the reference re-runs the whole sequence without a cache at every
    step. Each loop feeds back its own argmax, so a single flipped token shows
    as different text, not only as a logit difference.

    Args:
        model: a HookedTransformer.
        tokens: prompt ids ``[batch, pos]``.
        max_new_tokens: tokens to generate.

    Returns:
        ``(cached_new, uncached_new, diff)``: new ids ``[batch, max_new_tokens]``
        of both loops and their per-step :class:`~interpkv.generation.result.GenerationDiff`.
    """

    with torch.no_grad():
        run = generate(model, tokens, max_new_tokens=max_new_tokens, keep_logits=True)
        cached_steps = list(run.logits.unbind(dim=1))  # max_new_tokens x (B, d_vocab)
        seq_a = run.tokens
        uncached_steps = []
        seq_b = tokens
        for _ in range(max_new_tokens):
            logits = forward(model, seq_b)[:, -1]  # (B, d_vocab)
            uncached_steps.append(logits)
            seq_b = torch.cat([seq_b, logits.argmax(-1, keepdim=True)], dim=1)
    new_a, new_b = seq_a[:, tokens.shape[1]:], seq_b[:, tokens.shape[1]:]
    tol = CACHED_TOL.get(model.cfg.dtype, 1e-4)
    diff = GenerationDiff.from_step_logits(cached_steps, uncached_steps, atol=tol, tokens_a=new_a, tokens_b=new_b)
    return new_a, new_b, diff


def check_generation(name: str, prompt: str, *, max_new_tokens: int = 60) -> GenerationResult:
    """Greedy generation from a trained character-level zoo model, cache on and off.

    Args:
        name: a zoo model with trained weights (see ``interpkv.zoo.trained_names()``).
        prompt: prompt text (newline and printable ASCII).
        max_new_tokens: characters to generate.

    Returns:
        A :class:`GenerationResult`.
    """

    model = zoo.load(name, trained=True)
    tokens = charvocab.encode(prompt)[None]  # (1, pos)
    new_a, new_b, diff = greedy_pair(model, tokens, max_new_tokens)
    return GenerationResult(
        model=f"{name} (trained)",
        prompt=prompt,
        cached=charvocab.decode(new_a[0]),
        uncached=charvocab.decode(new_b[0]),
        diff=diff,
    )
