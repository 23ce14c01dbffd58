"""``interpkv check --engine`` and the demo's "other implementations" section.

:func:`check_engine` runs the same inputs as :func:`interpkv.verify.checks.check_model`
(a left-padded ragged batch: a prefill of half, three single tokens, the rest)
through another engine's own cache and returns a
:class:`~interpkv.verify.checks.CheckResult`: ``max_dlogit`` is that engine's
cached-vs-uncached logit difference, ``first_divergence`` its first divergent
site, and ``max_dlogit_hf`` (TransformerLens engine, where an HF twin exists)
its cached logits against the HF model's. :func:`engine_faults` plants
:mod:`interpkv.verify.engine_faults` in each engine and checks where
:func:`interpkv.compare` lands.
"""

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

import torch
import transformers

from interpkv import zoo
from interpkv.core import tl as _tl
from interpkv.core.schemes import scheme_for
from interpkv.diagnostics import engines
from interpkv.diagnostics.capture import RecordBuilder
from interpkv.diagnostics.hf_reference import hf_difference, hf_difference_by_position, hf_logits
from interpkv.tolerances import DEFAULT_ATOL
from interpkv.verify import engine_faults as faults
from interpkv.verify.checks import COMPARE_TOL, CheckResult, FaultResult, _inputs, check_hf_dir, check_zoo
from interpkv.verify.models import Models
from interpkv.verify.verdicts import run_tally

__all__ = ["check_engine", "engine_faults", "ENGINE_FAULT_CASES", "OtherImplementations"]


@dataclasses.dataclass
class OtherImplementations:
    """The demo's "other implementations" section: engine checks, engine faults, TL findings."""

    checks: list = dataclasses.field(default_factory=list)
    faults: list = dataclasses.field(default_factory=list)
    findings: list = dataclasses.field(default_factory=list)
    upstream: dict = dataclasses.field(default_factory=dict)
    """Check label -> its documented upstream bug (:data:`interpkv.verify.verdicts.UPSTREAM`)."""

    def tally(self):
        """This section's rows as a :class:`~interpkv.verify.verdicts.Tally`."""
        return run_tally(other=self)

    @property
    def ok(self) -> bool:
        """No row FAILs (a KNOWN UPSTREAM row does not fail; see :mod:`interpkv.verify.verdicts`)."""
        return self.tally().ok

    @property
    def summary(self) -> str:
        return "other implementations: " + self.tally().breakdown()


class _Logits(RecordBuilder):
    """A record of a run's logits only (activations are not kept)."""

    def activation(self, name, act, q_pos, k_pos) -> None:
        pass

    def skip(self, name, reason) -> None:
        pass


def _load(model: str, engine: str, dtype: torch.dtype, models: Models):
    """``(model to run, HF twin or None, label)`` for a zoo name or an HF directory."""

    if model in zoo.names():
        if engine in ("hf", "transformer_bridge") and model not in zoo.pairs():
            raise ValueError(f"zoo model {model!r} has no HF twin; engine={engine!r} needs one of {', '.join(zoo.pairs())}")
        if engine == "transformer_bridge":  # its HF twin for the vs-HF column: the bridge computes HF's function
            return zoo.load_bridge(model, dtype=dtype), zoo.load_hf(model, dtype=dtype), model
        if engine == "hf" and not _tl.AVAILABLE:  # no HookedTransformer to pair it with (TransformerLens 4)
            return zoo.load_hf(model, dtype=dtype), None, model
        tl, hf = models.with_twin(model, dtype)
        return (hf, None, model) if engine == "hf" else (tl, hf, model)
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(
            f"{model!r} is not a HuggingFace model directory (no config.json); pass a zoo name "
            f"({', '.join(zoo.names())}) or a directory written by model.save_pretrained(dir)"
        )
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model, local_files_only=True, attn_implementation="eager", dtype=dtype
    ).eval()
    label = os.path.basename(os.path.normpath(model))
    if engine == "transformer_bridge":
        return zoo.bridge_from_hf(hf, label=label), hf, label
    return (hf, None, label) if engine == "hf" else (zoo.from_hf(hf, label=label), hf, label)


def _vocab(model) -> int:
    cfg = getattr(model, "cfg", None)
    return cfg.d_vocab if cfg is not None else model.config.get_text_config().vocab_size


def check_engine(
    model: str, engine: str, *, dtype: torch.dtype = torch.float32, length: int = 24, models: Optional[Models] = None
) -> CheckResult:
    """Check ``engine``'s own cache on a zoo model or an HF directory.

    Args:
        model: zoo name or ``save_pretrained`` directory.
        engine: ``"interpkv"``, ``"transformer_lens"``, ``"hf"`` or ``"transformer_bridge"``.
        dtype: float32 or float64.
        length: tokens per row.
        models: the run's :class:`~interpkv.verify.models.Models` for zoo names (default: loaded fresh).
    """

    models = Models.of(models)
    if engine == "interpkv":
        if os.path.isdir(model):
            return check_hf_dir(model, dtype=dtype)
        return check_zoo([model], dtype=dtype, models=models)[0]
    run, hf, label = _load(model, engine, dtype, models)
    tokens, mask = _inputs(_vocab(run), length, 0)
    half = length // 2
    splits = [half, 1, 1, 1, length - half - 3]
    kept: List[_Logits] = []  # the compared cached run's logits, for the HF column (not a second cached run)
    keep = lambda valid: kept.append(_Logits(valid)) or kept[0]  # noqa: E731
    also = None if hf is None else keep
    report = engines.compare(run, tokens, steps=splits, attention_mask=mask, engine=engine, also=also)
    max_hf, by_position = None, None
    if hf is not None:
        cached = kept[0].record({})
        real = mask.bool()
        rows, cols = real.nonzero(as_tuple=True)
        positions = cached.valid.nonzero(as_tuple=True)  # same order: row-major, one entry per real token
        reference = hf_logits(hf, tokens, mask)[rows, cols]
        # Centred over the vocabulary, as check_model does (center_unembed shifts by a constant).
        max_hf, _ = hf_difference(cached.logits[positions][None], reference[None], torch.ones_like(rows)[None])
        full = torch.zeros(*tokens.shape, reference.shape[-1], dtype=reference.dtype)  # back to (B, P, d_vocab)
        ours = full.clone()
        full[rows, cols], ours[rows, cols] = reference, cached.logits[positions].to(reference.dtype)
        by_position = hf_difference_by_position(ours, full, mask)
    tol = COMPARE_TOL.get(dtype, DEFAULT_ATOL)
    scheme = _scheme(run, engine)
    return CheckResult(
        model=f"{label} ({engine})",
        scheme=scheme,
        dtype=dtype,
        max_dlogit=report.logits_max_abs,
        max_dlogit_hf=max_hf,
        splits=splits,
        first_divergence=report.first_divergence(atol=tol, rtol=tol),
        report=report,
        hf_by_position=by_position,
    )


def _scheme(model, engine: str) -> str:
    """What runs: the engine's own implementation, never interpkv's scheme for it."""
    if engine in ("hf", "transformer_bridge"):
        hf = model.original_model if engine == "transformer_bridge" else model
        cache = type(engines.hf.dynamic_cache(hf, 1, 1)).__name__
        wrapped = f" of {type(hf).__name__}" if hf is not model else ""
        return f"{type(model).__name__}{wrapped} ({cache})"
    if engine == "transformer_lens":
        cfg = model.cfg
        return f"TL past_kv_cache: {cfg.positional_embedding_type}, {cfg.n_heads} heads"

    return scheme_for(model).describe()


ENGINE_FAULT_CASES: Tuple[Tuple[str, str, int], ...] = (
    ("transformer_lens", "gpt2", 1),
    ("transformer_lens", "llama", 1),
    ("hf", "llama", 1),
    ("hf", "bloom", 1),
)
"""(engine, zoo model, layer): a stored key corrupted in the engine's own cache update."""

_STEPS = (8, 1, 1, 4)


def engine_faults(
    cases: Sequence[Tuple[str, str, int]] = ENGINE_FAULT_CASES, *, models: Optional[Models] = None
) -> List[FaultResult]:
    """``corrupt_stored_key`` planted in each engine's cache update (float64), localized by compare.

    ``models``: the run's :class:`~interpkv.verify.models.Models` (default: loaded fresh); the
    fault patches the engine's cache class, not the model, and is undone when its block exits.
    """

    models = Models.of(models)
    results = []
    tol = COMPARE_TOL[torch.float64]
    for engine, name, layer in cases:
        tl, hf = models.pair(name, torch.float64)
        model = hf if engine == "hf" else tl
        tokens = torch.randint(0, 97, (1, sum(_STEPS)), generator=torch.Generator().manual_seed(0))
        with faults.inject(model, engine=engine, layer=layer) as fault:
            report = engines.compare(model, tokens, steps=list(_STEPS), engine=engine)
        hook, _, pos = fault.expected_site(_STEPS[0])
        results.append(
            FaultResult(
                fault=f"corrupt_stored_key ({engine})",
                model=f"{name} (layer {layer})",
                scheme=engine,
                expected=(hook, pos),
                found=report.first_divergence(atol=tol, rtol=tol),
                report=report,
            )
        )
    return results
