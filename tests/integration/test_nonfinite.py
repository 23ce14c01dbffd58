"""A model whose output is NaN never passes: compare, compare_generation, diff and ``interpkv check``.

interpkv exists to catch silent wrongness; a NaN both runs compute is not
agreement. Each check plants NaN in one column of the embedding, so every
activation is NaN in the cached and the uncached run alike.
"""

import math

import torch

import interpkv
from interpkv.cli import app as cli
from interpkv.diagnostics.stats import NONFINITE_A, NONFINITE_B, site_stats
from interpkv.generation.result import GenerationDiff
from interpkv.verify import checks

INF, NAN = float("inf"), float("nan")


def _nan_model(name="llama"):
    model = interpkv.zoo.load(name)
    with torch.no_grad():
        model.embed.W_E[:, 0] = NAN
    return model


def test_nan_everywhere_fails_compare_and_names_both_runs_at_the_first_site():
    model = _nan_model()
    assert torch.isnan(model(torch.arange(6)[None])).all()  # the premise: NaN everywhere
    report = interpkv.compare(model, torch.arange(6)[None], steps=[3, 1, 2])
    assert not report.ok()
    assert report.logits_max_abs == INF
    site = report.first_divergence()
    assert site.hook == "hook_embed" and site.pos == 0
    assert site.nonfinite == "NaN/inf in both the cached run and the uncached run"
    assert "NaN/inf in both" in repr(report)


def test_nan_in_one_run_only_names_that_run():
    a = torch.tensor([[1.0, NAN], [1.0, 2.0], [INF, 2.0], [INF, 1.0]])
    b = torch.tensor([[1.0, 2.0], [1.0, NAN], [INF, 2.0], [1.0, 1.0]])
    stats = site_stats(a, b)
    assert stats["max_abs"].tolist() == [INF, INF, 0.0, INF]
    assert stats["nonfinite"].tolist() == [NONFINITE_A, NONFINITE_B, 0, NONFINITE_A]


def test_nan_everywhere_fails_compare_generation():
    model = _nan_model()
    diff = interpkv.compare_generation(model, torch.tensor([[3, 1, 4, 1]]), max_new_tokens=3)
    assert not diff.ok and diff.first_divergent_step == 0
    assert diff.kl == [INF] * 3 and not any(math.isnan(k) for k in diff.kl)
    assert diff.nonfinite.startswith("NaN/inf logits in both the cached run and the uncached run at step 0")


def test_generation_diff_nan_in_one_run_at_a_later_step():
    good = torch.zeros(2, 4)
    bad = good.clone()
    bad[1, 2] = NAN
    diff = GenerationDiff.from_step_logits([good, bad], [good, good], names=("cached", "uncached"))
    assert diff.first_divergent_step == 1 and diff.divergent() == [False, True]
    assert diff.nonfinite == "NaN/inf logits in cached at step 1 (row 1)"


def test_nan_everywhere_fails_the_check_engine():
    result = checks.check_model(_nan_model("gpt2"), label="nan-gpt2")
    assert not result.ok and result.verdict == "FAIL"
    assert "NaN/inf in both" in result.first_divergence_label


def test_interpkv_check_fails_a_nan_hf_directory(tmp_path, capsys):
    _, hf = interpkv.zoo.load_pair("llama")
    with torch.no_grad():
        hf.get_input_embeddings().weight[:, 0] = NAN
    hf.save_pretrained(tmp_path / "nan-llama")
    capsys.readouterr()  # transformers' own save progress bar
    status = cli.main(["check", str(tmp_path / "nan-llama")])
    err = capsys.readouterr().err
    # Refused at conversion (a model that is NaN has no cache to check), on one line naming NaN.
    assert status == 2, err
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and "own logits are NaN/inf" in error_lines[0]
