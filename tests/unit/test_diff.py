"""Pure functions of capture/diff: site statistics, step splitting, name filters, reports."""

import math

import pytest
import torch

import interpkv
from interpkv.diagnostics.capture import names_filter, split_steps
from interpkv.diagnostics.record import Record, is_attention_hook, split_hook_name
from interpkv.diagnostics.report import DivergenceReport
from interpkv.diagnostics.stats import site_stats
from interpkv.generation.result import GenerationDiff

INF, NAN = float("inf"), float("nan")

STATS_CASES = [
    # id, a, b, max_abs, rel, cos
    ("equal", [1.0, 2.0], [1.0, 2.0], 0.0, 0.0, 1.0),
    ("scaled", [2.0, 4.0], [1.0, 2.0], 2.0, 1.0, 1.0),
    ("orthogonal", [0.0, 1.0], [1.0, 0.0], 1.0, math.sqrt(2.0), 0.0),
    ("masked scores equal", [-INF, 3.0], [-INF, 3.0], 0.0, 0.0, 1.0),
    ("masked in one only", [-INF, 3.0], [1.0, 3.0], INF, INF, 1.0),
    ("NaN in both", [NAN, 3.0], [NAN, 3.0], INF, INF, 1.0),  # a NaN model never agrees with itself
    ("absent in one", [NAN, 3.0], [2.0, 3.0], INF, INF, 1.0),
    ("zero reference", [1e-3, 0.0], [0.0, 0.0], 1e-3, INF, 0.0),
    ("both zero", [0.0, 0.0], [0.0, 0.0], 0.0, 0.0, 1.0),
]


@pytest.mark.parametrize("a,b,max_abs,rel,cos", [c[1:] for c in STATS_CASES], ids=[c[0] for c in STATS_CASES])
def test_site_stats(a, b, max_abs, rel, cos):
    stats = site_stats(torch.tensor([a]), torch.tensor([b]))
    assert stats["max_abs"].item() == pytest.approx(max_abs)
    assert stats["rel"].item() == pytest.approx(rel)
    assert stats["cos"].item() == pytest.approx(cos)


def test_site_stats_reduces_trailing_axes_per_site():
    a = torch.zeros(3, 2, 4, dtype=torch.float64)
    b = a.clone()
    b[1, 1, 3] = 0.5
    stats = site_stats(a, b)
    assert stats["max_abs"].tolist() == [0.0, 0.5, 0.0]


def test_site_stats_fast_path_equals_general_path():
    """A block of finite sites takes the fast path; with one NaN site in it, the general one.

    The finite sites' statistics must be the same bit for bit either way.
    """
    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a = b + 1e-3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    a[2] = b[2]  # an exactly equal site
    alone = site_stats(a, b)  # every entry finite: fast path
    a_nan, b_nan = torch.cat([a, torch.full((1, 5), NAN)]), torch.cat([b, torch.full((1, 5), NAN)])
    mixed = site_stats(a_nan, b_nan)  # one NaN site: general path
    for name in alone:
        assert torch.equal(alone[name], mixed[name][:6]), name
    assert mixed["max_abs"][6].item() == INF  # NaN in both runs is a failure, not agreement


def test_site_stats_in_blocks_equals_one_block(monkeypatch):
    """Sites are reduced in blocks of SITE_BLOCK elements: the block size changes nothing."""
    from interpkv.diagnostics import stats as stats_module

    g = torch.Generator().manual_seed(1)
    b = torch.randn(9, 4, 3, generator=g)
    a = b + 1e-4 * torch.randn(9, 4, 3, generator=g)
    a[4, 0, 0] = NAN
    whole = site_stats(a, b)
    kl_whole = stats_module.kl_divergence(a[:, 0], b[:, 0])
    monkeypatch.setattr(stats_module, "SITE_BLOCK", 25)  # 2 sites per block
    blocked = site_stats(a, b)
    for name in whole:
        assert torch.equal(torch.nan_to_num(whole[name], nan=-1.0), torch.nan_to_num(blocked[name], nan=-1.0))
    kl_blocked = stats_module.kl_divergence(a[:, 0], b[:, 0])
    assert torch.equal(kl_whole.nan_to_num(nan=-1.0), kl_blocked.nan_to_num(nan=-1.0))
    assert blocked["max_abs"][4].item() == INF


@pytest.mark.parametrize(
    "n,steps,expected",
    [(12, [6, 1, 1, 4], [6, 1, 1, 4]), (5, None, [5]), (3, (1, 1, 1), [1, 1, 1])],
    ids=["chunks", "none", "tuple"],
)
def test_split_steps(n, steps, expected):
    assert split_steps(n, steps) == expected


def test_split_steps_names_both_numbers():
    with pytest.raises(ValueError, match=r"sum to 11 .* 12 positions"):
        split_steps(12, [6, 1, 4])
    with pytest.raises(ValueError, match="at least 1"):
        split_steps(2, [2, 0])


FILTER_CASES = [
    ("none", None, ["hook_embed", "blocks.0.attn.hook_q"], [True, True]),
    ("substring", "attn", ["hook_embed", "blocks.0.attn.hook_q"], [False, True]),
    ("list", ["hook_embed"], ["hook_embed", "blocks.0.hook_embed_x"], [True, False]),
    ("callable", lambda n: n.endswith("hook_q"), ["blocks.1.attn.hook_q", "hook_embed"], [True, False]),
]


@pytest.mark.parametrize("names,probe,expected", [c[1:] for c in FILTER_CASES], ids=[c[0] for c in FILTER_CASES])
def test_names_filter(names, probe, expected):
    keep = names_filter(names)
    assert [keep(p) for p in probe] == expected


@pytest.mark.parametrize(
    "name,expected",
    [("blocks.3.attn.hook_q", (3, "attn.hook_q")), ("hook_embed", (None, "hook_embed")), ("logits", (None, "logits"))],
)
def test_split_hook_name(name, expected):
    assert split_hook_name(name) == expected


def test_attention_hooks():
    assert is_attention_hook("blocks.0.attn.hook_pattern")
    assert is_attention_hook("blocks.2.attn.hook_attn_scores")
    assert not is_attention_hook("blocks.0.attn.hook_z")


def _report(errors):
    """A report over hooks in the given order, from {hook: [batch][pos] max_abs}."""
    stats = {}
    for hook, grid in errors.items():
        err = torch.tensor(grid, dtype=torch.float64)
        stats[hook] = {"max_abs": err, "rel": err, "cos": torch.ones_like(err), "scale": torch.ones_like(err)}
    kl = torch.zeros_like(next(iter(stats.values()))["max_abs"])
    return DivergenceReport(list(errors), stats, kl)


def test_first_divergence_is_earliest_hook_then_lowest_position():
    report = _report(
        {
            "hook_embed": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
            "blocks.0.attn.hook_q": [[0.0, 0.0, 1e-3], [0.0, 1e-3, 0.0]],
            "blocks.0.hook_resid_post": [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
            "logits": [[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]],
        }
    )
    site = report.first_divergence(atol=1e-5, rtol=0)
    assert (site.hook, site.layer, site.pos, site.batch) == ("blocks.0.attn.hook_q", 0, 1, 1)
    assert site.max_abs == 1e-3
    assert not report.ok(atol=1e-5, rtol=0)
    # Looser: the residual is next; looser still: nothing but the logits.
    assert report.first_divergence(atol=1e-2, rtol=0).hook == "blocks.0.hook_resid_post"
    assert report.first_divergence(atol=2.0, rtol=0).hook == "logits"
    assert report.ok(atol=10.0, rtol=0)
    assert report.logits_max_abs == 9.0


def test_rtol_scales_with_reference_magnitude():
    report = _report({"hook_embed": [[1e-3]], "logits": [[0.0]]})
    report.stats["hook_embed"]["scale"][:] = 100.0
    assert report.first_divergence(atol=0, rtol=1e-4) is None  # 1e-3 <= 1e-4 * 100
    assert report.first_divergence(atol=0, rtol=1e-6).hook == "hook_embed"


def test_to_frame_has_a_row_per_site():
    report = _report({"blocks.1.mlp.hook_post": [[0.0, NAN], [1.0, 2.0]], "logits": [[0.0, NAN], [0.0, 0.0]]})
    frame = report.to_frame()
    assert list(frame.columns[:6]) == ["hook", "layer", "family", "order", "pos", "batch"]
    assert len(frame) == 6  # NaN marks "no such site"
    mlp = frame[frame.family == "mlp.hook_post"]
    assert mlp.layer.tolist() == [1, 1, 1]
    assert sorted(mlp.max_abs.tolist()) == [0.0, 1.0, 2.0]


def _record(values, valid=None):
    acts = {"hook_embed": torch.tensor(values, dtype=torch.float64)[:, :, None]}
    logits = torch.zeros(len(values), len(values[0]), 3, dtype=torch.float64)
    if valid is None:
        valid = torch.ones(len(values), len(values[0]), dtype=torch.bool)
    return Record(acts, logits, valid)


def test_diff_of_records():
    a = _record([[1.0, 2.0, 3.0]])
    b = _record([[1.0, 2.5, 3.0]])
    report = interpkv.diff(a, b)
    assert report.hooks == ["hook_embed", "logits"]
    assert report.stats["hook_embed"]["max_abs"].tolist() == [[0.0, 0.5, 0.0]]
    site = report.first_divergence(atol=0.1, rtol=0)
    assert (site.hook, site.pos) == ("hook_embed", 1)
    assert report.kl == 0.0


def test_diff_position_missing_in_one_record_is_infinite():
    a = _record([[1.0, 2.0]])
    b = _record([[1.0, 2.0, 3.0]])
    report = interpkv.diff(a, b)
    assert report.stats["hook_embed"]["max_abs"][0, 2] == INF
    assert report.first_divergence(atol=1e9, rtol=0).pos == 2


def test_generation_diff_from_step_logits():
    same = [torch.tensor([[0.0, 1.0, 0.0]])] * 3
    other = [same[0], torch.tensor([[0.0, 1.0, 1e-3]]), torch.tensor([[2.0, 1.0, 0.0]])]
    d = GenerationDiff.from_step_logits(other, same, atol=1e-4)
    assert d.logits_max_abs == pytest.approx([0.0, 1e-3, 2.0])
    assert d.top1_agree == [True, True, False]
    assert d.first_divergent_step == 1
    assert d.kl[0] == 0.0 and d.kl[2] > d.kl[1] > 0
    assert GenerationDiff.from_step_logits(same, same).ok
    with pytest.raises(ValueError, match="differ in length"):
        GenerationDiff([0.0], [0.0, 1.0], [True], None)
