"""Tolerances follow the dtype: half precision is not failed by rounding, and a real fault still is.

The numbers and their reasons are in interpkv.tolerances (measured over the zoo).
"""

import pytest
import torch

import interpkv
from interpkv import faults, tolerances
from interpkv.cli import app as cli
from interpkv.generation.result import GenerationDiff

HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
def test_compare_default_tolerance_follows_the_dtype(dtype):
    model = interpkv.zoo.load("llama", dtype=dtype)
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    report = interpkv.compare(model, tokens, steps=[8, 1, 1, 6])
    assert report.dtype == dtype and report.tolerance() == (tolerances.SITE[dtype],) * 2
    assert not report.ok(atol=1e-5, rtol=1e-5)  # float32's tolerance: rounding alone fails it
    assert report.ok(), report.first_divergence()
    with faults.inject(model, "stale_position_offset"):
        broken = interpkv.compare(model, tokens, steps=[8, 1, 1, 6])
    assert not broken.ok()  # a real cache bug is far above the half-precision tolerance


def test_diff_takes_the_coarser_dtype():
    model32 = interpkv.zoo.load("gpt2")
    model16 = interpkv.zoo.load("gpt2", dtype=torch.float16)
    tokens = torch.arange(1, 9)[None]
    report = interpkv.diff(interpkv.capture(model16, tokens), interpkv.capture(model32, tokens))
    assert report.dtype == torch.float16
    assert interpkv.diff(interpkv.capture(model32, tokens), interpkv.capture(model32, tokens)).dtype == torch.float32


def test_a_top1_flip_on_a_tie_is_not_a_divergence():
    reference = torch.tensor([[2.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    exact = torch.tensor([[2.0, 2.001, 0.0], [1.0, 0.0, 3.0]])  # an exact tie broken the other way
    diff = GenerationDiff.from_step_logits([exact], [reference], atol=0.01)
    assert diff.top1_agree == [False] and diff.top1_tied == [True] and diff.ok
    near = GenerationDiff.from_step_logits([torch.tensor([[1.99, 2.0]])], [torch.tensor([[2.0, 1.995]])], atol=0.01)
    assert near.top1_tied == [True] and near.ok  # within the tolerance
    real = GenerationDiff.from_step_logits([torch.tensor([[1.0, 2.0]])], [torch.tensor([[2.0, 1.0]])], atol=0.01)
    assert real.top1_tied == [False] and real.first_divergent_step == 0
    assert diff.to_frame().top1_tied.tolist() == [True]


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_compare_generation_in_bfloat16_passes_clean_runs(name):
    model = interpkv.zoo.load(name, dtype=torch.bfloat16)
    for seed in range(6):
        tokens = torch.randint(1, model.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(seed))
        diff = interpkv.compare_generation(model, tokens, max_new_tokens=8)
        assert diff.ok, (seed, diff)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_check_runs_in_half_precision(capsys, dtype):
    status = cli.main(["check", "llama", "gpt2", "--dtype", dtype])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"({dtype})" in out and "PASS" in out
