"""``interpkv check MODEL --cache PATH`` and ``interpkv provenance PATH --html OUT``: a saved cache's provenance.

Float64 zoo models (the run takes the file's dtype). The CLI runs in-process
(``main(argv)``); each check of gpt2 also runs its zoo check (about a second).
Every FAIL tested here is also shown to be warranted by the number it rests
on (the continuation of a steered cache is measurably not the uncached run),
and every PASS by the continuation equalling the uncached run.
"""

import re
import warnings

import pytest
import torch

import interpkv
from interpkv.cache import identity
from interpkv.cli import app as cli
from interpkv.verify import verdicts
from interpkv.verify.saved_cache import check_saved_cache

F64 = torch.float64
HOOK = "blocks.0.hook_resid_post"
# Two rows, the second left-padded by 3: the continuation is checked under a mask.
PROMPT = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [0, 0, 0, 2, 7, 1, 8, 2]])
MASK = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
TOL = 1e-10  # interpkv.tolerances.CACHED_LOGITS[float64]: what the continuation row is judged at


@pytest.fixture(scope="module")
def gpt2():
    return interpkv.zoo.load("gpt2", dtype=F64)


def vector(model):
    return torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0), dtype=F64)


def saved(model, path, fwd_hooks=(), tokens=True):
    cache = interpkv.KVCache.for_model(model, 2)
    interpkv.forward(model, PROMPT, cache=cache, attention_mask=MASK, fwd_hooks=fwd_hooks)
    cache.save(path, metadata={"tokens": PROMPT.tolist()} if tokens else None)
    return str(path)


@pytest.fixture(scope="module")
def files(gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return {
        "clean": saved(gpt2, root / "clean.safetensors"),
        "steered": saved(gpt2, root / "steered.safetensors", [(HOOK, interpkv.steering.add(vector(gpt2)))]),
        "no-tokens": saved(gpt2, root / "no-tokens.safetensors", tokens=False),
    }


def run(capsys, *argv):
    status = cli.main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def flat(text):
    """The output with rich's line wrapping undone (notes wrap at 150 columns)."""
    return re.sub(r"\s+", " ", text)


def rows_of(out, path):
    """``{check: table line}`` of the loaded-cache table."""
    return {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│") and path in line}


# ------------------------------------------------------------------ the CLI
def test_a_cache_saved_under_a_steering_hook_fails_naming_the_hook(capsys, files, gpt2, tmp_path):
    report = tmp_path / "report.html"
    status, out, _ = run(capsys, "check", "gpt2", "--cache", files["steered"], "--html", str(report))
    assert status == 1
    label = f"steering.add(v#{identity.value_digest(vector(gpt2))[:4]})"
    # What wrote it (the provenance table), as the call that made the hook.
    assert re.search(rf"│ 0-7\s+│ 0-7\s+│ {re.escape(HOOK)} {re.escape(label)}", out), out
    assert "weights fingerprint: sampled-sha256:" in out
    # The mismatch row and its note: which positions, which hook, that gpt2 has none, what to do.
    rows = rows_of(out, files["steered"])
    assert "FAIL [1]" in rows[f"provenance of {files['steered']}"]
    assert (f"[1] provenance of {files['steered']}: FAIL: the cache's positions 0-7 were written under "
            f"{HOOK} {label}; gpt2 here has none.") in flat(out)
    assert "recompute the prefix" in flat(out)
    # Warranted: continued as it is, the cache is far from the uncached run.
    assert "FAIL [2]" in rows[f"continuation of {files['steered']}"]
    dlogit = float(re.search(r"max \|continued - uncached\| logit (\S+) > tolerance 1e-10", flat(out)).group(1))
    assert dlogit > 1e-3
    assert "loaded cache: 0 PASS, 2 FAIL" in out and "verdict: FAIL: 3 checks: 1 PASS, 2 FAIL" in out
    # The HTML report: the section, its FAIL rows and the provenance table.
    page = report.read_text()
    section = page[page.index("<h2>Loaded cache: "):]
    assert section.count('data-verdict="FAIL"') == 2
    assert '<div class="provenance">' in section and "<th>interventions</th>" in section
    assert f'<td class="site">{HOOK} {label}</td>' in section


def test_a_clean_cache_passes_and_its_continuation_equals_the_uncached_run(capsys, files, gpt2, tmp_path):
    report = tmp_path / "report.html"
    status, out, _ = run(capsys, "check", "gpt2", "--cache", files["clean"], "--html", str(report))
    assert status == 0, out
    assert re.search(r"│ 0-7\s+│ 0-7\s+│ none", out)
    rows = rows_of(out, files["clean"])
    assert "PASS" in rows[f"provenance of {files['clean']}"] and "PASS" in rows[f"continuation of {files['clean']}"]
    assert "loaded cache: 2 PASS, 0 FAIL" in out and "verdict: PASS: 3 checks: 3 PASS, 0 FAIL" in out
    assert "loaded cache in gpt2: 2 rows x 8 slots" in flat(out)  # as loaded (the continuation appended to it)
    page = report.read_text()
    section = page[page.index("<h2>Loaded cache: "):]
    assert section.count('data-verdict="PASS"') == 2 and "<th>interventions</th>" in section
    # The number behind the PASS, from the library: the continuation is the uncached run.
    result = check_saved_cache(gpt2, files["clean"])
    assert result.max_dlogit is not None and result.max_dlogit < TOL


def test_without_tokens_the_provenance_is_checked_and_the_continuation_is_said_not_to_be(capsys, files):
    status, out, _ = run(capsys, "check", "gpt2", "--cache", files["no-tokens"])
    assert status == 0
    assert f"continuation of {files['no-tokens']}" not in out  # no row that checked nothing
    assert "not continued: the prefix tokens are unknown (save them with metadata={'tokens':" in flat(out)
    assert "loaded cache: 1 PASS, 0 FAIL" in out


def test_provenance_html_writes_the_same_table_standalone(capsys, files, gpt2, tmp_path):
    out_file = tmp_path / "sub" / "provenance.html"
    status, out, _ = run(capsys, "provenance", files["steered"], "--html", str(out_file))
    assert status == 0 and f"report: {out_file}" in out
    page = out_file.read_text()
    label = f"steering.add(v#{identity.value_digest(vector(gpt2))[:4]})"
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page  # self-contained, no figure
    assert f'<td class="num">0-7</td><td class="num">0-7</td><td class="site">{HOOK} {label}</td>' in page
    assert "Weights fingerprint: <code>sampled-sha256:" in page
    assert "interpkv provenance " in page  # the command that wrote it
    # The same table as the check's report section.
    report = tmp_path / "check.html"
    run(capsys, "check", "gpt2", "--cache", files["steered"], "--html", str(report))
    table = re.search(r"<table><thead><tr><th>slots</th>.*?</table>", page).group(0)
    assert table in report.read_text()


def test_a_cache_saved_from_an_hf_directory_is_checked_in_that_directory(capsys, tmp_path):
    directory = tmp_path / "my-llama"
    interpkv.zoo.load_pair("llama")[1].save_pretrained(directory)
    model = interpkv.zoo.load_hf_dir(directory, dtype=F64)
    path = saved(model, tmp_path / "llama.safetensors", [(HOOK, interpkv.steering.add(vector(model), start=8))])
    status, out, _ = run(capsys, "check", str(directory), "--cache", path)
    assert status == 0, out  # a hook declared after the prefix never acted on it: not a mismatch
    assert "start=8)" in out and "loaded cache in my-llama: 2 rows x 8 slots" in flat(out)
    assert "loaded cache: 2 PASS, 0 FAIL" in out


@pytest.mark.parametrize("argv, message", [
    (["check", "gpt2", "bloom", "--cache", "{clean}"], "name the one model the cache was saved from"),
    (["check", "--cache", "{clean}"], "name the one model the cache was saved from"),
    (["check", "gpt2", "--cache", "{clean}", "--engine", "transformer_lens"], "runs with --engine interpkv"),
    (["check", "gpt2", "--cache", "no/such.safetensors"], "--cache no/such.safetensors: does not exist"),
    (["check", "gpt2", "--cache", "{clean}", "--dtype", "float32"],
     "holds a float64 cache but --dtype is float32"),
    (["check", "llama", "--cache", "{clean}"], "saved from"),  # other architecture: KVCache.load's own error
    (["check", "gpt2", "--cache", "{junk}"], "junk.bin"),
    (["provenance", "{junk}", "--html", "{tmp}/p.html"], "junk.bin"),
], ids=["two-models", "no-model", "engine", "missing", "dtype", "other-model", "not-a-cache", "provenance-junk"])
def test_bad_cache_arguments_are_one_line_and_exit_2(capsys, files, tmp_path, argv, message):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a cache")
    argv = [a.format(clean=files["clean"], junk=junk, tmp=tmp_path) for a in argv]
    status, _, err = run(capsys, *argv)
    errors = [line for line in err.splitlines() if not line.startswith("[1/1] ")]  # progress lines aside
    assert status == 2 and len(errors) == 1 and errors[0].startswith("interpkv: error: "), err
    assert message in errors[0]
    assert "checking" not in err  # before the model's own check ran
    assert not (tmp_path / "p.html").exists()


def test_help_shows_the_cache_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    check = capsys.readouterr().out
    assert "interpkv check gpt2 --cache prompt.safetensors" in check and "--cache PATH" in check
    with pytest.raises(SystemExit):
        cli.main(["provenance", "--help"])
    shown = capsys.readouterr().out
    assert "interpkv provenance prompt.safetensors --html provenance.html" in shown and "exit status:" in shown


# ---------------------------------------------------------------- the library
def test_the_continuation_row_fails_on_its_own_when_the_tokens_are_not_the_caches(gpt2, files):
    # Provenance matches, but the tokens given are not the ones stored: the numbers say so.
    result = check_saved_cache(gpt2, files["clean"], tokens=(PROMPT + 1) % gpt2.cfg.d_vocab)
    assert result.provenance_ok and result.continuation_ok is False
    (_, provenance_row), (_, continuation_row) = verdicts.saved_cache_rows(result)
    assert provenance_row.word == "PASS" and continuation_row.word == "FAIL"
    assert "see the provenance row" not in continuation_row.why  # no mismatch to blame


def test_a_steered_cache_continued_under_an_equal_hook_passes(gpt2, files):
    # What the FAIL note advises: continue it under the same intervention (rebuilt equal).
    steer = [(HOOK, interpkv.steering.add(vector(gpt2).clone()))]
    result = check_saved_cache(gpt2, files["steered"], fwd_hooks=steer)
    assert result.mismatches == [] and result.ok and result.max_dlogit < TOL
    other = [(HOOK, interpkv.steering.add(2 * vector(gpt2)))]
    result = check_saved_cache(gpt2, files["steered"], fwd_hooks=other, label="gpt2")
    assert len(result.mismatches) == 1 and "gpt2 with the hooks given has " + HOOK in result.mismatches[0]
    assert result.continuation_ok is False


def test_a_generated_cache_continues_after_its_held_back_token(gpt2, tmp_path):
    cache = interpkv.KVCache.for_model(gpt2)
    g = interpkv.generate(gpt2, PROMPT[:1], cache=cache, max_new_tokens=3)
    cache.save(tmp_path / "g.safetensors", metadata={"tokens": g.tokens.tolist()})  # Generation.tokens as is
    result = check_saved_cache(gpt2, tmp_path / "g.safetensors")
    assert "after the held-back token" in result.inputs
    assert result.ok and result.max_dlogit < TOL
    # Without the held-back token fed first, the continuation would miss a token of its context.
    assert result.seq_len == g.tokens.shape[1] - 1


def test_a_cache_of_unknown_provenance_fails_and_says_why(gpt2, tmp_path):
    source = interpkv.KVCache.for_model(gpt2)
    interpkv.forward(gpt2, PROMPT[:1], cache=source)
    n = source.seq_len
    keys, values = zip(*(layer.view(n) for layer in source.layers))
    built = interpkv.KVCache.from_state(gpt2, list(keys), list(values), source.positions, source.next_positions)
    built.save(tmp_path / "built.safetensors", metadata={"tokens": PROMPT[:1].tolist()})
    result = check_saved_cache(gpt2, tmp_path / "built.safetensors")
    assert result.unknown == ["positions 0-7"] and not result.provenance_ok
    verdict = verdicts.of_saved_provenance(result)
    assert verdict.word == "FAIL" and "KVCache.from_state" in verdict.why
    assert result.continuation_ok  # the numbers themselves are fine: the row says only what is unknown


def test_an_sae_cache_loaded_into_the_plain_model_fails_with_the_load_warning(tmp_path):
    pytest.importorskip("sae_lens")
    sae_model = interpkv.zoo.load_sae("llama", HOOK, dtype=F64)
    cache = interpkv.KVCache.for_model(sae_model)
    interpkv.forward(sae_model, PROMPT[:1], cache=cache)
    cache.save(tmp_path / "sae.safetensors", metadata={"tokens": PROMPT[:1].tolist()})
    plain = interpkv.zoo.load("llama", dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", interpkv.ProvenanceWarning)  # recorded by the check, not raised
        result = check_saved_cache(plain, tmp_path / "sae.safetensors", label="llama")
    assert len(result.load_warnings) == 1 and HOOK in result.load_warnings[0]
    verdict = verdicts.of_saved_provenance(result)
    assert verdict.word == "FAIL" and "KVCache.load warned" in verdict.why and "llama here has none" in verdict.why
    assert result.continuation_ok is False  # warranted: the keys came through the SAE
