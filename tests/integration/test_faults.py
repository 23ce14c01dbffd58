"""Every known cache bug, injected into interpkv's cached path, is caught where its docstring says."""

import pytest
import torch

import interpkv
from interpkv import faults, zoo

# float64 parity: without a fault, cached and uncached runs agree to ~1e-14.
TOL64 = dict(atol=1e-10, rtol=1e-10)
STEPS = [8, 1, 1, 6]  # the first cached position is 8
FIRST_CACHED = STEPS[0]
FAST = {"gpt2", "neox", "llama", "bloom"}  # one per scheme (+GQA); the rest run with -m slow

_models = {}


def load(name):
    if name not in _models:
        _models[name] = zoo.load(name, dtype=torch.float64)
    return _models[name]


def _applicable():
    for fault in faults.names():
        for name in zoo.names():
            if faults.applies(load(name), fault):
                marks = () if name in FAST else (pytest.mark.slow,)
                yield pytest.param(fault, name, id=f"{fault}-{name}", marks=marks)


def tokens_for(model, batch=1):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, model.cfg.d_vocab, (batch, sum(STEPS)), generator=generator)


@pytest.mark.parametrize("fault,name", list(_applicable()))
def test_fault_is_caught_where_documented(fault, name):
    model = load(name)
    tokens = tokens_for(model)
    assert interpkv.compare(model, tokens, steps=STEPS).ok(**TOL64)
    with faults.inject(model, fault) as injected:
        report = interpkv.compare(model, tokens, steps=STEPS)
    assert not report.ok(**TOL64)
    site = report.first_divergence(**TOL64)
    assert (site.hook, site.pos) == injected.expected_site(model, FIRST_CACHED)
    assert site.max_abs > 1e-6  # a real error, not round-off
    # The model is itself again outside the block.
    assert interpkv.compare(model, tokens, steps=STEPS).ok(**TOL64)


def test_every_fault_is_documented_with_its_site():
    assert faults.names() == [
        "no_cache_history",
        "stale_position_offset",
        "alibi_unsliced",
        "zero_padded_resume",
        "kv_heads_repeated_before_cache",
    ]
    for name in faults.names():
        doc = type(faults.get(name)).__doc__
        assert "First divergence" in doc and "hook_" in doc, name


@pytest.mark.parametrize("fault", faults.names())
def test_uncached_reference_is_never_affected(fault):
    model = load("llama" if fault != "alibi_unsliced" else "bloom")
    tokens = tokens_for(model)
    before = interpkv.forward(model, tokens)
    with faults.inject(model, fault):
        during = interpkv.forward(model, tokens)
    assert torch.equal(before, during)


@pytest.mark.parametrize("fault,name", [("alibi_unsliced", "llama"), ("kv_heads_repeated_before_cache", "gpt2")])
def test_inject_refuses_models_it_does_not_apply_to(fault, name):
    with pytest.raises(ValueError, match=f"cannot inject '{fault}'"):
        with faults.inject(load(name), fault):
            pass


def test_unknown_fault_lists_the_known_ones():
    with pytest.raises(ValueError, match="no_cache_history"):
        with faults.inject(load("gpt2"), "typo"):
            pass


def test_kv_heads_repeated_shows_in_nbytes():
    model = load("llama")
    tokens = tokens_for(model)
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    honest = interpkv.KVCache.for_model(model)
    interpkv.forward(model, tokens, cache=honest)
    faulty = interpkv.KVCache.for_model(model)
    with faults.inject(model, "kv_heads_repeated_before_cache"):
        interpkv.forward(model, tokens, cache=faulty)
    assert group > 1
    assert faulty.layers[0].keys.shape[1] == model.cfg.n_heads
    positions_bytes = faulty.positions.numel() * faulty.positions.element_size()
    assert faulty.nbytes - positions_bytes == group * (honest.nbytes - positions_bytes)


def test_fault_free_cached_path_is_bit_identical_after_a_fault():
    model = load("bloom")
    tokens = tokens_for(model, batch=2)

    def cached():
        cache = interpkv.KVCache.for_model(model, 2)
        first = interpkv.forward(model, tokens[:, :8], cache=cache)
        return torch.cat([first, interpkv.forward(model, tokens[:, 8:], cache=cache)], 1)

    before = cached()
    with faults.inject(model, "alibi_unsliced"):
        assert not torch.equal(cached(), before)
    assert torch.equal(cached(), before)


def test_fault_with_left_padding_lands_at_the_first_cached_position():
    model = load("gpt2")
    tokens = tokens_for(model, batch=2)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # row 0's first cached token (index 8) sits at absolute position 5
    with faults.inject(model, "no_cache_history"):
        report = interpkv.compare(model, tokens, steps=STEPS, attention_mask=mask)
    site = report.first_divergence(**TOL64)
    assert (site.hook, site.pos, site.batch) == ("blocks.0.attn.hook_attn_scores", 5, 0)
