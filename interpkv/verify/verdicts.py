"""One verdict vocabulary and one count for every check a run reports.

Three words, the same in the terminal, the HTML report and the exit status:

- ``PASS``: every number within its tolerance.
- ``FAIL``: a number past its tolerance (the verdict says which and by how
  much), or a fault not localized where it must be; exit status 1.
- ``KNOWN UPSTREAM``: another library's documented bug, shown with its
  one-line reason and reference beside the row. Never counted as a pass and
  never drawn green; it does not fail the run (it is not interpkv's to fix),
  and it is only given when the row fails on exactly the quantity that bug
  moves: the day upstream fixes it, the row reads ``PASS``.

A run's rows are grouped in :class:`Section` objects; a :class:`Tally` adds
them up, and its :meth:`Tally.line` is the last line of the terminal output
and the header of the HTML report. Pure Python: duck-typed on the result
objects (``ok``/``max_dlogit``/..., ``caught``, ``identical``, ``verified``),
no model runs here.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from interpkv import tolerances

__all__ = [
    "PASS",
    "FAIL",
    "KNOWN_UPSTREAM",
    "WORDS",
    "Upstream",
    "UPSTREAM",
    "upstream_for",
    "Verdict",
    "of_check",
    "of_fault",
    "of_generation",
    "of_finding",
    "of_saved_provenance",
    "of_continuation",
    "saved_cache_rows",
    "Section",
    "Tally",
    "run_tally",
]

PASS = "PASS"
FAIL = "FAIL"
KNOWN_UPSTREAM = "KNOWN UPSTREAM"
WORDS = (PASS, FAIL, KNOWN_UPSTREAM)


@dataclasses.dataclass(frozen=True)
class Upstream:
    """A documented bug of another library.

    Attributes:
        library: who has it (``"TransformerLens 3.x"``).
        reason: one line: what it does to the numbers.
        reference: where it is documented and reproduced.
    """

    library: str
    reason: str
    reference: str


UPSTREAM: Dict[Tuple[str, str], Upstream] = {
    ("transformer_lens", "bloom6"): Upstream(
        library="TransformerLens 3.x",
        reason=(
            "ALiBi slope 2^(-8(i+1)/n) for every head count; BLOOM (and HF) interleave two series when n is "
            "not a power of two (6 here), so TL's logits differ from HF's, cached and uncached alike"
        ),
        reference=(
            "docs/known-bugs.md (report 3); reproduced by the finding 'ALiBi slopes, 6 heads' "
            "(interpkv.verify.findings.alibi_slopes_not_power_of_two)"
        ),
    ),
}
"""Documented upstream bugs by ``(engine, zoo model)``: they move that engine's
logits away from the HF model's (the ``vs HF`` column), not its cache."""


def upstream_for(engine: str, model: str) -> Optional[Upstream]:
    """The documented upstream bug of ``engine`` on zoo model ``model``, if any.

    >>> upstream_for("transformer_lens", "bloom6").library
    'TransformerLens 3.x'
    >>> upstream_for("interpkv", "bloom6") is None
    True
    """
    return UPSTREAM.get((engine, model))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One row's verdict.

    Attributes:
        word: ``PASS``, ``FAIL`` or ``KNOWN UPSTREAM``.
        why: what failed and by how much (FAIL), or the upstream library and
            its reason (KNOWN UPSTREAM); empty for PASS.
        reference: where a KNOWN UPSTREAM bug is documented.
    """

    word: str
    why: str = ""
    reference: str = ""

    def __post_init__(self):
        if self.word not in WORDS:
            raise ValueError(f"verdict {self.word!r} is none of {', '.join(WORDS)}")

    @property
    def note(self) -> str:
        """``why`` and ``reference`` in one line ("" for PASS)."""
        return self.why + (f" (see {self.reference})" if self.reference else "")


def of_check(result, upstream: Optional[Upstream] = None) -> Verdict:
    """The verdict of a cached-vs-uncached(-vs-HF) check row.

    PASS exactly when ``result.ok``. Otherwise FAIL naming each number past its
    tolerance, except KNOWN UPSTREAM when ``upstream`` is given and the only
    failure is the HF comparison (the engine's own cached and uncached runs
    agree): the documented bug moves the engine against HF, not its cache.

    Args:
        result: a check result (``max_dlogit``, ``max_dlogit_hf``,
            ``first_divergence``, ``dtype``, ``ok``).
        upstream: the row's documented upstream bug (:func:`upstream_for`), if any.
    """
    cached_tol = tolerances.CACHED_LOGITS[result.dtype]
    hf_tol = tolerances.HF_LOGITS[result.dtype]
    own = []
    if not result.max_dlogit < cached_tol:
        own.append(f"max |cached - uncached| logit {result.max_dlogit:.2e} > tolerance {cached_tol:g}")
    if result.first_divergence is not None:
        site = result.first_divergence
        own.append(f"first divergent site {site.hook}@{site.pos} (|cached - uncached| {site.max_abs:.2e})")
    hf = []
    if result.max_dlogit_hf is not None and not result.max_dlogit_hf < hf_tol:
        hf.append(f"max |cached - HF| logit {result.max_dlogit_hf:.2e} > tolerance {hf_tol:g}")
    if not own and not hf:
        if not result.ok:  # the result judges something this function does not know: say so, never PASS
            return Verdict(FAIL, "the check's own verdict is FAIL")
        return Verdict(PASS)
    if not own and upstream is not None and result.max_dlogit_hf == result.max_dlogit_hf:  # a NaN is never "known"
        return Verdict(KNOWN_UPSTREAM, f"{upstream.library}: {upstream.reason}; {hf[0]}", upstream.reference)
    return Verdict(FAIL, "; ".join(own + hf))


def of_fault(result) -> Verdict:
    """PASS when an injected fault was localized at its documented site, FAIL otherwise."""
    if result.caught:
        return Verdict(PASS)
    return Verdict(FAIL, f"first divergence {result.found_label}, expected {result.expected_label}")


def of_generation(result) -> Verdict:
    """PASS when the cached and uncached greedy generations are identical."""
    if result.identical:
        return Verdict(PASS)
    step = result.diff.first_divergent_step
    return Verdict(FAIL, "cached and uncached generations differ" + (f" from step {step}" if step is not None else ""))


def of_finding(finding) -> Verdict:
    """KNOWN UPSTREAM when a TransformerLens finding reproduces and HF confirms it; PASS when the
    installed TransformerLens no longer shows it and agrees with HF (upstream fixed it:
    ``finding.explained`` without ``verified``); FAIL otherwise (the audit broke: a divergence
    HF does not confirm, or no divergence yet no agreement with HF).
    """
    if finding.verified:
        return Verdict(
            KNOWN_UPSTREAM,
            f"TransformerLens 3.x: {finding.claim}",
            "docs/capture.md (TransformerLens findings); interpkv.verify.findings",
        )
    if getattr(finding, "explained", False):
        return Verdict(PASS)
    return Verdict(FAIL, f"not reproduced against HF: {finding.title} on {finding.model}")


def of_saved_provenance(result) -> Verdict:
    """PASS when every span of a loaded cache was written under what the model runs under now.

    FAIL when a span was written under other interventions (a steering hook,
    an SAE, a fault the model does not have now): continued as it is, the
    cache gives what no uncached run of the model computes, and the note says
    which positions, which interventions and what to do. FAIL too when what
    wrote a span is unknown (a file saved without provenance, slots built with
    ``KVCache.from_state``): nothing shows it matches. ``result``: a
    :class:`~interpkv.verify.saved_cache.SavedCacheResult`.
    """
    from_load = " (KVCache.load warned: ProvenanceWarning)" if result.load_warnings else ""
    if result.mismatches:
        return Verdict(FAIL, "; ".join(f"the cache's {line}" for line in result.mismatches) + from_load + ". "
                       + _SAVED_ADVICE)
    if result.unknown:
        why = ("the file was saved without provenance (an interpkv before it)" if not result.saved_with_provenance
               else "its slots were not written by an interpkv forward (KVCache.from_state)")
        return Verdict(FAIL, f"what wrote the cache's {', '.join(result.unknown)} is unknown: {why}, so nothing "
                       "shows it was computed without interventions. Recompute the prefix, or save it again from "
                       "a cache interpkv wrote")
    return Verdict(PASS)


_SAVED_ADVICE = (  # what to do about a provenance mismatch (the FAIL note ends with it)
    "Continued as it is here, it attends to keys no uncached run of this model computes. To continue it, "
    "apply the same interventions in Python (fwd_hooks with an equal hook, the same SAE attached); "
    "otherwise recompute the prefix (docs/provenance.md)"
)


def of_continuation(result) -> Verdict:
    """PASS when a loaded cache, continued, gives the uncached run's logits within the dtype's tolerance."""
    tol = tolerances.CACHED_LOGITS[result.dtype]
    if result.max_dlogit is None:
        return Verdict(FAIL, result.inputs)  # nothing continued: never a PASS
    if result.max_dlogit < tol:
        return Verdict(PASS)
    why = f"max |continued - uncached| logit {result.max_dlogit:.2e} > tolerance {tol:g}"
    if result.mismatches:
        why += " (expected: the cache was written under other interventions, see the provenance row)"
    return Verdict(FAIL, why)


def saved_cache_rows(result) -> List[Tuple[str, Verdict]]:
    """The rows of a loaded cache: its provenance, and its continuation when the prefix tokens are known."""
    rows = [(f"provenance of {result.path}", of_saved_provenance(result))]
    if result.max_dlogit is not None:
        rows.append((f"continuation of {result.path}", of_continuation(result)))
    return rows


@dataclasses.dataclass
class Section:
    """The rows of one part of a run: ``(label, verdict)`` pairs."""

    title: str
    rows: List[Tuple[str, Verdict]] = dataclasses.field(default_factory=list)

    def count(self, word: str) -> int:
        return sum(v.word == word for _, v in self.rows)

    @property
    def counts(self) -> str:
        """``"16 PASS, 0 FAIL, 1 KNOWN UPSTREAM"`` (KNOWN UPSTREAM only when there is one)."""
        return _counts(self.rows)


def _counts(rows: Sequence[Tuple[str, Verdict]]) -> str:
    n = {w: sum(v.word == w for _, v in rows) for w in WORDS}
    parts = [f"{n[PASS]} {PASS}", f"{n[FAIL]} {FAIL}"]
    if n[KNOWN_UPSTREAM]:
        parts.append(f"{n[KNOWN_UPSTREAM]} {KNOWN_UPSTREAM}")
    return ", ".join(parts)


@dataclasses.dataclass
class Tally:
    """Every section of a run, and the one count they add up to."""

    sections: List[Section]

    @property
    def rows(self) -> List[Tuple[str, Verdict]]:
        return [row for s in self.sections for row in s.rows]

    def count(self, word: str) -> int:
        return sum(s.count(word) for s in self.sections)

    @property
    def ok(self) -> bool:
        """No row FAILs (exit status 0); KNOWN UPSTREAM rows do not fail a run."""
        return self.count(FAIL) == 0

    @property
    def word(self) -> str:
        return PASS if self.ok else FAIL

    @property
    def exit_status(self) -> int:
        return 0 if self.ok else 1

    def line(self) -> str:
        """``"PASS: 61 checks: 57 PASS, 0 FAIL, 4 KNOWN UPSTREAM"``: the run's one count.

        >>> Tally([Section("a", [("x", Verdict(PASS)), ("y", Verdict(KNOWN_UPSTREAM, "z"))])]).line()
        'PASS: 2 checks: 1 PASS, 0 FAIL, 1 KNOWN UPSTREAM'
        """
        rows = self.rows
        return f"{self.word}: {len(rows)} check{'s' * (len(rows) != 1)}: {_counts(rows)}"

    def breakdown(self) -> str:
        """Each section's counts, ``"zoo check 17 PASS, 0 FAIL; bug zoo 7 PASS, 0 FAIL; ..."``."""
        return "; ".join(f"{s.title} {s.counts}" for s in self.sections)


def run_tally(*, checks=(), faults=(), generation=None, other=None, upstream=None, check_title="zoo check",
              saved=None) -> Tally:
    """The sections of an ``interpkv check`` / ``interpkv demo`` run, in the order they print.

    Args:
        checks: check results (``interpkv check`` rows, the demo's zoo check).
        faults: bug-zoo results.
        generation: the greedy generation result, or None.
        other: the demo's other-implementations section (``checks``, ``faults``,
            ``findings`` and ``upstream``: label -> :class:`Upstream`), or None.
        upstream: label -> :class:`Upstream` for ``checks`` (``check --engine``).
        check_title: the first section's title.
        saved: a loaded cache's :class:`~interpkv.verify.saved_cache.SavedCacheResult`
            (``check --cache``), or None: section "loaded cache".
    """
    upstream = upstream or {}
    sections = []
    if checks:
        sections.append(Section(check_title, [(c.model, of_check(c, upstream.get(c.model))) for c in checks]))
    if saved is not None:
        sections.append(Section("loaded cache", saved_cache_rows(saved)))
    if faults:
        sections.append(Section("bug zoo", [(f"{f.fault} on {f.model}", of_fault(f)) for f in faults]))
    if generation is not None:
        sections.append(Section("generation", [(generation.model, of_generation(generation))]))
    if other is not None:
        known = getattr(other, "upstream", {})
        parts = (
            ("other engines' caches", [(c.model, of_check(c, known.get(c.model))) for c in other.checks]),
            ("engine faults", [(f"{f.fault} on {f.model}", of_fault(f)) for f in other.faults]),
            ("TransformerLens findings", [(f"{f.title} ({f.model})", of_finding(f)) for f in other.findings]),
        )
        sections += [Section(title, rows) for title, rows in parts if rows]
    return Tally(sections)
