"""``interpkv check`` / ``interpkv demo`` and the checks engine behind them.

The CLI runs in-process (``main(argv)``) with pytest capturing stdout, so
stdout is not a terminal: exactly the CI situation the fixed log width is for.
"""

import re
from collections import Counter

import pytest
import torch

from interpkv import zoo
from interpkv.cli import app as cli
from interpkv.diagnostics.report import Site
from interpkv.verify import checks


def run(capsys, *argv):
    status = cli.main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_check_zoo_models_prints_a_table_and_passes(capsys):
    status, out, _ = run(capsys, "check", "gpt2", "bloom")
    assert status == 0, out
    for header in ("model", "scheme", "|cached-uncached|", "|cached-HF|", "first divergence", "verdict"):
        assert header in out
    rows = {line.split()[1]: line for line in out.splitlines() if re.match(r"^\W+(gpt2|bloom)\b", line)}
    assert set(rows) == {"gpt2", "bloom"}
    assert all("PASS" in row for row in rows.values())
    assert "verdict: PASS: 2 checks: 2 PASS, 0 FAIL" in out


def test_table_lines_do_not_wrap_when_stdout_is_not_a_terminal(capsys):
    # CI logs: without a fixed width, rich wraps at 80 columns and splits the
    # scheme of "gptj" over several lines.
    status, out, _ = run(capsys, "check", "gptj")
    assert status == 0
    row = [line for line in out.splitlines() if "gptj" in line]
    assert len(row) == 1 and "rotary (adjacent pairs, rotary_dim 8)" in row[0]


def test_a_failing_check_exits_1(capsys, monkeypatch):
    monkeypatch.setitem(checks.CACHED_TOL, torch.float32, 0.0)  # nothing is below 0
    status, out, _ = run(capsys, "check", "gpt2")
    assert status == 1
    row = [line for line in out.splitlines() if line.startswith("│ gpt2 ")]
    assert len(row) == 1 and "FAIL [1]" in row[0]
    assert "[1] gpt2: FAIL: max |cached - uncached| logit" in out and "> tolerance 0" in out
    assert "verdict: FAIL: 1 check: 0 PASS, 1 FAIL" in out


def test_unknown_model_exits_2_and_names_the_choices(capsys):
    status, _, err = run(capsys, "check", "no-such-model")
    assert status == 2
    assert "no-such-model" in err and "llama" in err and "save_pretrained" in err
    assert len(err.strip().splitlines()) == 1


def test_check_a_local_hf_directory(capsys, tmp_path):
    _, hf = zoo.load_pair("llama")
    hf.save_pretrained(tmp_path / "my-llama")
    status, out, _ = run(capsys, "check", str(tmp_path / "my-llama"))
    assert status == 0, out
    row = [line for line in out.splitlines() if "my-llama" in line]
    assert len(row) == 1 and "PASS" in row[0] and "rotary" in row[0]
    assert not row[0].split("│")[4].strip() == "-"  # an HF comparison ran


def test_directory_without_config_exits_2(capsys, tmp_path):
    status, _, err = run(capsys, "check", str(tmp_path))
    assert status == 2 and "config.json" in err


def test_check_html_report_is_self_contained(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(checks.CACHED_TOL, torch.float32, 0.0)  # a failing model keeps its heatmap
    path = tmp_path / "sub" / "report.html"
    status, out, _ = run(capsys, "check", "neox", "--html", str(path))
    assert status == 1
    page = path.read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page), "no external script may load"
    assert not re.search(r"<link[^>]*href\s*=\s*[\"']https?:", page)
    assert "Plotly.newPlot" in page and page.count('class="figure"') == 1
    assert 'data-figure="heatmap:neox"' in page


def test_check_result_reports_first_divergence():
    result = checks.check_zoo(["gpt2"])[0]
    assert result.first_divergence is None and result.first_divergence_label == "-"
    assert result.report is not None and result.ok
    broken = checks.CheckResult(
        "x", "s", torch.float32, 0.0, None, [1], first_divergence=Site("hook_embed", None, 3, 0, 1.0, 1.0)
    )
    assert not broken.ok and broken.first_divergence_label == "hook_embed@3"


@pytest.mark.parametrize("fault, model", checks.BUG_ZOO, ids=[f"{f}-{m}" for f, m in checks.BUG_ZOO])
def test_bug_zoo_catches_each_fault_at_its_site(fault, model):
    result = checks.check_fault(fault, model)
    assert result.caught, (result.found_label, result.expected_label)


def test_fault_not_caught_when_site_differs():
    result = checks.check_fault("no_cache_history", "gpt2")
    moved = checks.FaultResult(result.fault, result.model, result.scheme, ("hook_embed", 8), result.found)
    assert not moved.caught
    nothing = checks.FaultResult(result.fault, result.model, result.scheme, result.expected, None)
    assert not nothing.caught and nothing.found_label == "-"


def test_greedy_pair_is_identical_with_and_without_cache():
    model = zoo.load("mistral", dtype=torch.float64)
    prompt = torch.randint(0, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    new_a, new_b, diff = checks.greedy_pair(model, prompt, 6)
    assert torch.equal(new_a, new_b) and new_a.shape == (2, 6)
    assert diff.ok and max(diff.logits_max_abs) < 1e-10


def _terminal_verdicts(out: str) -> Counter:
    """Every verdict word the terminal shows, one per row (wrapped rows continue with an empty cell)."""
    words = Counter()
    for line in out.splitlines():
        if line.startswith("│"):
            cell = [c.strip() for c in line.strip().strip("│").split("│")][-1]
            if cell:
                words[re.sub(r" \[\d+\]$", "", cell)] += 1
        elif line.startswith("generation: "):
            words[line.split(": ", 1)[1].strip()] += 1
    return words


def _html_verdicts(page: str) -> Counter:
    return Counter(re.findall(r'data-verdict="([A-Z ]+)"', page))


def _count_line(words: Counter) -> str:
    n = sum(words.values())
    known = f", {words['KNOWN UPSTREAM']} KNOWN UPSTREAM" if words["KNOWN UPSTREAM"] else ""
    return f"{n} check{'s' * (n != 1)}: {words['PASS']} PASS, {words['FAIL']} FAIL{known}"


def test_demo_prints_every_section_and_writes_the_report(capsys, tmp_path, monkeypatch):
    # The whole demo on a subset (the full zoo is `make demo`'s job); bloom6 for TransformerLens's
    # documented ALiBi-slope bug, where there is one.
    monkeypatch.setattr(zoo, "names", lambda: ["gpt2", "bloom", "bloom6"])
    monkeypatch.setattr(checks, "BUG_ZOO", (("stale_position_offset", "gpt2"), ("alibi_unsliced", "bloom")))
    path = tmp_path / "demo.html"
    status, out, _ = run(capsys, "demo", "--html", str(path))
    page = path.read_text()
    verdict = [line for line in out.splitlines() if line.startswith("verdict: ")]
    assert len(verdict) == 1, out
    # One vocabulary, one count: the terminal's rows, the HTML's rows, both count lines and the exit status agree.
    terminal, html_words = _terminal_verdicts(out), _html_verdicts(page)
    assert terminal == html_words and set(terminal) <= {"PASS", "FAIL", "KNOWN UPSTREAM"}, (terminal, html_words)
    word = "PASS" if terminal["FAIL"] == 0 else "FAIL"
    assert verdict[0] == f"verdict: {word}: {_count_line(terminal)}"
    header = re.search(r'<p class="verdict">(.*?)</p>', page).group(1)
    assert re.sub(r"<[^>]+>", "", header).startswith(f"Verdict: {word}: {_count_line(terminal)} (generated ")
    assert status == (0 if word == "PASS" else 1) == 0, out
    # TransformerLens's bloom6 against HF: KNOWN UPSTREAM exactly when TL still disagrees with HF there.
    tl_bloom6 = [line for line in out.splitlines() if line.startswith("│ bloom6 (transformer_lens)")]
    gap = float(tl_bloom6[0].split("│")[4])
    expected = "KNOWN UPSTREAM" if gap > checks.HF_TOL[torch.float32] else "PASS"
    assert expected in tl_bloom6[0]
    if expected == "KNOWN UPSTREAM":
        assert "[1] bloom6 (transformer_lens): KNOWN UPSTREAM: TransformerLens 3.x: ALiBi slope" in out
        assert 'data-figure="vs-hf:bloom6 (transformer_lens)"' in page  # the quantity that failed, plotted
        assert 'class="known" data-verdict="KNOWN UPSTREAM"' in page and "docs/known-bugs.md" in page
    assert "bug zoo" in out and "alibi_unsliced" in out
    assert 'data-figure="fault:alibi_unsliced:bloom"' in page and 'data-figure="heatmap:' not in page  # all pass
    assert "3 PASS</span>" in page and "gpt2, bloom, bloom6" in page
    if cli.GENERATION_MODEL in zoo.trained_names():
        assert "generation 1 PASS" in out and 'data-figure="generation:' in page
    # Every section is still there (the demo shares models between them, see cli/runtime).
    for title in (
        "interpkv: cached vs uncached vs HuggingFace (float32)",
        "bug zoo: known cache bugs, injected and localized (float64)",
        "other implementations: their own caches, cached vs uncached (float32)",
        "engine faults: a stored key corrupted in each engine's cache update",
        "TransformerLens 3.x cache findings, checked against HF (teacher forcing)",
    ):
        assert title in out, title
    for engine_row in ("gpt2 (transformer_lens)", "bloom (transformer_lens)", "gpt2 (hf)", "bloom (hf)"):
        assert engine_row in out, engine_row
    for finding in ("ALiBi slopes, 6 heads", "generate, learned positions", "stale ALiBi matrix"):
        assert finding in out, finding
    assert "engine faults: 4 PASS, 0 FAIL" in out
    for heading in ("<h2>Cached vs uncached vs HuggingFace", "<h2>Bug zoo: known cache bugs, injected and localized",
                    "<h2>Other implementations: TransformerLens's and HuggingFace's own caches</h2>"):
        assert heading in page, heading


def test_an_engine_row_failing_against_hf_says_why_and_plots_that_quantity(capsys, tmp_path, monkeypatch):
    from interpkv.verify import verdicts

    path = tmp_path / "report.html"
    argv = ["check", "bloom6", "--engine", "transformer_lens", "--html", str(path)]
    status, out, _ = run(capsys, *argv)
    row = [line for line in out.splitlines() if line.startswith("│ bloom6 (transformer_lens)")]
    assert len(row) == 1 and "TL past_kv_cache: alibi, 6 heads" in row[0]  # the engine's own implementation
    gap = float(row[0].split("│")[4])
    if not gap > checks.HF_TOL[torch.float32]:  # TransformerLens fixed its ALiBi slopes: nothing to explain
        assert "PASS" in row[0] and status == 0
        return
    page = path.read_text()
    assert "KNOWN UPSTREAM [1]" in row[0] and status == 0  # documented upstream: reported, not a failure
    assert "[1] bloom6 (transformer_lens): KNOWN UPSTREAM: TransformerLens 3.x" in out and "known-bugs.md" in out
    assert "verdict: PASS: 1 check: 0 PASS, 0 FAIL, 1 KNOWN UPSTREAM" in out
    assert 'data-figure="vs-hf:bloom6 (transformer_lens)"' in page and 'data-figure="heatmap:' not in page
    # Without the documented reason the same row is a FAIL (exit 1) that names the number and plots it.
    monkeypatch.setattr(verdicts, "UPSTREAM", {})
    status, out, _ = run(capsys, *argv)
    assert status == 1 and "FAIL [1]" in out and "max |cached - HF| logit" in out
    assert 'data-figure="vs-hf:bloom6 (transformer_lens)"' in path.read_text()


@pytest.mark.skipif(cli.GENERATION_MODEL not in zoo.trained_names(), reason="no trained zoo weights on this branch")
def test_demo_generation_is_identical_with_and_without_cache():
    result = checks.check_generation(cli.GENERATION_MODEL, cli.GENERATION_PROMPT, max_new_tokens=20)
    assert result.identical and len(result.cached) == 20
    assert "\ufffd" not in result.cached  # decodable characters only


def test_zoo_checks_run_on_one_torch_thread_and_give_the_callers_back(capsys, monkeypatch):
    # Tiny zoo models: a thread pool only adds spin-wait time (interpkv.cli.runtime).
    seen, original = [], checks.check_model
    monkeypatch.setattr(checks, "check_model", lambda *a, **k: (seen.append(torch.get_num_threads()), original(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        status, _, _ = run(capsys, "check", "gpt2")
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert status == 0 and seen == [1] and after == 2


def test_a_run_naming_an_hf_directory_keeps_the_callers_threads():
    from interpkv.cli.runtime import torch_threads, zoo_only

    assert zoo_only([]) and zoo_only(["gpt2", "llama"]) and not zoo_only(["gpt2", "./my-model"])
    before = torch.get_num_threads()
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with torch_threads(1):
        torch.set_num_threads(2)  # even a block that changes it hands the caller's count back
    assert torch.get_num_threads() == before


def _untouched(model, fresh) -> list:
    """What differs between a model and a fresh load of it: weights, hooks, overridden methods, TL's ALiBi memo."""
    problems = [k for k, v in fresh.state_dict().items() if not torch.equal(model.state_dict()[k], v)]
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or {"forward", "get_residual"} & set(vars(module)):
            problems.append(f"{name or type(model).__name__}: hook or patched method left behind")
        if getattr(module, "fwd_hooks", None) or getattr(module, "bwd_hooks", None):
            problems.append(f"{name}: TransformerLens hook left behind")
    for block, fresh_block in zip(getattr(model, "blocks", ()), getattr(fresh, "blocks", ())):
        if getattr(block.attn, "alibi", None) is not None and getattr(fresh_block.attn, "alibi", None) is None:
            problems.append("a memoized ALiBi matrix left behind")
    return problems


def test_demo_sections_leave_the_models_they_share_as_they_found_them():
    # interpkv demo builds each zoo model once and hands it to every section (verify/models.Models):
    # safe only because no section changes a model it is handed.
    from interpkv.verify import findings
    from interpkv.verify.engine_checks import check_engine, engine_faults
    from interpkv.verify.models import Models

    built = Models()
    first = checks.bug_zoo(models=built)
    checks.check_zoo(["bloom", "llama"], models=built)
    for engine in ("transformer_lens", "hf"):
        check_engine("bloom", engine, models=built)
    engine_faults(models=built)
    findings.all_findings(load_pair=built.pair)
    assert {("bloom", torch.float64), ("gpt2", torch.float64), ("bloom6", torch.float64)} <= set(built._built)
    for (name, dtype), (tl, hf) in built._built.items():
        fresh_tl, fresh_hf = Models(shared=False).with_twin(name, dtype)
        assert _untouched(tl, fresh_tl) == [], (name, dtype)
        assert hf is None or _untouched(hf, fresh_hf) == [], (name, dtype)
    again = checks.bug_zoo(models=built)  # and the same models still give the same answers
    assert [(r.found_label, r.report.logits_max_abs) for r in again] == [
        (r.found_label, r.report.logits_max_abs) for r in first
    ]
