"""Engines: TransformerLens's own cache and HF caches audited like interpkv's (interpkv.compare(engine=...))."""

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.diagnostics import engines
from interpkv.diagnostics.capture import RecordBuilder
from interpkv.diagnostics.engines import hf as hf_engine
from interpkv.diagnostics.engines import transformer_lens as tl_engine
from interpkv.verify import engine_faults as faults
from interpkv.verify import findings

from . import _upstream

STEPS = [8, 1, 1, 4]  # first cached position 8
FIRST_CACHED = STEPS[0]
PADS = 3  # row 1 is left-padded by 3: its slot 8 is absolute position 5

# float64, same engine cached vs uncached: only summation order differs (~1e-14).
TIGHT = 1e-10
# float32 runs, and HF models other than GPT-2 even in float64: transformers'
# eager attention takes the softmax in float32 (GPT-J / GPT-Neo also cast
# query and key to float32), so cached and uncached runs, whose score rows
# differ in length, round differently: up to ~1e-6 on the zoo. 1e-5.
LOOSE = 1e-5
HF_FLOAT64_EXACT = {"gpt2"}

FAST = {"gpt2", "llama", "bloom"}  # learned, rotary + GQA, ALiBi; the rest run with -m slow


def _pairs_params(models):
    for name in models:
        marks = () if name in FAST else (pytest.mark.slow,)
        yield pytest.param(name, id=name, marks=marks)


def _tokens(batch=1, seed=0, length=sum(STEPS)):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _padded_mask(tokens):
    mask = torch.ones_like(tokens)
    mask[1, :PADS] = 0
    return mask


def _model(name, engine, dtype):
    if engine == "hf":
        return zoo.load_pair(name, dtype=dtype)[1]
    return zoo.load(name, dtype=dtype)


def _tol(name, engine, dtype):
    if dtype == torch.float32 or (engine == "hf" and name not in HF_FLOAT64_EXACT):
        return dict(atol=LOOSE, rtol=LOOSE)
    return dict(atol=TIGHT, rtol=TIGHT)


def _cases():
    for engine, models in (("transformer_lens", zoo.names()), ("hf", zoo.pairs())):
        for name in models:
            marks = () if name in FAST else (pytest.mark.slow,)
            yield pytest.param(engine, name, id=f"{engine}-{name}", marks=marks)


@pytest.mark.parametrize("engine,name", list(_cases()))
def test_correct_run_is_ok(engine, name):
    """float64 unpadded at the tight tolerance; float32 left-padded at 1e-5."""
    model = _model(name, engine, torch.float64)
    report = interpkv.compare(model, _tokens(), steps=STEPS, engine=engine)
    assert report.ok(**_tol(name, engine, torch.float64)), report.first_divergence(**_tol(name, engine, torch.float64))
    assert "blocks.1.hook_resid_post" in report.hooks and "logits" in report.hooks
    model32 = _model(name, engine, torch.float32)
    tokens = _tokens(batch=2, seed=1)
    report = interpkv.compare(model32, tokens, steps=STEPS, attention_mask=_padded_mask(tokens), engine=engine)
    assert report.ok(atol=LOOSE, rtol=LOOSE), report.first_divergence(atol=LOOSE, rtol=LOOSE)
    assert report.stats["logits"]["max_abs"].shape == (2, sum(STEPS))  # padding takes no position
    assert torch.isnan(report.stats["logits"]["max_abs"][1, -PADS:]).all()


def _fault_cases():
    for engine, models in (("interpkv", ("gpt2", "llama")), ("transformer_lens", zoo.names()), ("hf", zoo.pairs())):
        for name in models:
            fast = name == "llama" or (engine, name) == ("transformer_lens", "gpt2")
            yield pytest.param(engine, name, id=f"{engine}-{name}", marks=() if fast else (pytest.mark.slow,))


@pytest.mark.parametrize("engine,name", list(_fault_cases()))
def test_corrupted_stored_key_is_localized(engine, name):
    dtype = torch.float64
    model = _model(name, engine, dtype)
    tol = _tol(name, engine, dtype)
    tokens = _tokens()
    assert interpkv.compare(model, tokens, steps=STEPS, engine=engine).ok(**tol)
    with faults.inject(model, engine=engine, layer=1) as fault:
        report = interpkv.compare(model, tokens, steps=STEPS, engine=engine)
    site = report.first_divergence(**tol)
    assert (site.layer, site.pos) == (1, FIRST_CACHED)
    assert (site.hook, site.layer, site.pos) == fault.expected_site(FIRST_CACHED)
    assert site.max_abs > 1e-3  # a real error, not round-off
    # The patch is gone after the block.
    assert interpkv.compare(model, tokens, steps=STEPS, engine=engine).ok(**tol)


@pytest.mark.parametrize("engine", ["interpkv", "transformer_lens", "hf"])
def test_corruption_under_left_padding_is_at_absolute_positions(engine):
    """Slot 8 is position 8 in the full row and position 5 in the row padded by 3."""
    model = _model("llama", engine, torch.float32)  # float32: HF float64 NaNs under left padding
    tokens = _tokens(batch=2, seed=2)
    with faults.inject(model, engine=engine, layer=1) as fault:
        report = interpkv.compare(model, tokens, steps=STEPS, attention_mask=_padded_mask(tokens), engine=engine)
    site = report.first_divergence(atol=LOOSE, rtol=LOOSE)
    assert (site.hook, site.layer, site.pos, site.batch) == (fault.hook, 1, FIRST_CACHED - PADS, 1)
    bad = report.diverged(fault.hook, atol=LOOSE, rtol=LOOSE)
    assert int(bad[0].nonzero().min()) == FIRST_CACHED
    assert int(bad[1].nonzero().min()) == FIRST_CACHED - PADS


@pytest.mark.parametrize("name", zoo.pairs())
def test_hf_sites_have_transformer_lens_names(name):
    _, hf = zoo.load_pair(name)
    found = [site for site, _, _ in hf_engine.sites(hf)]
    n_layers = hf.config.num_hidden_layers
    assert found[0] == "hook_embed"
    for layer in range(n_layers):
        for family in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"):
            assert f"blocks.{layer}.{family}" in found
    assert len(found) == len(set(found))


def test_hf_attention_output_excludes_bloom_residual():
    """Bloom's attention module adds the residual itself; hook_attn_out is the attention's own output."""
    tl, hf = zoo.load_pair("bloom", dtype=torch.float64)
    record = engines.capture(hf, _tokens(), engine="hf")
    families = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
    pre, attn, mlp, post = (record[f"blocks.0.{h}"] for h in families)
    assert torch.allclose(pre + attn + mlp, post, atol=1e-12)


def test_hf_static_and_sliding_window_caches():
    _, mistral = zoo.load_pair("mistral", dtype=torch.float64)
    tokens = _tokens(length=24)  # longer than the 8-token window
    steps = [12, 1, 1, 10]
    assert interpkv.compare(mistral, tokens, steps=steps).ok(atol=LOOSE, rtol=LOOSE)  # DynamicCache with sliding layers
    assert type(hf_engine.dynamic_cache(mistral, 1, 24).layers[0]).__name__ == "DynamicSlidingWindowLayer"
    _, llama = zoo.load_pair("llama", dtype=torch.float64)
    report = interpkv.compare(llama, tokens, steps=steps, engine="hf", cache=hf_engine.static_cache)
    assert report.ok(atol=LOOSE, rtol=LOOSE)
    # Whether HF's DynamicCache is exact in float64 depends on the installed transformers
    # (older releases took the softmax in float32). Measure it with HF's own API, then
    # check that interpkv reports what was measured, whichever way upstream goes.
    measured = _hf_cached_vs_uncached(llama, tokens, steps)
    dynamic = interpkv.compare(llama, tokens, steps=steps, engine="hf")
    assert dynamic.logits_max_abs == pytest.approx(measured, rel=1e-6, abs=1e-13)
    assert dynamic.ok(atol=TIGHT, rtol=TIGHT) == (measured <= TIGHT)


def _hf_cached_vs_uncached(hf, tokens, steps):
    """Max |logit| difference between HF fed in chunks through a DynamicCache and in one pass."""
    import inspect

    from transformers import DynamicCache

    keyword = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"  # renamed in 5.x
    with torch.no_grad():
        full = hf(tokens).logits
        cache, chunks, start = DynamicCache(), [], 0
        for n in steps:
            chunks.append(hf(tokens[:, start:start + n], **{keyword: cache}, use_cache=True).logits)
            start += n
    return (torch.cat(chunks, dim=1) - full).abs().max().item()


def test_hf_nan_at_real_tokens_is_an_error_not_a_pass():
    """NaN == NaN must never read as agreement: a NaN at a real token is an error naming where it is.

    transformers' float64 eager attention (5.x) turns fully masked padding rows into NaN, which
    reaches real tokens through zero-weighted values. Whether the installed version does is
    measured first with HF's own forward; interpkv must raise exactly when it does.
    """
    _, llama = zoo.load_pair("llama", dtype=torch.float64)
    tokens = _tokens(batch=2)
    mask = _padded_mask(tokens)
    if _upstream.hf_nans_at_real_tokens(llama, tokens, mask):
        with pytest.raises(ValueError, match="NaN at a real token"):
            interpkv.compare(llama, tokens, steps=STEPS, attention_mask=mask)
    else:
        assert interpkv.compare(llama, tokens, steps=STEPS, attention_mask=mask).ok(atol=LOOSE, rtol=LOOSE)


def test_nan_planted_in_an_hf_layer_is_an_error_naming_the_site():
    """The same check with the NaN put there on purpose, so it is exercised whatever transformers does."""
    _, llama = zoo.load_pair("llama", dtype=torch.float32)
    tokens = _tokens()

    def plant(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, -1, 0] = float("nan")  # the last real token of the only row

    handle = llama.model.layers[1].register_forward_hook(plant)
    try:
        with pytest.raises(ValueError, match=r"NaN at a real token \(blocks\.1\.hook_resid_post, batch row 0"):
            interpkv.compare(llama, tokens, steps=STEPS)
    finally:
        handle.remove()
    assert interpkv.compare(llama, tokens, steps=STEPS).ok(atol=LOOSE, rtol=LOOSE)


def test_default_engine_and_errors():
    tl, hf = zoo.load_pair("gpt2", dtype=torch.float64)
    assert engines.resolve(tl) == "interpkv" and engines.resolve(hf) == "hf"
    report = interpkv.compare(hf, _tokens(), steps=STEPS)  # no engine: HF's own cache
    assert "blocks.0.hook_attn_out" in report.hooks and "blocks.0.attn.hook_q" not in report.hooks
    with pytest.raises(ValueError, match="unknown engine"):
        interpkv.compare(tl, _tokens(), steps=STEPS, engine="vllm")
    with pytest.raises(ValueError, match="PreTrainedModel"):
        interpkv.compare(tl, _tokens(), steps=STEPS, engine="hf")
    with pytest.raises(ValueError, match="HookedTransformer"):
        interpkv.compare(hf, _tokens(), steps=STEPS, engine="transformer_lens")


def test_transformer_lens_audit_leaves_alibi_state_alone():
    """A compare must not leave its longer reference matrix for the next audit."""
    model = zoo.load("bloom", dtype=torch.float64)
    tokens = _tokens()
    for _ in range(2):
        assert interpkv.compare(model, tokens, steps=STEPS, engine="transformer_lens").ok(atol=TIGHT, rtol=TIGHT)
    assert all(block.attn.alibi is None for block in model.blocks)


def test_transformer_lens_stale_alibi_is_reported():
    """TransformerLens 3.9 slices shorter calls' ALiBi bias out of a longer call's memoized matrix.

    Measured first with TransformerLens's own hooks; interpkv's audit must localize the shift
    where it is and by how much, or report nothing when the installed version has no memo.
    """
    model = zoo.load("bloom", dtype=torch.float64)
    with torch.no_grad():
        model(torch.zeros(1, 64, dtype=torch.long))  # leaves a 64 x 64 ALiBi matrix behind, if TL memoizes
    site = interpkv.compare(model, _tokens(), steps=STEPS, engine="transformer_lens").first_divergence(atol=TIGHT, rtol=TIGHT)
    if not _upstream.tl_alibi_memo_goes_stale():
        assert site is None
        return
    assert (site.hook, site.pos) == ("blocks.0.attn.hook_attn_scores", 0)
    # Reference (14 keys) and first chunk (8 keys) are shifted by slope * (64 - keys): the
    # steepest head (slope 1/4) differs by 1/4 * (14 - 8).
    assert site.max_abs == pytest.approx(0.25 * (sum(STEPS) - STEPS[0]))


def test_stale_alibi_moves_the_raw_scores_a_hook_reads_even_in_float64():
    """What a researcher reading ``hook_attn_scores`` sees: shifted by slope * (64 - 14), steepest slope 1/4.

    interpkv's measurement (``findings._scores_shift``) against the detector's, and the shift
    explained by the slope, when the installed TransformerLens has the memo; 0 when it has not.
    """
    tokens = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(0))
    expected = 0.25 * (64 - 14) if _upstream.tl_alibi_memo_goes_stale() else 0.0
    assert findings._scores_shift("bloom", tokens, 64) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("name", ["gpt2", "llama"], ids=["learned", "rotary"])
def test_transformer_lens_generate_positions(name):
    """TL 3.9's cached ``generate`` embeds learned positions at the wrong row (measured on TL's own hooks)."""
    model = zoo.load(name, dtype=torch.float64)
    sink, generated = tl_engine.run_generate(model, _tokens(length=8), RecordBuilder, max_new_tokens=4)
    reference = engines.capture(model, generated[:, :-1], engine="transformer_lens")
    site = interpkv.diff(sink.record({}), reference).first_divergence(atol=TIGHT, rtol=TIGHT)
    if name == "gpt2" and _upstream.tl_generate_misplaces_learned_positions():
        assert (site.hook, site.pos) == ("hook_pos_embed", 8)
    else:  # rotary positions never go through hook_pos_embed; learned ones once TL numbers them right
        assert site is None


@pytest.mark.slow
def test_transformer_lens_findings_are_verified_against_hf():
    """Each finding is verified against HF when the installed TransformerLens shows it, and reported
    as not reproduced (not as a failure) when it does not."""
    results = {f.title: f for f in findings.all_findings()}
    present = {
        "ALiBi slopes, 6 heads": _upstream.tl_alibi_slopes_differ_from_bloom(6),
        "generate, learned positions": _upstream.tl_generate_misplaces_learned_positions(),
        "stale ALiBi matrix": _upstream.tl_alibi_memo_goes_stale(),
    }
    for title, there in present.items():
        finding = results[title]
        assert (finding.present, finding.verified, finding.explained) == (there, there, True), title
    slopes = results["ALiBi slopes, 6 heads"]
    if slopes.present:
        assert (slopes.site.hook, slopes.site.pos) == ("blocks.0.hook_attn_out", 1)


def test_a_finding_transformer_lens_has_fixed_is_reported_as_not_reproduced(monkeypatch):
    """Simulate a TransformerLens with Bloom's slopes: the finding is absent, explained, not a failure."""
    from transformer_lens.components import AbstractAttention

    from interpkv.core.schemes import alibi_slopes
    from interpkv.verify import verdicts
    from interpkv.verify.engine_checks import OtherImplementations

    monkeypatch.setattr(AbstractAttention, "create_alibi_multipliers",
                        staticmethod(lambda n, device=None: alibi_slopes(n).float()))
    fixed = findings.alibi_slopes_not_power_of_two()
    assert fixed.site is None and not fixed.present and not fixed.verified and fixed.explained
    assert fixed.status == "not reproduced"
    assert verdicts.of_finding(fixed).word == verdicts.PASS  # not KNOWN UPSTREAM, not FAIL
    assert OtherImplementations(findings=[fixed]).ok


def test_cli_check_engine(capsys):
    from interpkv.cli.app import main

    assert main(["check", "gpt2", "--engine", "hf"]) == 0
    assert "gpt2 (hf)" in capsys.readouterr().out
    # TL's slopes differ from HF's: KNOWN UPSTREAM (reported, not a failure); PASS the day TL fixes them.
    # Whether the installed TransformerLens has them is measured, and the row must say which.
    assert main(["check", "bloom6", "--engine", "transformer_lens"]) == 0
    assert ("KNOWN UPSTREAM" in capsys.readouterr().out) == _upstream.tl_alibi_slopes_differ_from_bloom(6)
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "gpt2", "--engine", "vllm"])
    assert exit_info.value.code == 2


def test_cli_check_engine_hf_directory(tmp_path):
    from interpkv.cli.app import main

    _, hf = zoo.load_pair("llama")
    hf.save_pretrained(tmp_path / "llama")
    assert main(["check", str(tmp_path / "llama"), "--engine", "hf"]) == 0


@pytest.mark.parametrize("name", ["qwen3", "mixtral", "gemma3"])
def test_transformer_lens_engine_records_qk_norm_and_moe_hooks(name):
    """Regression: the TL engine raised on flattened qk-norm and per-expert hooks (the demo crashed)."""
    model = interpkv.zoo.load(name, dtype=torch.float64)
    report = interpkv.compare(model, torch.arange(1, 13)[None], steps=[6, 1, 5], engine="transformer_lens")
    assert report.ok(atol=1e-10, rtol=1e-10), report.first_divergence(atol=1e-10, rtol=1e-10)
    assert any("q_norm" in h or "ln1" in h for h in report.hooks)


def test_fwd_hooks_with_another_engine_are_refused_by_name():
    model = zoo.load("gpt2")
    hook = ("blocks.0.hook_resid_post", lambda x, hook: x)
    with pytest.raises(ValueError, match="engine='transformer_lens'"):
        interpkv.compare(model, torch.arange(1, 9)[None], steps=[4, 4], engine="transformer_lens", fwd_hooks=[hook])


@pytest.mark.parametrize("engine", ["transformer_lens", "hf"])
def test_compare_also_sees_the_cached_run_it_compares(engine):
    # check_engine takes the HF column's cached logits from the compared run (engines.compare(also=...))
    # instead of running the cached chunks a second time: they must be that run's, at absolute positions.
    # float32 with padding, as check_engine runs (HF float64 eager attention turns padded rows NaN).
    model = _model("llama", engine, torch.float32)
    tokens = _tokens(batch=2)
    mask = _padded_mask(tokens)
    kept = []
    report = engines.compare(
        model, tokens, steps=STEPS, attention_mask=mask, engine=engine,
        also=lambda valid: kept.append(RecordBuilder(valid)) or kept[0],
    )
    seen = kept[0].record({})
    again = engines.capture(model, tokens, steps=STEPS, attention_mask=mask, engine=engine)
    assert report.ok(**_tol("llama", engine, torch.float32)) and len(kept) == 1
    same = dict(rtol=0, atol=0, equal_nan=True)  # the same run: bit for bit (NaN = no token there)
    assert torch.equal(seen.valid, again.valid) and seen.logits.isfinite().any()
    torch.testing.assert_close(seen.logits, again.logits, **same)
    assert seen.activations.keys() == again.activations.keys()
    for name, act in again.activations.items():
        torch.testing.assert_close(seen.activations[name], act, **same, msg=name)
