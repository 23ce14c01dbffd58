"""engine="transformer_bridge": a TransformerBridge's own cached path, audited like the other engines.

The upstream behaviour is measured here by driving the bridge by hand (chunk by
chunk through its own HF cache, against one uncached call), independently of
interpkv's engine; each test then checks that interpkv's report says what that
measurement says, whichever way upstream behaves (TransformerLens 3.9's bridge
ignores its cache on GPT-2 and Llama; 4.3's does too under transformers 5.25,
and mis-handles Bloom with a StaticCache and left padding).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.diagnostics import engines
from interpkv.diagnostics.diff import diff
from interpkv.diagnostics.engines import transformer_bridge as tb
from interpkv.verify import engine_faults

from ._env import needs_bridge

pytestmark = [pytest.mark.tl4, needs_bridge]

STEPS = [8, 1, 1, 4]
PADS = 3  # row 1 is left-padded by 3: its real tokens are absolute positions 0..10
# float32 throughout; the bridge runs HF's eager attention, whose softmax is
# float32, so cached and uncached score rows of different lengths round
# differently: ~1e-6 on the zoo (see tests/integration/test_engines.py). 1e-4
# keeps a margin two orders wide and is far below any cache bug (> 0.1).
TOL = 1e-4
CACHES = {"dynamic": tb.dynamic_cache, "static": tb.static_cache}


def _inputs(padded: bool):
    tokens = torch.randint(0, 97, (2, sum(STEPS)), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    if padded:
        mask[1, :PADS] = 0
    return tokens, mask


@dataclass
class Upstream:
    """What the bridge's own cached path does, measured by hand."""

    max_abs: float  # max |cached - uncached| logit over real tokens
    first_bad: Optional[Tuple[int, int]]  # (absolute position, row) of the first real token past TOL
    kept: int  # positions the cache holds after the prefill chunk


def _measure(bridge, tokens, mask, make_cache) -> Upstream:
    batch, n = tokens.shape
    cache = make_cache(bridge.original_model, batch, n)
    with torch.no_grad():
        reference = bridge(tokens, attention_mask=mask)
        chunks, start, kept = [], 0, None
        for step in STEPS:
            end = start + step
            chunks.append(bridge(tokens[:, start:end], attention_mask=mask[:, :end], past_key_values=cache))
            if kept is None:
                kept = int(cache.get_seq_length())
            start = end
    err = (torch.cat(chunks, dim=1) - reference).abs().amax(-1)  # (B, T)
    err = err.masked_fill(mask == 0, 0)
    positions = mask.cumsum(-1) - 1
    bad = [(int(positions[b, t]), b) for b, t in (err > TOL).nonzero().tolist()]
    return Upstream(float(err.max()), min(bad) if bad else None, kept)


def _first_cached(mask):
    """The lowest absolute position any row feeds through its cache (after the first chunk)."""
    return int(mask[:, : STEPS[0]].sum(-1).min())


# One case per behaviour in the fast suite (a cache not used; Bloom's StaticCache under left padding,
# also in the test below); the rest run with -m slow and in `make test-tl4` (-m tl4 selects them all).
FAST_CASES = {("llama", "dynamic"), ("bloom", "static")}


@pytest.mark.parametrize(
    "name, cache",
    [
        pytest.param(n, c, id=f"{n}-{c}", marks=() if (n, c) in FAST_CASES else (pytest.mark.slow,))
        for n in ("gpt2", "llama", "bloom")
        for c in CACHES
    ],
)
def test_report_says_what_the_bridge_cache_does(name, cache):
    bridge = zoo.load_bridge(name)
    tokens, mask = _inputs(padded=True)
    upstream = _measure(bridge, tokens, mask, CACHES[cache])
    report = interpkv.compare(bridge, tokens, steps=STEPS, attention_mask=mask, cache=CACHES[cache])
    assert report.logits_max_abs == pytest.approx(upstream.max_abs, abs=TOL)
    site = report.first_divergence(atol=TOL, rtol=TOL)
    if upstream.first_bad is None:
        assert report.ok(atol=TOL, rtol=TOL) and site is None
        return
    assert site is not None, f"the bridge's cached logits are off by {upstream.max_abs:.3g} but the report is ok"
    assert (site.pos, site.batch) <= upstream.first_bad  # at or before the first wrong logit
    if upstream.kept == 0:  # the bridge did not use its cache: the first token that needed it is wrong
        assert site.pos == _first_cached(mask) and site.layer == 0


def test_bloom_static_cache_left_padding_is_localized():
    """TL 4.3's Bloom bridge, StaticCache, left padding: wrong from inside the prefill (checked, not assumed).

    Plain HF Bloom refuses a StaticCache; the bridge runs one. Whatever the
    bridge does, the report must place the first divergence no later than the
    first wrong logit, in the padded row if only that row is wrong, and an
    unpadded batch must not show it unless the bridge is wrong there too.
    """
    bridge = zoo.load_bridge("bloom")
    for padded in (True, False):
        tokens, mask = _inputs(padded)
        upstream = _measure(bridge, tokens, mask, tb.static_cache)
        report = interpkv.compare(bridge, tokens, steps=STEPS, attention_mask=mask, cache=tb.static_cache)
        site = report.first_divergence(atol=TOL, rtol=TOL)
        if upstream.first_bad is None:
            assert site is None, (padded, site)
            continue
        assert site is not None and (site.pos, site.batch) <= upstream.first_bad
        if padded and upstream.kept > 0:
            assert site.batch == upstream.first_bad[1]


def test_bridge_records_match_the_hf_engine_at_tl_names():
    """Uncached, under left padding: the bridge's hook names and positions line up with the HF engine's sites."""
    hf = zoo.load_hf("llama")
    bridge = zoo.bridge_from_hf(hf)
    tokens, mask = _inputs(padded=True)
    sites = lambda n: n.endswith(("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"))  # noqa: E731
    a = engines.capture(bridge, tokens, attention_mask=mask, names=sites)
    b = engines.capture(hf, tokens, attention_mask=mask, names=sites, engine="hf")
    assert a.meta["engine"] == "transformer_bridge" and b.meta["engine"] == "hf"
    common = set(a.activations) & set(b.activations)
    assert {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.0.hook_attn_out"} <= common
    report = diff(a, b)
    assert report.ok(atol=TOL, rtol=TOL), report.first_divergence(atol=TOL, rtol=TOL)


def test_aliases_are_recorded_under_every_name():
    bridge = zoo.load_bridge("gpt2")
    tokens, mask = _inputs(padded=False)
    record = engines.capture(bridge, tokens, names=["blocks.0.hook_in", "blocks.0.hook_resid_pre"])
    assert set(record.activations) == {"blocks.0.hook_in", "blocks.0.hook_resid_pre"}
    assert torch.equal(record.activations["blocks.0.hook_in"], record.activations["blocks.0.hook_resid_pre"])


def test_planted_cache_fault_is_localized():
    """A stored key corrupted in HF's Cache.update: the report points at that layer, at the first cached token."""
    bridge = zoo.load_bridge("bloom")
    tokens, mask = _inputs(padded=True)
    if _measure(bridge, tokens, mask, tb.dynamic_cache).kept == 0:
        pytest.skip("this bridge does not use its DynamicCache, so a fault planted in the cache cannot show")
    with engine_faults.inject(bridge, engine="transformer_bridge", layer=1) as fault:
        report = interpkv.compare(bridge, tokens, steps=STEPS, attention_mask=mask)
    site = report.first_divergence(atol=TOL, rtol=TOL)
    assert site is not None and (site.hook, site.layer, site.pos) == fault.expected_site(_first_cached(mask)), site


@pytest.mark.unchecked_shapes  # hands forward a bridge: the point is interpkv's own error
def test_default_engine_and_errors():
    bridge = zoo.load_bridge("gpt2")
    hf = zoo.load_hf("gpt2")
    assert engines.resolve(bridge) == "transformer_bridge"
    assert engines.resolve(hf) == "hf"
    tokens, _ = _inputs(padded=False)
    with pytest.raises(ValueError, match="transformer_bridge"):
        interpkv.compare(bridge, tokens, steps=STEPS, engine="hf")
    with pytest.raises(ValueError, match="runs a TransformerLens TransformerBridge"):
        interpkv.compare(hf, tokens, steps=STEPS, engine="transformer_bridge")
    for call in (lambda: interpkv.forward(bridge, tokens), lambda: interpkv.KVCache.for_model(bridge)):
        with pytest.raises((ValueError, ImportError), match="HookedTransformer"):
            call()


def test_nan_at_real_tokens_is_an_error_not_a_report():
    """float64 under left padding: where the bridge itself returns NaN at a real token, compare refuses to report."""
    bridge = zoo.load_bridge("llama", dtype=torch.float64)
    tokens, mask = _inputs(padded=True)
    with torch.no_grad():
        nan_upstream = bool(torch.isnan(bridge(tokens, attention_mask=mask)[mask.bool()]).any())
    if not nan_upstream:
        report = interpkv.compare(bridge, tokens, steps=STEPS, attention_mask=mask)
        assert torch.isfinite(torch.tensor(report.logits_max_abs))
        return
    with pytest.raises(ValueError, match="NaN at a real token"):
        interpkv.compare(bridge, tokens, steps=STEPS, attention_mask=mask)
