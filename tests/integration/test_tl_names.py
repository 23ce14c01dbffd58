"""TransformerLens names everywhere: ``Record[name, layer]``, ``Record.to_activation_cache``,
and ``fwd_hooks`` in ``capture`` / ``compare`` / ``compare_generation``."""

import pytest
import torch
from transformer_lens.utilities import get_act_name

import interpkv

from ._generation import model, prompts

F64 = torch.float64
TOL = 1e-10  # float64: summation-order noise only


@pytest.fixture(scope="module")
def gpt2():
    return model("gpt2", F64)


@pytest.fixture(scope="module")
def chunked(gpt2):
    tokens, _ = prompts(gpt2.cfg.d_vocab, batch=2, length=9, ragged=False)
    return tokens, interpkv.capture(gpt2, tokens, steps=[5, 1, 3])


@pytest.mark.parametrize(
    "key, full",
    [
        (("resid_pre", 0), "blocks.0.hook_resid_pre"),
        (("pattern", 1), "blocks.1.attn.hook_pattern"),
        (("q", 0), "blocks.0.attn.hook_q"),
        (("q", -1), "blocks.1.attn.hook_q"),
        (("scale", 0, "ln1"), "blocks.0.ln1.hook_scale"),
        ("embed", "hook_embed"),
        ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre"),
    ],
    ids=str,
)
def test_record_keys_resolve_like_activation_cache(chunked, key, full):
    _, record = chunked
    assert record[key] is record[full]
    assert key in record


def test_record_misses_name_the_resolved_hook(gpt2, chunked):
    tokens, _ = chunked
    record = interpkv.capture(gpt2, tokens, names=["blocks.0.hook_resid_pre"])
    with pytest.raises(KeyError, match="blocks.1.hook_resid_pre.*was not captured"):
        record["resid_pre", 1]
    assert ("resid_pre", 1) not in record and ("resid_pre", 0) in record


def test_to_activation_cache_runs_transformer_lens_tools_on_a_chunked_capture(gpt2, chunked):
    tokens, record = chunked
    _, ref = gpt2.run_with_cache(tokens)
    ours = record.to_activation_cache(gpt2)
    assert ours["resid_pre", 1] is record["resid_pre", 1]
    for got, want in [
        (ours.accumulated_resid(), ref.accumulated_resid()),
        (ours.decompose_resid(), ref.decompose_resid()),
        (ours.stack_activation("mlp_out"), ref.stack_activation("mlp_out")),
        (ours.stack_head_results(layer=-1), ref.stack_head_results(layer=-1)),
    ]:
        assert got.shape == want.shape and (got - want).abs().max() < TOL
    # attention: [batch, head, query, key]; 0 above the diagonal, as TL stores it
    pattern, tl_pattern = ours.stack_activation("pattern"), ref.stack_activation("pattern")
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)
    assert (pattern[..., future] == 0).all() and (tl_pattern[..., future] == 0).all()
    assert (pattern - tl_pattern).abs().max() < TOL
    assert (pattern.sum(-1) - 1).abs().max() < TOL  # rows sum to 1, as in TL (was NaN)


# ------------------------------------------------------------------- hooks
def _steer(act, hook):
    return act + 0.5  # the same edit at every position: chunking cannot change it


STEER = [(get_act_name("resid_pre", 1), _steer)]


def test_capture_records_hooked_activations_like_run_with_cache(gpt2, chunked):
    tokens, plain = chunked
    steered = interpkv.capture(gpt2, tokens, steps=[5, 1, 3], fwd_hooks=STEER)
    with gpt2.hooks(fwd_hooks=STEER):
        logits, ref = gpt2.run_with_cache(tokens)
    for name in ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"):
        assert (steered[name] - ref[name]).abs().max() < TOL
    assert (steered.logits - logits).abs().max() < TOL
    assert (steered["resid_pre", 1] - plain["resid_pre", 1] - 0.5).abs().max() < TOL  # recorded edited
    assert not gpt2.hook_dict["blocks.1.hook_resid_pre"].fwd_hooks  # removed afterwards


def test_compare_hooks_both_runs(gpt2, chunked):
    tokens, _ = chunked
    report = interpkv.compare(gpt2, tokens, steps=[5, 1, 3], fwd_hooks=STEER)
    assert report.ok(atol=TOL, rtol=TOL)
    # a hook on only one side is a divergence at exactly that hook
    one_sided = interpkv.diff(
        interpkv.capture(gpt2, tokens, steps=[5, 1, 3], fwd_hooks=STEER), interpkv.capture(gpt2, tokens)
    )
    assert one_sided.first_divergence(atol=TOL, rtol=TOL).hook == "blocks.1.hook_resid_pre"


def test_compare_generation_hooks_both_runs():
    m = model("llama", F64)
    tokens, mask = prompts(m.cfg.d_vocab, batch=2, length=6)
    push = m.W_U[:, 7] * 50.0  # steer hard towards token 7

    def steer(act, hook):
        return act + push

    hooks = [(get_act_name("resid_post", m.cfg.n_layers - 1), steer)]
    diff = interpkv.compare_generation(m, tokens, attention_mask=mask, max_new_tokens=5, fwd_hooks=hooks)
    assert diff.ok and (diff.tokens_a == 7).all()
    assert not (interpkv.compare_generation(m, tokens, attention_mask=mask, max_new_tokens=5).tokens_a == 7).all()
