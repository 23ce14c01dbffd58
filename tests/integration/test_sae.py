"""SAELens's HookedSAETransformer, SAEs attached, works wherever a HookedTransformer does.

Models come from :func:`interpkv.zoo.load_sae` (a zoo model converted to a
``HookedSAETransformer``, random-weight SAEs attached): gpt2 (learned absolute
positions) and llama (rotary + GQA), each with an SAE on a residual hook, the
same with SAELens's error term, and SAEs on an attention (``attn.hook_z``,
heads flattened) plus an MLP hook. The reference is always SAELens's own
forward, ``model(tokens)`` / ``run_with_cache`` / ``run_with_hooks``.
"""

import functools
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sae_lens")

from transformer_lens import patching as TL_PATCHING  # the reference implementation

import interpkv
from interpkv import zoo

F32, F64 = torch.float32, torch.float64
MODELS = ["gpt2", "llama"]
SETUPS = {
    "resid": dict(hooks=["blocks.0.hook_resid_post"]),
    "resid_error_term": dict(hooks=["blocks.0.hook_resid_post"], use_error_term=True),
    "attn_z_and_mlp": dict(hooks=["blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"]),
}
SAE_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output")
STEPS = [5, 1, 1, 1, 1, 1]  # a prompt, then token by token
LENGTH = sum(STEPS)
# float64 leaves summation-order noise only (~1e-14): 1e-10 catches any real
# difference. float32: a one-token step and a full pass multiply matrices of
# other shapes, so BLAS sums in another order; as in tests/integration/_parity.py,
# 5e-6 relative to the largest logit (random SAEs without the error term make
# logits up to ~10).
TOL = {F64: 1e-10, F32: 5e-6}


def tolerance(dtype, reference):
    return TOL[dtype] * max(1.0, reference.abs().max().item()) if dtype == F32 else TOL[dtype]


@functools.cache
def sae_model(name, setup, dtype=F64):
    spec = SETUPS[setup]
    return zoo.load_sae(
        name, spec["hooks"], d_sae=48, dtype=dtype, use_error_term=spec.get("use_error_term", False)
    )


def tokens(model, batch=2, length=LENGTH, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


CASES = [pytest.param(n, s, id=f"{n}-{s}") for n in MODELS for s in SETUPS]


def sae_hooks(model, setup):
    names = [f"{hook}.{point}" for hook in SETUPS[setup]["hooks"] for point in SAE_POINTS]
    if SETUPS[setup].get("use_error_term"):
        names += [f"{hook}.hook_sae_error" for hook in SETUPS[setup]["hooks"]]
    assert set(names) <= set(model.hook_dict), "the SAEs are not attached where expected"
    return names


# --- the model and its SAEs --------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_conversion_computes_the_zoo_models_function(name):
    base = zoo.load(name, dtype=F64)
    converted = zoo.as_sae_transformer(base)
    assert type(converted).__name__ == "HookedSAETransformer" and not converted.acts_to_saes
    t = tokens(base)
    assert torch.equal(converted(t), base(t))


def test_conversion_keeps_the_tokenizer():
    base = zoo.load("gpt2", trained=True)
    converted = zoo.as_sae_transformer(base)
    assert converted.to_string(converted.to_tokens("def f():")) == ["def f():"]
    assert converted.cfg.default_prepend_bos is False and converted.zoo_metadata == base.zoo_metadata
    assert interpkv.generate(converted, "def ", max_new_tokens=8).text == interpkv.generate(
        base, "def ", max_new_tokens=8
    ).text


@pytest.mark.parametrize("name, setup", CASES)
def test_saes_are_attached_and_change_the_model_unless_error_term(name, setup):
    model = sae_model(name, setup)
    t = tokens(model)
    delta = (model(t) - zoo.load(name, dtype=F64)(t)).abs().max().item()
    if SETUPS[setup].get("use_error_term"):
        assert delta < TOL[F64]  # reconstruction + error = the original activation
    else:
        assert delta > 1e-3  # the SAEs run in the reference, so the checks below test them
    for hook in SETUPS[setup]["hooks"]:
        assert model.acts_to_saes[hook].cfg.metadata.hook_name == hook


def test_random_sae_reads_the_width_at_its_hook():
    model = sae_model("llama", "attn_z_and_mlp")
    z = model.acts_to_saes["blocks.1.attn.hook_z"].cfg
    assert (z.d_in, z.reshape_activations) == (model.cfg.n_heads * model.cfg.d_head, "hook_z")
    assert model.acts_to_saes["blocks.0.hook_mlp_out"].cfg.d_in == model.cfg.d_model
    a, b = zoo.random_sae(model, "blocks.1.hook_resid_pre", seed=3), zoo.random_sae(model, "blocks.1.hook_resid_pre", seed=3)
    assert torch.equal(a.W_dec, b.W_dec) and not any(p.requires_grad for p in a.parameters())


@pytest.mark.parametrize(
    "hook, message",
    [("blocks.0.hook_nonsense", "not a hook point"), ("blocks.0.attn.hook_q", "hook_z")],
    ids=["unknown", "heads_not_z"],
)
def test_random_sae_errors_name_the_hook(hook, message):
    with pytest.raises(ValueError, match=message):
        zoo.random_sae(sae_model("gpt2", "resid"), hook)


def test_interpkv_imports_without_sae_lens_and_says_how_to_install():
    code = (
        "import sys; sys.modules['sae_lens'] = None\n"
        "import interpkv, interpkv.zoo\n"
        "try:\n"
        "    interpkv.zoo.load_sae('gpt2')\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR" in out.stdout and "pip install" in out.stdout and "sae-lens" in out.stdout


# --- forward, capture, compare -----------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("name, setup", CASES)
def test_forward_cached_equals_uncached_equals_sae_lens(name, setup, dtype):
    model = sae_model(name, setup, dtype)
    t = tokens(model)
    with torch.no_grad():
        reference = model(t)  # SAELens's own forward
        uncached = interpkv.forward(model, t)
        cache = interpkv.KVCache.for_model(model, batch_size=2)
        chunks, start = [], 0
        for n in STEPS:
            chunks.append(interpkv.forward(model, t[:, start : start + n], cache=cache))
            start += n
    cached = torch.cat(chunks, dim=1)
    tol = tolerance(dtype, reference)
    assert (uncached - reference).abs().max().item() < tol
    assert (cached - reference).abs().max().item() < tol


@pytest.mark.parametrize("name, setup", CASES)
def test_capture_records_sae_hooks_like_run_with_cache(name, setup):
    model = sae_model(name, setup)
    t = tokens(model)
    record = interpkv.capture(model, t, steps=STEPS)
    with torch.no_grad():
        _, reference = model.run_with_cache(t)
    for hook in sae_hooks(model, setup):
        assert hook in reference.keys()
        got, want = record[hook], reference[hook]
        assert got.shape == want.shape, hook
        assert (got - want).abs().max().item() < TOL[F64], hook
    for hook in reference.keys():  # every other hook point too
        got, want = record[hook], reference[hook]
        # Keys a query may not attend: TransformerLens's masked value (pattern 0, scores -inf), or NaN
        hidden = torch.isnan(got)
        assert torch.all((want[hidden] == 0) | torch.isneginf(want[hidden])), hook
        assert torch.equal(torch.isneginf(got[~hidden]), torch.isneginf(want[~hidden])), hook
        shown = ~hidden & torch.isfinite(want)
        assert (got[shown] - want[shown]).abs().max().item() < TOL[F64], hook


@pytest.mark.parametrize("engine", ["interpkv", "transformer_lens"])
@pytest.mark.parametrize("name, setup", CASES)
def test_compare_passes_on_either_engine(name, setup, engine):
    model = sae_model(name, setup)
    report = interpkv.compare(model, tokens(model), steps=STEPS, engine=engine)
    assert set(sae_hooks(model, setup)) <= set(report.hooks), "the SAE hooks were not compared"
    assert report.ok(atol=TOL[F64], rtol=TOL[F64]), report.first_divergence(atol=TOL[F64], rtol=TOL[F64])


# --- generation, steering, patching ------------------------------------------


def uncached_greedy(model, prompt, n, fwd_hooks=()):
    """The loop a cache must reproduce: rerun the whole sequence (with the hooks) every step."""
    out = prompt
    with torch.no_grad():
        for _ in range(n):
            logits = model.run_with_hooks(out, fwd_hooks=list(fwd_hooks))
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def clamp_feature(feature, value):
    def hook(acts, hook):  # position-free: every position
        acts = acts.clone()
        acts[..., feature] = value
        return acts

    return hook


@pytest.mark.parametrize("name, setup", CASES)
def test_generate_equals_the_uncached_loop(name, setup):
    model = sae_model(name, setup)
    prompt = tokens(model, length=5)
    out = interpkv.generate(model, prompt, max_new_tokens=8)
    assert torch.equal(out.tokens, uncached_greedy(model, prompt, 8))
    diff = interpkv.compare_generation(model, prompt, max_new_tokens=6)
    assert diff.first_divergent_step is None and max(diff.logits_max_abs) < TOL[F64]


STEERING = [
    pytest.param(setup, hook, how, id=f"{setup}-{hook.split('.')[-1]}-{how}")
    for setup, hook, how in [
        ("resid", "blocks.0.hook_resid_post", "add_decoder_direction"),
        ("resid", "blocks.0.hook_resid_post", "clamp_feature"),
        ("attn_z_and_mlp", "blocks.1.attn.hook_z", "add_decoder_direction"),
        ("attn_z_and_mlp", "blocks.1.attn.hook_z", "clamp_feature"),
        ("attn_z_and_mlp", "blocks.0.hook_mlp_out", "clamp_feature"),
    ]
]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("setup, hook_name, how", STEERING)
def test_sae_steering_through_generate_equals_the_uncached_loop(name, setup, hook_name, how):
    model = sae_model(name, setup)
    sae, feature = model.acts_to_saes[hook_name], 5
    if how == "add_decoder_direction":
        direction = sae.W_dec[feature]  # (d_in,): heads flattened at hook_z, where the output has them back

        def add(act, hook):  # position-free: every position
            return act + 8.0 * direction.reshape(act.shape[2:])

        fwd_hooks = [(f"{hook_name}.hook_sae_output", add)]
    else:
        fwd_hooks = [(f"{hook_name}.hook_sae_acts_post", clamp_feature(feature, 20.0))]
    prompt = tokens(model, length=5)
    steered = interpkv.generate(model, prompt, max_new_tokens=8, fwd_hooks=fwd_hooks)
    assert torch.equal(steered.tokens, uncached_greedy(model, prompt, 8, fwd_hooks))
    plain = interpkv.generate(model, prompt, max_new_tokens=8)
    assert not torch.equal(steered.tokens, plain.tokens), "the steering must change something to be tested"


@pytest.mark.parametrize("name", MODELS)
def test_steered_feature_is_captured_at_every_generation_step(name):
    model = sae_model(name, "resid_error_term")
    acts_post = "blocks.0.hook_resid_post.hook_sae_acts_post"
    fwd_hooks = [(acts_post, clamp_feature(2, 7.0))]
    prompt = tokens(model, length=4)
    out = interpkv.generate(model, prompt, max_new_tokens=5, fwd_hooks=fwd_hooks, capture=[acts_post])
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):  # the last token is never fed
        _, reference = model.run_with_cache(out.tokens[:, :-1], names_filter=acts_post)
    for record in out.records:
        rows, cols = record.valid.nonzero(as_tuple=True)
        got = record[acts_post][rows, cols]
        assert torch.all(got[:, 2] == 7.0)
        assert (got - reference[acts_post][rows, cols]).abs().max().item() < TOL[F64]


@pytest.mark.parametrize("name, setup", CASES)
def test_patch_equals_transformer_lens_on_an_sae_model(name, setup):
    model = sae_model(name, setup)
    clean = tokens(model, length=7)
    corrupt = clean.clone()
    corrupt[0, 4] = (clean[0, 4] + 1) % model.cfg.d_vocab
    corrupt[1, 3] = (clean[1, 3] + 2) % model.cfg.d_vocab

    def metric(logits):
        return (logits[:, -1, 1] - logits[:, -1, 2]).mean()

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        reference = TL_PATCHING.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    got = interpkv.patching.patch(model, clean, corrupt, hook="resid_pre", metric=metric, progress=False)
    assert got.shape == reference.shape == (model.cfg.n_layers, 7)
    # TransformerLens stores each float64 metric in a float32 tensor: equal up to that rounding.
    assert (got.to(reference.dtype) - reference).abs().max().item() <= 2 * torch.finfo(F32).eps * max(
        1.0, reference.abs().max().item()
    )
    assert reference.abs().max() > 1e-3  # the patching moves the metric


# --- SAE wrappers routed per call (interpkv/core/sae_lens.py) and never skipped ------


@pytest.mark.parametrize("hook", ["ln_final.hook_normalized", "blocks.1.ln1.hook_normalized"])
@pytest.mark.parametrize("name", MODELS)
def test_sae_on_a_norm_hook_is_not_skipped(name, hook):
    model = zoo.load_sae(name, hook, d_sae=16, dtype=F64)
    t = tokens(model)
    with torch.no_grad():
        assert (interpkv.forward(model, t) - model(t)).abs().max().item() < TOL[F64]


@pytest.mark.parametrize("name", MODELS)
def test_exclude_special_tokens_bypasses_the_sae_at_those_tokens(name):
    model = zoo.as_sae_transformer(zoo.load(name, dtype=F64))
    model.add_sae(zoo.random_sae(model, "blocks.0.hook_resid_post", d_sae=16), exclude_special_tokens=[7])
    t = torch.tensor([[7, 3, 4, 7, 5, 6]])
    with torch.no_grad():
        assert (interpkv.forward(model, t) - model(t)).abs().max().item() < TOL[F64]


def test_a_steered_call_keeps_its_sae_hook_while_another_thread_computes_the_error_term():
    import threading

    model = zoo.load_sae("gpt2", "blocks.0.hook_resid_post", d_sae=16, dtype=F64, use_error_term=True)
    hook = "blocks.0.hook_resid_post"
    sae, point = model.acts_to_saes[hook], model.hook_dict[f"{hook}.hook_sae_acts_post"]
    steering = [(f"{hook}.hook_sae_acts_post", clamp_feature(3, 30.0))]
    t = tokens(model, batch=1, length=6)
    with torch.no_grad():
        alone = interpkv.forward(model, t, fwd_hooks=steering)  # the single-thread result
    inside, done, plain = threading.Event(), threading.Event(), threading.current_thread()
    fired = {"n": 0, "swapped": None}

    def pause_inside_the_clean_recompute(module, inputs, output):
        # The SAE's activation runs twice per plain call: encode, then the error-term
        # recompute with hooks disabled. Pause in the second, while the swap is in force.
        if threading.current_thread() is plain:
            fired["n"] += 1
            if fired["n"] == 2:
                fired["swapped"] = sae.hook_sae_acts_post is not point  # on the shared SAE?
                inside.set()
                done.wait(timeout=60)

    handle = sae.activation_fn.register_forward_hook(pause_inside_the_clean_recompute)
    results = {}

    def steered():
        inside.wait(timeout=60)
        with torch.no_grad():
            results["steered"] = interpkv.forward(model, t, fwd_hooks=steering)
        done.set()

    other = threading.Thread(target=steered)
    other.start()
    try:
        with torch.no_grad():
            interpkv.forward(model, t)  # plain, in this thread: pauses inside _disable_hooks
    finally:
        done.set()
        other.join(timeout=60)
        handle.remove()
    assert inside.is_set(), "the plain call never reached SAELens's clean recompute"
    assert fired["swapped"] is False  # the swap happened on the call's private copy only
    assert torch.equal(results["steered"], alone)
