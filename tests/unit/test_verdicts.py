"""One verdict vocabulary (PASS / FAIL / KNOWN UPSTREAM) and one count, table-driven on stand-in results."""

import dataclasses
from typing import List, Optional

import pytest
import torch

from interpkv.diagnostics.report import Site
from interpkv.verify import verdicts
from interpkv.verify.verdicts import FAIL, KNOWN_UPSTREAM, PASS, Section, Tally, Verdict

TOL = 5e-5  # tolerances.CACHED_LOGITS[float32]
HF_TOL = 1e-4  # tolerances.HF_LOGITS[float32]
UPSTREAM = verdicts.Upstream("SomeLib 1.x", "its rule is wrong for n = 6", "docs/known-bugs.md")
SITE = Site("blocks.0.attn.hook_attn_scores", 0, 8, 0, 1.0, 1.0)


@dataclasses.dataclass
class Result:
    """What of_check reads of a CheckResult; ``ok`` as CheckResult computes it."""

    max_dlogit: float
    max_dlogit_hf: Optional[float]
    first_divergence: Optional[Site] = None
    dtype: torch.dtype = torch.float32
    model: str = "m"

    @property
    def ok(self) -> bool:
        own = self.max_dlogit < TOL and self.first_divergence is None
        return own and (self.max_dlogit_hf is None or self.max_dlogit_hf < HF_TOL)


CASES = [
    # (result, upstream, expected word, words in why)
    (Result(1e-6, 1e-6), None, PASS, []),
    (Result(1e-6, None), UPSTREAM, PASS, []),  # a known bug that does not show: PASS
    (Result(1e-6, 3.3), UPSTREAM, KNOWN_UPSTREAM, ["SomeLib 1.x", "n = 6", "3.30e+00 > tolerance 0.0001"]),
    (Result(1e-6, 3.3), None, FAIL, ["max |cached - HF| logit 3.30e+00"]),
    (Result(1.0, 3.3), UPSTREAM, FAIL, ["cached - uncached", "cached - HF"]),  # its own cache fails too
    (Result(1e-6, 3.3, SITE), UPSTREAM, FAIL, ["first divergent site blocks.0.attn.hook_attn_scores@8"]),
    (Result(1.0, None), None, FAIL, ["max |cached - uncached| logit 1.00e+00 > tolerance 5e-05"]),
    (Result(float("nan"), 1e-6), None, FAIL, ["nan"]),  # NaN is never within tolerance
    (Result(1e-6, float("nan")), UPSTREAM, FAIL, ["nan"]),  # a documented wrong value does not explain a NaN
]


@pytest.mark.parametrize("result, upstream, word, why", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_of_check(result, upstream, word, why):
    verdict = verdicts.of_check(result, upstream)
    assert verdict.word == word and all(w in verdict.why for w in why), verdict
    assert (verdict.word == PASS) == result.ok  # PASS exactly when the result itself passes
    if word == KNOWN_UPSTREAM:
        assert verdict.reference == UPSTREAM.reference and UPSTREAM.reference in verdict.note


def test_of_check_never_passes_what_the_result_fails():
    class Stricter(Result):
        ok = False  # a criterion of_check does not know about

    assert verdicts.of_check(Stricter(1e-6, 1e-6)).word == FAIL


def test_known_upstream_is_found_by_engine_and_zoo_name():
    assert verdicts.upstream_for("transformer_lens", "bloom6") is verdicts.UPSTREAM[("transformer_lens", "bloom6")]
    assert verdicts.upstream_for("hf", "bloom6") is None and verdicts.upstream_for("interpkv", "bloom6") is None


def test_verdict_words_are_the_vocabulary():
    with pytest.raises(ValueError, match="none of PASS, FAIL, KNOWN UPSTREAM"):
        Verdict("known")


def _rows(*words: str) -> List:
    return [(f"r{i}", Verdict(w, "" if w == PASS else "why")) for i, w in enumerate(words)]


@pytest.mark.parametrize(
    "sections, line, status",
    [
        ([_rows(PASS, PASS), _rows(PASS)], "PASS: 3 checks: 3 PASS, 0 FAIL", 0),
        ([_rows(PASS, KNOWN_UPSTREAM), _rows(KNOWN_UPSTREAM)], "PASS: 3 checks: 1 PASS, 0 FAIL, 2 KNOWN UPSTREAM", 0),
        ([_rows(PASS, FAIL), _rows(KNOWN_UPSTREAM)], "FAIL: 3 checks: 1 PASS, 1 FAIL, 1 KNOWN UPSTREAM", 1),
        ([_rows(PASS)], "PASS: 1 check: 1 PASS, 0 FAIL", 0),
    ],
    ids=["all-pass", "known-upstream-does-not-fail", "one-fail", "singular"],
)
def test_tally_adds_the_sections_up(sections, line, status):
    tally = Tally([Section(f"s{i}", rows) for i, rows in enumerate(sections)])
    assert tally.line() == line and tally.exit_status == status
    assert sum(tally.count(w) for w in verdicts.WORDS) == len(tally.rows) == sum(len(s) for s in sections)
    assert tally.breakdown().count(";") == len(sections) - 1


def test_run_tally_sections_follow_the_run():
    @dataclasses.dataclass
    class Fault:
        fault: str
        model: str
        caught: bool
        found_label: str = "hook_embed@8"
        expected_label: str = "hook_pos_embed@8"

    @dataclasses.dataclass
    class Finding:
        title: str
        model: str
        claim: str
        verified: bool

    @dataclasses.dataclass
    class Other:
        checks: list
        faults: list
        findings: list
        upstream: dict

    bloom6 = Result(1e-6, 3.3, model="bloom6 (transformer_lens)")
    other = Other([Result(1e-6, 1e-6, model="gpt2 (hf)"), bloom6], [Fault("corrupt", "gpt2", True)],
                  [Finding("slopes", "bloom6", "wrong slopes", True), Finding("gone", "gpt2", "fixed upstream?", False)],
                  {"bloom6 (transformer_lens)": UPSTREAM})
    tally = verdicts.run_tally(checks=[Result(1e-6, 1e-6)], faults=[Fault("stale", "gpt2", False)], other=other)
    assert [s.title for s in tally.sections] == [
        "zoo check", "bug zoo", "other engines' caches", "engine faults", "TransformerLens findings"]
    words = {label: v.word for label, v in tally.rows}
    assert words == {
        "m": PASS, "stale on gpt2": FAIL, "gpt2 (hf)": PASS, "bloom6 (transformer_lens)": KNOWN_UPSTREAM,
        "corrupt on gpt2": PASS, "slopes (bloom6)": KNOWN_UPSTREAM, "gone (gpt2)": FAIL,
    }
    assert tally.line() == "FAIL: 7 checks: 3 PASS, 2 FAIL, 2 KNOWN UPSTREAM"


@dataclasses.dataclass
class Saved:
    """What the loaded-cache verdicts read of a SavedCacheResult."""

    max_dlogit: Optional[float] = 1e-15
    mismatches: List[str] = dataclasses.field(default_factory=list)
    unknown: List[str] = dataclasses.field(default_factory=list)
    load_warnings: List[str] = dataclasses.field(default_factory=list)
    saved_with_provenance: bool = True
    dtype: torch.dtype = torch.float64
    path: str = "c.safetensors"
    inputs: str = "not continued: the prefix tokens are unknown"


MISMATCH = "positions 0-7 were written under blocks.0.hook_resid_post steering.add(v#3f2a); gpt2 here has none"

SAVED_CASES = [
    # (result, provenance word, words in its why, continuation row: None or (word, words in its why))
    (Saved(), PASS, [], (PASS, [])),
    (Saved(max_dlogit=None), PASS, [], None),  # nothing continued: no row that checked nothing
    (Saved(mismatches=[MISMATCH], max_dlogit=1.66), FAIL, ["the cache's " + MISMATCH, "recompute the prefix"],
     (FAIL, ["1.66e+00 > tolerance 1e-10", "see the provenance row"])),
    (Saved(mismatches=[MISMATCH], load_warnings=["w"]), FAIL, ["KVCache.load warned"], (PASS, [])),
    (Saved(unknown=["positions 0-7"], saved_with_provenance=False), FAIL, ["positions 0-7 is unknown", "without provenance"],
     (PASS, [])),
    (Saved(unknown=["position 3"]), FAIL, ["KVCache.from_state"], (PASS, [])),
    (Saved(max_dlogit=2e-10), PASS, [], (FAIL, ["2.00e-10 > tolerance 1e-10"])),
    (Saved(max_dlogit=float("nan")), PASS, [], (FAIL, ["nan > tolerance"])),  # NaN is never within tolerance
    (Saved(max_dlogit=1e-6, dtype=torch.float32), PASS, [], (PASS, [])),  # judged at the dtype's tolerance
]


@pytest.mark.parametrize("result, word, why, continuation", SAVED_CASES)
def test_loaded_cache_rows(result, word, why, continuation):
    rows = verdicts.saved_cache_rows(result)
    assert rows[0][0] == "provenance of c.safetensors" and rows[0][1].word == word
    assert all(w in rows[0][1].why for w in why), rows[0][1].why
    if continuation is None:
        assert len(rows) == 1
        assert verdicts.of_continuation(result).word == FAIL  # asked anyway: never a PASS for nothing run
    else:
        (label, verdict), = rows[1:]
        assert label == "continuation of c.safetensors" and verdict.word == continuation[0]
        assert all(w in verdict.why for w in continuation[1]), verdict.why
    tally = verdicts.run_tally(checks=[Result(1e-6, 1e-6)], saved=result)
    assert [s.title for s in tally.sections] == ["zoo check", "loaded cache"]
