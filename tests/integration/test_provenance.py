"""KVCache.provenance and ProvenanceWarning: a reused prefix never silently replays other interventions.

Float64 zoo models. Each "warns" test also checks the warning is warranted:
the continuation differs from the uncached run under the continuing call's
interventions (and a "silent" test that it equals it), so the tests pin the
meaning, not only the message.
"""

import functools
import json
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import interpkv
from interpkv.cache import identity, persist, provenance

F64 = torch.float64
HOOK = "blocks.0.hook_resid_post"
PROMPT = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
NEXT = torch.tensor([[5, 3]])
FULL = torch.cat([PROMPT, NEXT], 1)
# Same function, same tokens, float64: cached and uncached agree to rounding (~1e-15);
# a replayed steering vector moves logits by ~1e-2 or more.
ATOL = 1e-9


@pytest.fixture(scope="module", params=["gpt2", "llama", "bloom"])
def model(request):
    return interpkv.zoo.load(request.param, dtype=F64)


@pytest.fixture(scope="module")
def gpt2():
    return interpkv.zoo.load("gpt2", dtype=F64)


def vector(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.cfg.d_model, generator=g, dtype=F64)


def prefilled(model, fwd_hooks=()):
    cache = interpkv.KVCache.for_model(model)
    interpkv.forward(model, PROMPT, cache=cache, fwd_hooks=fwd_hooks)
    return cache


def continued(model, cache, fwd_hooks=()):
    """``(logits of NEXT through cache, ProvenanceWarnings raised)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = interpkv.forward(model, NEXT, cache=cache, fwd_hooks=fwd_hooks)
    return logits, [w for w in caught if issubclass(w.category, interpkv.ProvenanceWarning)]


def uncached(model, fwd_hooks=()):
    return interpkv.forward(model, FULL, fwd_hooks=fwd_hooks)[:, -NEXT.shape[1]:]


def close(a, b):
    return torch.allclose(a, b, atol=ATOL, rtol=0)


# ------------------------------------------------------------ the mismatches
def test_steered_prefix_continued_unsteered_warns_naming_the_hook_point(model):
    steer = [(HOOK, interpkv.steering.add(vector(model)))]
    cache = prefilled(model, steer)
    logits, caught = continued(model, cache)
    assert len(caught) == 1
    message = str(caught[0].message)
    # Reads as the call that made the hook (the wording), v by the first digits of its content digest.
    label = f"steering.add(v#{identity.value_digest(vector(model))[:4]})"
    assert f"positions 0-7 were written under {HOOK} {label}; this call has none." in message
    assert caught[0].filename == __file__  # attributed to the caller's line, not interpkv's
    # Warranted: it equals neither uncached run.
    assert not close(logits, uncached(model)) and not close(logits, uncached(model, steer))


def test_same_hook_object_is_silent_and_exact(model):
    steer = [(HOOK, interpkv.steering.add(vector(model)))]
    logits, caught = continued(model, prefilled(model, steer), steer)
    assert caught == []
    assert close(logits, uncached(model, steer))


def test_equal_hooks_rebuilt_are_silent(model):
    v = vector(model)

    def make_lambda(vec):
        return lambda act, hook: act + vec

    def add(act, hook, vec, scale):
        return act + scale * vec

    rebuilt = [
        (interpkv.steering.add(v), interpkv.steering.add(v.clone())),
        (make_lambda(v), make_lambda(v.clone())),
        (functools.partial(add, vec=v, scale=0.5), functools.partial(add, vec=v.clone(), scale=0.5)),
    ]
    for first, second in rebuilt:
        assert first is not second
        logits, caught = continued(model, prefilled(model, [(HOOK, first)]), [(HOOK, second)])
        assert caught == [], str(caught[0].message) if caught else ""
        assert close(logits, uncached(model, [(HOOK, second)]))


def test_a_different_vector_coefficient_or_code_warns(gpt2):
    v = vector(gpt2)

    def scaled(act, hook, vec, scale):
        return act + scale * vec

    def shifted(act, hook, vec, scale):
        return act - scale * vec

    pairs = [
        (interpkv.steering.add(v), interpkv.steering.add(vector(gpt2, seed=1))),
        (interpkv.steering.add(v), interpkv.steering.add(v, scale=2.0)),
        (functools.partial(scaled, vec=v, scale=1.0), functools.partial(shifted, vec=v, scale=1.0)),
    ]
    for first, second in pairs:
        _, caught = continued(gpt2, prefilled(gpt2, [(HOOK, first)]), [(HOOK, second)])
        assert len(caught) == 1 and HOOK in str(caught[0].message)


def test_unsteered_prefix_continued_with_an_undeclared_hook_warns(gpt2):
    _, caught = continued(gpt2, prefilled(gpt2), [(HOOK, lambda act, hook: act + 1.0)])
    assert len(caught) == 1 and "written under none" in str(caught[0].message)


# ------------------------------------------------------------- declared positions
def test_a_hook_declared_to_act_after_the_prefix_is_silent_and_exact(model):
    n = PROMPT.shape[1]
    v = vector(model)
    for hook in (interpkv.steering.add(v, start=n),
                 interpkv.intervention(lambda act, hook: act + v, start=n)):
        logits, caught = continued(model, prefilled(model), [(HOOK, hook)])
        assert caught == []
        assert close(logits, uncached(model, [(HOOK, hook)]))


def test_a_declared_hook_reaching_into_the_prefix_warns(gpt2):
    hook = interpkv.steering.add(vector(gpt2), start=PROMPT.shape[1] - 2)
    _, caught = continued(gpt2, prefilled(gpt2), [(HOOK, hook)])
    assert len(caught) == 1 and re.search(r"; this call has blocks\.0\.hook_resid_post steering\.add\(v#[0-9a-f]{4}, "
                                          r"start=6\)\.", str(caught[0].message))


def test_intervention_enforces_its_declared_positions(gpt2):
    v = vector(gpt2)
    hook = interpkv.intervention(lambda act, hook: act + v, start=4)
    plain = interpkv.steering.add(v, start=4)
    assert close(interpkv.forward(gpt2, FULL, fwd_hooks=[(HOOK, hook)]),
                 interpkv.forward(gpt2, FULL, fwd_hooks=[(HOOK, plain)]))


def test_generate_region_generated_continues_an_unsteered_prompt_silently(gpt2):
    cache = interpkv.KVCache.for_model(gpt2)
    steer = [(HOOK, interpkv.steering.add(vector(gpt2), region="generated"))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", interpkv.ProvenanceWarning)
        interpkv.generate(gpt2, PROMPT, cache=cache, max_new_tokens=0)  # prefill, unsteered
        out = interpkv.generate(gpt2, cache=cache, max_new_tokens=4, fwd_hooks=steer)
    reference = interpkv.generate(gpt2, PROMPT, max_new_tokens=4, fwd_hooks=steer)
    assert torch.equal(out.tokens[:, -4:], reference.tokens[:, -4:])


def test_hooks_after_the_last_keys_never_reach_the_cache(gpt2):
    last = f"blocks.{gpt2.cfg.n_layers - 1}.hook_resid_post"
    cache = prefilled(gpt2, [(last, interpkv.steering.add(vector(gpt2)))])
    logits, caught = continued(gpt2, cache)
    assert caught == []
    assert close(logits, uncached(gpt2))


# ------------------------------------------------------------------ observers
def test_recording_hooks_are_not_interventions(gpt2):
    seen = []
    record = [(HOOK, lambda act, hook: seen.append(act.clone()))]
    cache = prefilled(gpt2, record)
    _, caught = continued(gpt2, cache)
    assert caught == [] and cache.provenance.interventions == ()
    _, caught = continued(gpt2, prefilled(gpt2), [(HOOK, lambda act, hook: act)])  # returns its input
    assert caught == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", interpkv.ProvenanceWarning)
        interpkv.capture(gpt2, NEXT, cache=prefilled(gpt2))  # capture's own hooks record only


def test_an_in_place_edit_counts(gpt2):
    def zero_first(act, hook):
        act[:, :, 0] = 0.0  # returns None, edits in place

    cache = prefilled(gpt2, [(HOOK, zero_first)])
    assert [i.point for i in cache.provenance.interventions] == [HOOK]
    _, caught = continued(gpt2, cache)
    assert len(caught) == 1


def test_model_hooks_are_recorded(gpt2):
    v = vector(gpt2)
    gpt2.add_hook(HOOK, lambda act, hook: act + v)
    try:
        cache = prefilled(gpt2)
        assert [(i.kind, i.point) for i in cache.provenance.interventions] == [("model hook", HOOK)]
        _, caught = continued(gpt2, cache)
        assert caught == []  # still there: same
    finally:
        gpt2.reset_hooks()
    _, caught = continued(gpt2, cache)
    assert len(caught) == 1 and "model hook" in str(caught[0].message)


def test_a_fault_is_recorded(gpt2):
    with interpkv.faults.inject(gpt2, "stale_position_offset"):
        cache = prefilled(gpt2)
        cache_b = cache.fork()
        _, caught = continued(gpt2, cache)
        assert caught == []
    assert [i.kind for i in cache_b.provenance.interventions] == ["fault"]
    _, caught = continued(gpt2, cache_b)
    assert len(caught) == 1 and "stale_position_offset" in str(caught[0].message)


# -------------------------------------------------------------- error mode
def test_warning_as_error_stops_the_call_before_the_cache_changes(gpt2):
    cache = prefilled(gpt2, [(HOOK, interpkv.steering.add(vector(gpt2)))])
    keys = cache.layers[0].view(cache.seq_len)[0].clone()
    state = (cache.seq_len, cache.positions.clone(), cache.next_positions.clone(), cache.appended)
    calls = [
        lambda: interpkv.forward(gpt2, NEXT, cache=cache),
        lambda: interpkv.generate(gpt2, NEXT, cache=cache, max_new_tokens=3),
        lambda: interpkv.capture(gpt2, NEXT, cache=cache, steps=[1, 1]),
    ]
    for call in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("error", interpkv.ProvenanceWarning)
            with pytest.raises(interpkv.ProvenanceWarning):
                call()
        assert cache.seq_len == state[0]
        assert torch.equal(cache.positions, state[1]) and torch.equal(cache.next_positions, state[2])
        assert torch.equal(cache.layers[0].view(cache.seq_len)[0], keys)
        assert "next_tokens" not in cache.row_state  # nothing held back
    assert len(cache.provenance.spans) == 1


# ---------------------------------------------------------------- lifecycle
def test_fork_crop_select_repeat_freeze_carry_provenance(gpt2):
    steer = [(HOOK, interpkv.steering.add(vector(gpt2)))]
    cache = interpkv.KVCache.for_model(gpt2, 2)
    interpkv.forward(gpt2, PROMPT.repeat(2, 1), cache=cache, fwd_hooks=steer)
    with warnings.catch_warnings(record=True) as caught:  # an unsteered span after a steered one
        warnings.simplefilter("always", interpkv.ProvenanceWarning)
        interpkv.forward(gpt2, NEXT.repeat(2, 1), cache=cache)
    assert any(
        w.category is interpkv.ProvenanceWarning and "positions 0-7 were written under" in str(w.message) for w in caught
    )
    expect = [((0, 8), (0, 7), 1), ((8, 10), (8, 9), 0)]

    def spans(c):
        return [(s.slots, s.positions, len(s.interventions)) for s in c.provenance.spans]

    # (the second forward warned; its span records no interventions)
    assert spans(cache) == expect
    assert spans(cache.fork()) == expect
    assert spans(cache.select([1])) == expect
    assert spans(cache.repeat(3)) == expect
    with cache.freeze():
        assert spans(cache) == expect
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            interpkv.forward(gpt2, NEXT.repeat(2, 1), cache=cache, fwd_hooks=steer)
        assert len(caught) == 1  # frozen reads are checked too (the second span is unsteered)
        assert spans(cache) == expect  # and record nothing
    cropped = cache.fork()
    cropped.crop(5)
    assert spans(cropped) == [((0, 5), (0, 4), 1)]
    _, caught = continued(gpt2, cropped.select([0]), steer)
    assert caught == []


def test_provenance_repr_frame_and_html(gpt2):
    cache = prefilled(gpt2, [(HOOK, interpkv.steering.add(vector(gpt2), start=2))])
    prov = cache.provenance
    label = f"steering.add(v#{identity.value_digest(vector(gpt2))[:4]}, start=2)"  # as the call that made it
    assert repr(prov) == f"Provenance(positions 0-7: {HOOK} {label})"
    frame = prov.to_frame()
    assert list(frame["point"]) == [HOOK] and list(frame["declared_positions"]) == ["start=2"]
    assert list(frame["intervention"]) == [label]
    assert f"{HOOK} {label}</td>" in prov._repr_html_()
    assert prov.weights.startswith("sampled-sha256:")



def test_labels_read_as_the_call_that_made_the_hook(gpt2, tmp_path):
    v = vector(gpt2)
    tag = identity.value_digest(v)[:4]

    def double(act, hook):
        return act * 2

    cases = [  # (hook, label in repr / to_frame / HTML / warnings / cause)
        (interpkv.steering.add(v), f"steering.add(v#{tag})"),
        (interpkv.steering.add(v, scale=2, start=5), f"steering.add(v#{tag}, scale=2.0, start=5)"),
        (interpkv.steering.add(v, positions=[1, 3], stop=4), f"steering.add(v#{tag}, stop=4, positions=[1, 3])"),
        (interpkv.steering.replace(v, positions=[4]), f"steering.replace(value#{tag}, positions=[4])"),
        (interpkv.intervention(double, start=2),
         f"intervention(double#{identity.value_digest(double)[:4]}, start=2)"),
        (interpkv.intervention(double, name="double-v1"), "intervention(double, name='double-v1')"),
    ]
    for hook, label in cases:
        cache = prefilled(gpt2, [(HOOK, hook)])
        (item,) = cache.provenance.interventions
        assert (item.label, item.text()) == (label, f"{HOOK} {label}")  # the positions once, in the label
    # Equal calls read the same: an int scale is the float it means (one identity, one label).
    assert interpkv.steering.add(v, scale=2)._interpkv_declared == interpkv.steering.add(v, scale=2.0)._interpkv_declared
    # A region is stated as declared; in a file it also shows where it resolved to.
    cache = interpkv.KVCache.for_model(gpt2)
    interpkv.generate(gpt2, PROMPT, cache=cache, max_new_tokens=2,
                      fwd_hooks=[(HOOK, interpkv.steering.add(v, region="generated"))])
    assert repr(cache.provenance) == f"Provenance(positions 0-8: {HOOK} steering.add(v#{tag}, region='generated'))"
    cache.save(tmp_path / "g.safetensors")
    saved = persist.read_provenance(tmp_path / "g.safetensors")
    assert saved.interventions[0].text() == f"{HOOK} steering.add(v#{tag}, region='generated') [start=[8]]"

# ------------------------------------------------------------------- files
def test_save_carries_provenance_readable_without_tensors(gpt2, tmp_path):
    steer = [(HOOK, interpkv.steering.add(vector(gpt2)))]
    cache = prefilled(gpt2, steer)
    path = tmp_path / "c.safetensors"
    cache.save(path)
    header_only = persist.read_provenance(path)
    assert [s.positions for s in header_only.spans] == [(0, 7)]
    assert header_only.spans[0].interventions == cache.provenance.spans[0].interventions
    assert header_only.weights == cache.provenance.weights
    loaded = interpkv.KVCache.load(path, gpt2)
    _, caught = continued(gpt2, loaded, steer)
    assert caught == []
    _, caught = continued(gpt2, interpkv.KVCache.load(path, gpt2))
    assert len(caught) == 1 and HOOK in str(caught[0].message)


# --------------------------------------------------------------------- SAEs
@pytest.fixture(scope="module")
def sae_model():
    pytest.importorskip("sae_lens")
    return interpkv.zoo.load_sae("llama", HOOK, dtype=F64)


def test_sae_attached_at_write_and_removed_at_continue_warns(sae_model):
    sae = sae_model.acts_to_saes[HOOK]
    cache = prefilled(sae_model)
    assert [(i.kind, i.point) for i in cache.provenance.interventions] == [("sae", HOOK)]
    logits_same, caught = continued(sae_model, cache.fork())
    assert caught == []
    sae_model.reset_saes()
    try:
        logits, caught = continued(sae_model, cache)
        assert len(caught) == 1 and "sae" in str(caught[0].message) and HOOK in str(caught[0].message)
        assert not close(logits, uncached(sae_model))  # the keys came through the SAE
    finally:
        sae_model.add_sae(sae)


SCRIPT = """
import json, sys, warnings, torch, interpkv
model = interpkv.zoo.load_sae("llama", "blocks.0.hook_resid_post", dtype=torch.float64)
model.reset_saes()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cache = interpkv.KVCache.load(sys.argv[1], model)
    on_load = [str(w.message) for w in caught if w.category is interpkv.ProvenanceWarning]
    del caught[:]
    interpkv.forward(model, torch.tensor([[5]]), cache=cache)
    on_continue = [str(w.message) for w in caught if w.category is interpkv.ProvenanceWarning]
print(json.dumps({"load": on_load, "continue": on_continue,
                  "kinds": [i.kind for i in cache.provenance.interventions]}))
"""


def test_sae_cache_saved_then_loaded_without_the_sae_in_a_fresh_process_warns(sae_model, tmp_path):
    path = tmp_path / "sae.safetensors"
    prefilled(sae_model).save(path)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kinds"] == ["sae"]
    assert len(result["load"]) == 1 and HOOK in result["load"][0] and "the model has none" in result["load"][0]
    assert len(result["continue"]) == 1 and HOOK in result["continue"][0]


def test_sae_with_error_term_is_listed_but_never_a_mismatch():
    pytest.importorskip("sae_lens")
    model = interpkv.zoo.load_sae("gpt2", HOOK, dtype=F64, use_error_term=True)
    cache = prefilled(model)
    assert [i.acts for i in cache.provenance.interventions] == [False]
    model.reset_saes()
    _, caught = continued(model, cache)
    assert caught == []


# ------------------------------------------------------------------ patching
def test_patch_with_shared_prefix_is_silent(gpt2):
    clean = torch.tensor([[5, 6, 7, 8, 9, 10]])
    corrupt = torch.tensor([[5, 6, 7, 8, 9, 11]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", interpkv.ProvenanceWarning)
        interpkv.patching.patch(gpt2, clean, corrupt, hook="resid_pre", metric=lambda x: x[:, -1, 0].mean(),
                                progress=False)


# ------------------------------------------------------------------ identity
def test_identity_digest_reads_code_closures_partials_and_globals():
    from interpkv.cache.identity import digest

    a, b = torch.ones(3), torch.ones(3) * 2

    def make(vec, k):
        return lambda act, hook: act * k + vec

    assert digest(make(a, 1))[0] == digest(make(a.clone(), 1))[0]
    assert digest(make(a, 1))[0] != digest(make(b, 1))[0]
    assert digest(make(a, 1))[0] != digest(make(a, 2))[0]
    assert digest(lambda act, hook: act + 1)[0] != digest(lambda act, hook: act - 1)[0]
    assert digest(functools.partial(torch.add, other=a))[0] != digest(functools.partial(torch.add, other=b))[0]
    store = []
    recorder = make(a, 1).__class__  # noqa: F841 (a function type)

    def rec(act, hook):
        store.append(act)

    before = digest(rec)[0]
    store.append(1)
    assert digest(rec)[0] == before  # a list a hook holds is its store: by type only

    class Opaque:
        __slots__ = ()

        def __call__(self, act, hook):
            return act

    key, automatic = digest(Opaque())
    assert not automatic and key.startswith("id:")


# --------------------------------------------------------------- cause
def test_compare_and_compare_generation_given_a_cache_name_its_provenance_in_cause(gpt2):
    steer = [(HOOK, interpkv.steering.add(vector(gpt2)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", interpkv.ProvenanceWarning)
        clean = interpkv.compare(gpt2, FULL, steps=[1, 1], cache=prefilled(gpt2))
        report = interpkv.compare(gpt2, FULL, steps=[1, 1], cache=prefilled(gpt2, steer))
        same = interpkv.compare(gpt2, FULL, steps=[2], cache=prefilled(gpt2, steer), fwd_hooks=steer)
        gen_clean = interpkv.compare_generation(gpt2, FULL, max_new_tokens=3, cache=prefilled(gpt2))
        gen = interpkv.compare_generation(gpt2, FULL, max_new_tokens=3, cache=prefilled(gpt2, steer))
    assert clean.ok(atol=ATOL, rtol=0) and clean.cause is None
    assert same.ok(atol=ATOL, rtol=0) and same.cause is None
    assert not report.ok(atol=ATOL, rtol=0)
    assert report.first_divergence(atol=ATOL, rtol=0).pos == PROMPT.shape[1]
    assert re.search(r"positions 0-7 were written under blocks\.0\.hook_resid_post steering\.add\(v#[0-9a-f]{4}\); "
                     "this run has none", report.cause)
    assert "this run has none" in report.cause
    assert gen_clean.ok and gen_clean.cause is None
    assert not gen.ok and HOOK in gen.cause


def test_cli_shows_a_saved_caches_provenance_from_the_header(gpt2, tmp_path, capsys):
    from interpkv.cli.app import main

    path = tmp_path / "c.safetensors"
    prefilled(gpt2, [(HOOK, interpkv.steering.add(vector(gpt2)))]).save(path)
    assert main(["provenance", str(path)]) == 0
    out = capsys.readouterr().out
    assert HOOK in out and "steering.add" in out and "0-7" in out
    (tmp_path / "bad").write_bytes(b"abc")
    assert main(["provenance", str(tmp_path / "bad")]) == 2


def test_a_windowed_cache_forgets_evicted_spans():
    model = interpkv.zoo.load("llama", dtype=F64)
    cache = interpkv.KVCache.for_model(model, window=4)
    interpkv.forward(model, PROMPT, cache=cache, fwd_hooks=[(HOOK, interpkv.steering.add(vector(model)))])
    for token in range(6):  # unsteered steps: each warns while steered keys are still stored
        _, caught = continued(model, cache)
    assert caught == []  # the window no longer holds any steered position
    assert all(not s.interventions for s in cache.provenance.spans)


def test_model_hooks_that_only_record_are_not_interventions(gpt2):
    seen = []
    with gpt2.hooks(fwd_hooks=[(HOOK, lambda act, hook: seen.append(act.shape))]):
        cache = prefilled(gpt2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", interpkv.ProvenanceWarning)
            interpkv.generate(gpt2, NEXT, cache=cache, max_new_tokens=3)
    assert seen and cache.provenance.interventions == ()


@pytest.mark.parametrize("text", [
    "[" * 100_000,  # json.loads recurses: RecursionError (found by tests/integration/test_persist_fuzz.py)
    '{"version": 1, "spans": [{"slots": [0, 1e999], "interventions": null}]}',
    '{"version": 1, "spans": [{"slots": [3, 2], "interventions": null}]}',
    '{"version": 1, "spans": [{"slots": [0, 2], "interventions": [{"kind": "hook", "point": "p", "label": "l", '
    '"digest": "d", "where": {"start": 99999999999999999999}}]}]}',
    '{"version": 1, "spans": [{"slots": [0, 2], "interventions": [{"kind": "hook", "point": "p", "label": "l", '
    '"digest": "d", "where": {"region": "elsewhere"}}]}]}',
    '{"version": 2, "spans": []}',
])
def test_a_corrupted_provenance_header_is_a_file_error(text):
    with pytest.raises(interpkv.CacheFileError, match="corrupted provenance"):
        provenance.from_header({"provenance": text}, "f.safetensors")
