"""interpkv.forward: hooks, TransformerLens coexistence, half precision, misuse."""

import pytest
import torch

import interpkv
from interpkv import zoo

from ._parity import batch, cached_logits, model

NAMES = zoo.names()


def _fired(m, run):
    seen = {}

    def record(x, hook):
        seen.setdefault(hook.name, tuple(x.shape))

    run([(lambda name: True, record)])
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_every_hook_point_fires_in_cached_mode(name):
    m = model(name)
    tokens, _ = batch("b1", m.cfg.d_vocab, length=10)
    tl = _fired(m, lambda hooks: m.run_with_hooks(tokens, fwd_hooks=hooks))
    cache = interpkv.KVCache.for_model(m)
    interpkv.forward(m, tokens[:, :9], cache=cache)
    cached = _fired(m, lambda hooks: interpkv.forward(m, tokens[:, 9:], cache=cache, fwd_hooks=hooks))
    assert set(cached) == set(tl)
    for hook_name, shape in tl.items():
        if hook_name.endswith(("hook_attn_scores", "hook_pattern")):
            assert cached[hook_name] == shape[:2] + (1, 10), hook_name  # one query, ten keys
        elif hook_name.endswith("hook_rot_k") or ".attn.hook_k" in hook_name or ".attn.hook_v" in hook_name:
            assert cached[hook_name] == (shape[0], 1) + shape[2:], hook_name
        elif ".experts." in hook_name:  # [tokens routed to this expert, d_mlp]
            assert cached[hook_name][1:] == shape[1:] and cached[hook_name][0] <= 2, hook_name
        elif shape[0] != tokens.shape[0]:  # Q/K norm, MoE routing: rows are flattened tokens
            assert (cached[hook_name][0] * 10, *cached[hook_name][1:]) == shape, hook_name
        else:
            assert cached[hook_name][0] == shape[0], hook_name


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_fwd_hooks_edit_the_run_like_transformer_lens(name):
    m = model(name, torch.float64)
    tokens, _ = batch("b1", m.cfg.d_vocab, length=12)

    def ablate_head(z, hook):
        z[:, :, 1] = 0.0
        return z

    hooks = [("blocks.0.attn.hook_z", ablate_head)]
    ref = m.run_with_hooks(tokens, fwd_hooks=hooks)
    cache = interpkv.KVCache.for_model(m)
    got = torch.cat(
        [interpkv.forward(m, tokens[:, :7], cache=cache, fwd_hooks=hooks)]
        + [interpkv.forward(m, tokens[:, i : i + 1], cache=cache, fwd_hooks=hooks) for i in range(7, 12)],
        dim=1,
    )
    assert (got - ref).abs().max() < 1e-10
    assert (m(tokens) - ref).abs().max() > 1e-6  # the hook really changed something


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_transformer_lens_generate_still_works_after_interpkv(name):
    m = model(name)
    tokens, _ = batch("b1", m.cfg.d_vocab, length=6)
    kwargs = dict(max_new_tokens=4, use_past_kv_cache=True, verbose=False, do_sample=False, stop_at_eos=False)
    before = m.generate(tokens, **kwargs)
    interpkv.forward(m, tokens, cache=interpkv.KVCache.for_model(m))
    assert all("forward" not in block.attn.__dict__ for block in m.blocks)
    assert torch.equal(m.generate(tokens, **kwargs), before)
    assert torch.equal(m(tokens), m(tokens))


def test_attention_is_restored_when_a_hook_raises():
    m = model("llama")
    tokens, _ = batch("b1", m.cfg.d_vocab, length=5)
    cache = interpkv.KVCache.for_model(m)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        interpkv.forward(m, tokens, cache=cache, fwd_hooks=[("blocks.1.hook_resid_post", boom)])
    assert all("forward" not in block.attn.__dict__ for block in m.blocks)
    assert cache.seq_len == 0  # nothing half-written was committed
    assert not m.hook_dict["blocks.1.hook_resid_post"].fwd_hooks


# In half precision one rounding step of the logits is ~1e-3 (fp16) and ~1e-2
# (bf16) relative; chunked and one-shot runs sum in different orders, so they
# may differ by a few such steps, never by more.
HALF_TOL = {torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


@pytest.mark.parametrize("dtype", HALF_TOL, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["gpt2", "neox", "llama", "bloom", "gemma2"])
def test_half_precision_cached_matches_uncached(name, dtype):
    m = zoo.load(name, dtype=dtype)
    tokens, mask = batch("b3", m.cfg.d_vocab)
    ref = interpkv.forward(m, tokens, attention_mask=mask)
    got = cached_logits(m, tokens, mask, [16] + [1] * 8)
    real = mask.bool()
    scale = ref[real].float().abs().max().item()
    assert (got[real].float() - ref[real].float()).abs().max().item() < HALF_TOL[dtype] * max(scale, 1.0)


@pytest.mark.parametrize("name", ["bloom", "llama"])
def test_nothing_from_an_earlier_call_changes_a_later_one(name):
    # TransformerLens keeps an ALiBi matrix from a longer earlier input and
    # slices it; in bfloat16 that alone moves logits. Ours must be bitwise stable.
    m = zoo.load(name, dtype=torch.bfloat16)
    short, _ = batch("b1", m.cfg.d_vocab, length=8)
    long, _ = batch("b1", m.cfg.d_vocab, length=200, seed=1)
    first = interpkv.forward(m, short)
    interpkv.forward(m, long)
    assert torch.equal(interpkv.forward(m, short), first)


def test_gqa_cache_is_stored_at_kv_heads():
    m = model("llama")
    cfg = m.cfg
    assert cfg.n_key_value_heads < cfg.n_heads
    cache = interpkv.KVCache.for_model(m, batch_size=2)
    interpkv.forward(m, torch.zeros(2, 5, dtype=torch.long), cache=cache)
    itemsize = torch.tensor([], dtype=cfg.dtype).element_size()
    kv = 2 * cfg.n_layers * cfg.n_key_value_heads * cfg.d_head * itemsize
    assert cache.nbytes == 2 * 5 * (kv + 8)  # + the int64 position index
    assert cache.layers[0].keys.shape[1] == cfg.n_key_value_heads


def test_learned_positions_past_n_ctx_raise():
    m = model("gpt2")
    cache = interpkv.KVCache.for_model(m)
    interpkv.forward(m, torch.zeros(1, m.cfg.n_ctx, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=f"position {m.cfg.n_ctx} is past this model's n_ctx"):
        interpkv.forward(m, torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.seq_len == m.cfg.n_ctx


def test_rotary_positions_continue_past_the_initial_rotary_table():
    m = model("neox", torch.float64)
    tokens = torch.randint(0, m.cfg.d_vocab, (1, 600), generator=torch.Generator().manual_seed(0))
    got = cached_logits(m, tokens, torch.ones_like(tokens), [590, 10])
    assert (got[:, -10:] - m(tokens)[:, -10:]).abs().max() < 1e-10


class TestMisuse:
    def test_cache_from_another_architecture(self):
        cache = interpkv.KVCache.for_model(model("gpt2"))
        with pytest.raises(interpkv.CacheMismatchError, match="made for .*GPT2.* but the model passed is .*Llama"):
            interpkv.forward(model("llama"), torch.zeros(1, 2, dtype=torch.long), cache=cache)

    def test_cache_from_another_model_object_of_same_architecture(self):
        cache = interpkv.KVCache.for_model(zoo.load("gpt2"))
        with pytest.raises(interpkv.CacheMismatchError, match="another HookedTransformer object"):
            interpkv.forward(model("gpt2"), torch.zeros(1, 2, dtype=torch.long), cache=cache)

    def test_batch_size_mismatch(self):
        m = model("gpt2")
        cache = interpkv.KVCache.for_model(m, batch_size=2)
        with pytest.raises(interpkv.CacheMismatchError, match="holds 2 rows but the tokens have batch 3"):
            interpkv.forward(m, torch.zeros(3, 2, dtype=torch.long), cache=cache)

    def test_dtype_mismatch(self):
        m = zoo.load("gpt2")
        cache = interpkv.KVCache.for_model(m)
        m.to(torch.float64)
        message = "cache dtype is torch.float32 but the model now runs in torch.float64"
        with pytest.raises(interpkv.CacheMismatchError, match=message):
            interpkv.forward(m, torch.zeros(1, 2, dtype=torch.long), cache=cache)

    @pytest.mark.unchecked_shapes  # checks interpkv's own error for a wrong argument
    def test_mask_shape_mismatch(self):
        m = model("gpt2")
        with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\) but the tokens have shape \(1, 2\)"):
            interpkv.forward(m, torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 3))

    def test_token_ids_out_of_range(self):
        m = model("gpt2")
        with pytest.raises(ValueError, match=r"ids outside \[0, d_vocab"):
            interpkv.forward(m, torch.tensor([[0, m.cfg.d_vocab]]))

    @pytest.mark.unchecked_shapes  # checks interpkv's own error for a wrong argument
    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            interpkv.forward(model("gpt2"), [[1, 2]])

    def test_bad_window_arguments(self):
        m = model("gpt2")
        with pytest.raises(ValueError, match="sinks only make sense with a window"):
            interpkv.KVCache.for_model(m, sinks=2)
        with pytest.raises(ValueError, match="window must be a positive"):
            interpkv.KVCache.for_model(m, window=0)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_in_place_weight_edits_are_never_served_stale(name):
    # interpkv.core.prepared keeps weight layouts between calls (the decode hot path);
    # an ablation edits weights in place, and the next call must see it.
    m = zoo.load(name, dtype=torch.float64)
    tokens, _ = batch("b1", m.cfg.d_vocab, length=8)
    with torch.no_grad():
        before = interpkv.forward(m, tokens)
        m.blocks[0].attn.W_Q[1] = 0.0
        m.blocks[0].mlp.W_in[:, :5] = 0.0
        after = interpkv.forward(m, tokens)
        reference = m(tokens)
    assert (after - reference).abs().max() < 1e-10
    assert (after - before).abs().max() > 1e-6


def test_gradients_flow_through_forward():
    m = zoo.load("llama", dtype=torch.float64)
    tokens, _ = batch("b1", m.cfg.d_vocab, length=6)
    interpkv.forward(m, tokens)[0, -1, 0].backward()
    assert m.blocks[0].attn.W_Q.grad is not None and m.blocks[0].attn.W_Q.grad.abs().sum() > 0
    assert m.blocks[0].mlp.W_gate.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_any_integer_dtype_of_token_ids_is_accepted(dtype):
    """Regression: uint8/int16 ids reached torch's embedding as a raw IndexError."""
    model = interpkv.zoo.load("gpt2", dtype=torch.float64)
    ids = torch.tensor([[1, 7, 3, 90]])
    expected = interpkv.forward(model, ids)
    got = interpkv.forward(model, ids.to(dtype))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_bool_token_ids_get_an_error_naming_the_mask():
    model = interpkv.zoo.load("gpt2")
    with pytest.raises(TypeError, match="attention_mask"):
        interpkv.forward(model, torch.tensor([[True, False]]))
