"""compare audits the path that actually runs: the unrecorded (fused) cached steps too.

A fault planted only in the fused attention of decode steps (one query per
row, which only an unrecorded forward takes) must fail ``compare().ok()``;
before, recording every hook forced the explicit path and the report was clean.
"""

import pytest
import torch

import interpkv
from interpkv.core.attention import Step
from interpkv.diagnostics.fastpath import FAST_LOGITS

TOL = 1e-10  # float64: summation-order noise only


@pytest.fixture
def fused_decode_fault(monkeypatch):
    fused = Step._fused

    def faulty(self, attn, local_window, q, keys, values):
        z = fused(self, attn, local_window, q, keys, values)
        return z + 0.5 if q.shape[1] == 1 else z  # decode steps only (q: [batch, pos, head, d_head])

    monkeypatch.setattr(Step, "_fused", faulty)


def test_clean_run_is_ok_and_reports_the_fast_path():
    model = interpkv.zoo.load("llama", dtype=torch.float64)
    report = interpkv.compare(model, torch.arange(1, 11)[None], steps=[6, 1, 1, 2])
    assert report.audited == [FAST_LOGITS] and report.ok(atol=TOL, rtol=TOL)
    assert bool((~torch.isnan(report.stats[FAST_LOGITS]["max_abs"])).all())  # every position audited
    assert report.hooks[-1] == "logits"


@torch.no_grad()
def test_a_fault_only_in_the_fast_path_is_caught(fused_decode_fault):
    model = interpkv.zoo.load("llama", dtype=torch.float64)
    tokens = torch.arange(1, 11)[None]
    cache = interpkv.KVCache.for_model(model)
    interpkv.forward(model, tokens[:, :6], cache=cache)
    decoded = interpkv.forward(model, tokens[:, 6:7], cache=cache)
    real_gap = (decoded[:, 0] - interpkv.forward(model, tokens[:, :7])[:, -1]).abs().max()
    assert real_gap > 1e-3  # the fault is real where it runs
    report = interpkv.compare(model, tokens, steps=[6, 1, 1, 2])
    assert not report.ok(atol=TOL, rtol=TOL)
    site = report.first_divergence(atol=TOL, rtol=TOL)
    assert site.hook == FAST_LOGITS and site.pos == 6
    assert report.hook_max_abs()["logits"] < TOL  # the recorded (explicit) path is clean
    assert interpkv.compare(model, tokens, steps=[6, 1, 1, 2], fast_path=False).ok(atol=TOL, rtol=TOL)
