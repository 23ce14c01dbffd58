"""interpkv.generate: cached generation equals an uncached loop (greedy, steering, sampling)."""

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.generation.generate import sample_next

from ._generation import TOL, model, prompts, teacher_forced, uncached_loop

NAMES = zoo.names()
STEPS = 6
F64 = torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_uncached_loop_with_ragged_left_padding(name):
    m = model(name, F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    out = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=STEPS, keep_logits=True)
    ref_tokens, ref_logits = uncached_loop(m, tokens, mask, STEPS)
    assert torch.equal(out.tokens, ref_tokens)
    assert (out.logits - ref_logits).abs().max() < TOL[F64]
    # Teacher forcing: the logits each cached token was chosen from, recomputed in one pass.
    forced = teacher_forced(m, out.tokens, out.attention_mask, tokens.shape[1])
    assert (out.logits - forced).abs().max() < TOL[F64]
    assert torch.equal(out.attention_mask[:, :10], mask)
    assert bool(out.attention_mask[:, 10:].eq(1).all())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_float32_greedy_matches_teacher_forcing(name):
    m = model(name, torch.float32)
    tokens, mask = prompts(m.cfg.d_vocab)
    out = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=STEPS, keep_logits=True)
    forced = teacher_forced(m, out.tokens, out.attention_mask, tokens.shape[1])
    # Relative to the logit scale (|logits| up to ~6): a one-query step and a
    # 16-query pass sum in different orders, ~1e-7 relative per op.
    assert (out.logits - forced).abs().max() < TOL[torch.float32] * forced.abs().max()
    assert torch.equal(out.new_tokens, forced.argmax(-1))


@pytest.mark.parametrize("name", ["gpt2", "shortformer", "neox", "bloom"])
def test_embedding_prompt_gives_the_same_tokens_as_ids(name):
    m = model(name, F64)
    tokens, _ = prompts(m.cfg.d_vocab, ragged=False)
    from_ids = interpkv.generate(m, tokens, max_new_tokens=STEPS, keep_logits=True)
    from_embeds = interpkv.generate(m, m.embed(tokens), max_new_tokens=STEPS, keep_logits=True)
    assert from_embeds.prompt_length == 0
    assert torch.equal(from_embeds.tokens, from_ids.new_tokens)
    assert (from_embeds.logits - from_ids.logits).abs().max() < TOL[F64]


def _steer(vector):
    def add(resid, hook):
        return resid + vector

    return add


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_steering_hook_gives_the_same_generation_cached_and_uncached(name):
    m = model(name, F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    vector = 3.0 * torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(1), dtype=F64)
    hooks = [("blocks.0.hook_resid_post", _steer(vector))]
    steered = interpkv.generate(
        m, tokens, attention_mask=mask, max_new_tokens=STEPS, fwd_hooks=hooks, keep_logits=True
    )
    ref_tokens, ref_logits = uncached_loop(m, tokens, mask, STEPS, fwd_hooks=hooks)
    assert torch.equal(steered.tokens, ref_tokens)
    assert (steered.logits - ref_logits).abs().max() < TOL[F64]
    plain = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=STEPS, keep_logits=True)
    assert (plain.logits - steered.logits).abs().max() > 1e-3  # the hook really steers


def test_hooks_see_only_the_new_positions_of_each_step():
    m = model("llama", F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    shapes = []
    hooks = [("blocks.1.hook_resid_pre", lambda x, hook: shapes.append(tuple(x.shape)))]
    interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=4, fwd_hooks=hooks)
    assert shapes == [(3, 10, m.cfg.d_model)] + [(3, 1, m.cfg.d_model)] * 3


@pytest.mark.parametrize("name", ["neox", "gpt2"])
def test_capture_records_each_step_at_its_absolute_positions(name):
    m = model(name, F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    hooks = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    out = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=4, capture=hooks)
    assert len(out.records) == 4
    one_shot = interpkv.capture(
        m, out.tokens[:, :-1], attention_mask=out.attention_mask[:, :-1], names=hooks, layout="absolute"
    )  # step records are in the absolute layout
    covered = torch.zeros_like(one_shot.valid)
    for step, record in enumerate(out.records):
        assert record.valid.sum(1).tolist() == ([10, 7, 4] if step == 0 else [1, 1, 1])
        n = record.valid.shape[1]
        for hook in hooks + ["logits"]:
            got = record.logits if hook == "logits" else record[hook]
            full = one_shot.logits if hook == "logits" else one_shot[hook]
            if hook.endswith("hook_pattern"):  # [batch, head, q, k]: the step's query rows
                for b in range(3):
                    rows = record.valid[b]
                    a, r = got[b][:, rows, :n], full[b][:, : rows.shape[0]][:, rows, :n]
                    assert torch.allclose(a, r, atol=TOL[F64], equal_nan=True), (step, hook)
            else:
                a, r = got[record.valid], full[:, :n][record.valid]
                assert (a - r).abs().max() < TOL[F64], (step, hook)
        covered[:, :n] |= record.valid
    assert torch.equal(covered, one_shot.valid)  # every position was recorded by some step


def test_capture_with_a_steering_hook_records_the_steered_run():
    m = model("llama", F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    vector = torch.ones(m.cfg.d_model, dtype=F64)
    hooks = [("blocks.0.hook_resid_post", _steer(vector))]
    out = interpkv.generate(
        m, tokens, attention_mask=mask, max_new_tokens=3, fwd_hooks=hooks, capture=["blocks.1.hook_resid_pre"]
    )
    plain = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=3, fwd_hooks=hooks)
    assert torch.equal(out.tokens, plain.tokens)
    steered = interpkv.capture(m, tokens, attention_mask=mask, names=["blocks.0.hook_resid_post"], layout="absolute")
    recorded = out.records[0]["blocks.1.hook_resid_pre"]  # resid_pre of layer 1 = resid_post of layer 0
    valid = out.records[0].valid
    assert ((recorded - steered["blocks.0.hook_resid_post"])[valid] - 1.0).abs().max() < TOL[F64]


def test_generation_continues_from_a_cache():
    m = model("mistral", F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    one_shot = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=7)
    cache = interpkv.KVCache.for_model(m, 3)
    first = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=3, cache=cache)
    assert cache.seq_len == 10 + 2  # the last generated token is not fed yet
    rest = interpkv.generate(m, max_new_tokens=4, cache=cache)  # from the held-back token
    assert torch.equal(torch.cat([first.tokens, rest.new_tokens], 1), one_shot.tokens)


# ----------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed_and_leaves_global_rng_alone():
    m = model("gpt2", F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, temperature=2.0)
    state = torch.get_rng_state()
    a = interpkv.generate(m, tokens, seed=7, **kwargs)
    b = interpkv.generate(m, tokens, seed=7, **kwargs)
    c = interpkv.generate(m, tokens, seed=8, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)  # 15 draws at T=2 over 97 tokens


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_seeded_sampling_equals_an_uncached_sampling_loop(name):
    m = model(name, F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    out = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=STEPS, temperature=1.5, seed=3)
    ref, _ = uncached_loop(m, tokens, mask, STEPS, temperature=1.5, seed=3)
    assert torch.equal(out.tokens, ref)


def test_top_k_one_and_tiny_top_p_are_greedy():
    m = model("gptj", F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    greedy = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=STEPS)
    for options in (dict(top_k=1), dict(top_p=1e-6)):
        out = interpkv.generate(
            m, tokens, attention_mask=mask, max_new_tokens=STEPS, temperature=5.0, seed=0, **options
        )
        assert torch.equal(out.tokens, greedy.tokens), options


def test_top_k_restricts_samples_to_the_k_most_likely():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, temperature=10.0, top_k=2, generator=gen)
    assert set(drawn.tolist()) == {1, 2}


# ------------------------------------------------------------- stop tokens
def test_stopped_rows_emit_padding_while_others_continue():
    m = model("gpt2", F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    free = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=STEPS)
    stop = int(free.new_tokens[0, 1])  # row 0 emits it at step 1
    later_rows = [r for r in (1, 2) if stop not in free.new_tokens[r].tolist()]
    assert later_rows, "pick another prompt: every row emits the stop token"
    out = interpkv.generate(
        m, tokens, attention_mask=mask, max_new_tokens=STEPS, stop_tokens=[stop], pad_token=0
    )
    assert out.new_tokens[0, :2].tolist() == free.new_tokens[0, :2].tolist()
    assert out.new_tokens[0, 2:].eq(0).all()
    assert out.attention_mask[0, 10:].tolist() == [1, 1] + [0] * (STEPS - 2)
    for r in later_rows:  # unaffected by row 0 stopping
        assert torch.equal(out.new_tokens[r], free.new_tokens[r])
    assert out.finished.tolist()[0] is True


def test_generation_ends_when_every_row_stopped_and_pads_with_the_first_stop_token():
    m = model("gpt2", F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    free = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=STEPS)
    stops = sorted({int(free.new_tokens[r, r]) for r in range(3)})  # row r stops by step r
    out = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=STEPS, stop_tokens=stops)
    assert out.finished.all()
    assert out.new_tokens.shape[1] <= 3 < STEPS
    padded = out.attention_mask[:, 10:] == 0
    assert out.new_tokens[padded].eq(stops[0]).all()


# ------------------------------------------------------------------ padding
@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_right_padding_with_a_mask_continues_each_row_from_its_last_real_token(name):
    """Regression: a right-padded prompt with its mask used to be refused ("pad on the LEFT")."""
    m = model(name, F64)
    tokens, mask = prompts(m.cfg.d_vocab)
    mask = mask.flip(1)  # rows 1 and 2 padded on the right
    out = interpkv.generate(m, tokens, attention_mask=mask, max_new_tokens=STEPS, keep_logits=True)
    for row in range(3):
        alone = interpkv.generate(m, tokens[row][mask[row] == 1], max_new_tokens=STEPS, keep_logits=True)
        assert torch.equal(out.new_tokens[row], alone.new_tokens[0]), row
        assert (out.logits[row] - alone.logits[0]).abs().max() < TOL[F64]
        real = out.tokens[row][out.attention_mask[row] == 1]
        assert torch.equal(real, alone.tokens[0])  # laid out left-padded, same real tokens


def test_top_k_without_temperature_is_an_error():
    m = model("gpt2", F64)
    with pytest.raises(ValueError, match="temperature"):
        interpkv.generate(m, torch.tensor([[1, 2]]), max_new_tokens=2, top_k=5)


# --------------------------------------------- TransformerLens 3.9 known bug (measured, not assumed)
def _tl_generate(m, prompt, use_cache):
    return m.generate(
        prompt,
        max_new_tokens=STEPS,
        use_past_kv_cache=use_cache,
        do_sample=False,
        stop_at_eos=False,
        verbose=False,
        return_type="tokens",
        output_logits=True,
    )


@pytest.mark.parametrize("prompt_kind", ["tokens", "embeddings"])
def test_transformer_lens_cached_generate_uses_position_rows_at_twice_the_offset(prompt_kind):
    """TL 3.9 ``generate(use_past_kv_cache=True)`` with learned positions and no tokenizer.

    Each step TL embeds the whole sequence at ``pos_offset`` = cached length and
    keeps the last row, so the new token at position ``n`` gets ``W_pos[2n]``.
    Ours equals the uncached loop whatever TL does. Whether TL's cached run is off
    is measured; when it is, it equals a run whose last token is given ``W_pos[2n]``
    (the explanation above); when it is not, it equals the uncached loop too.
    """
    m = model("gpt2", F64)
    assert m.tokenizer is None
    tokens, mask = prompts(m.cfg.d_vocab, batch=1, ragged=False)
    prompt = tokens if prompt_kind == "tokens" else m.embed(tokens)
    tl_cached = _tl_generate(m, prompt, True)
    tl_uncached = _tl_generate(m, prompt, False)
    ours = interpkv.generate(m, prompt, max_new_tokens=STEPS, keep_logits=True)
    ref_tokens, ref_logits = uncached_loop(m, tokens, mask, STEPS)

    assert torch.equal(ours.new_tokens, ref_tokens[:, 10:])
    assert (ours.logits - ref_logits).abs().max() < TOL[F64]
    assert (torch.stack(tl_uncached.logits, 1) - ref_logits).abs().max() < TOL[F64]
    tl_logits = torch.stack(tl_cached.logits, 1)
    assert (tl_logits[:, 0] - ref_logits[:, 0]).abs().max() < TOL[F64]  # the prompt step is right
    if (tl_logits[:, 1] - ref_logits[:, 1]).abs().max() < TOL[F64]:  # an installed TL without the bug
        assert (tl_logits - ref_logits).abs().max() < TOL[F64]
        return

    # Step 1 feeds the token at position n = 10 with W_pos[20].
    n = tokens.shape[1]

    def doubled(pos_embed, hook):
        pos_embed[:, -1] = m.W_pos[2 * n]
        return pos_embed

    first = ref_tokens[:, : n + 1]
    wrong = interpkv.forward(m, first, fwd_hooks=[("hook_pos_embed", doubled)])[:, -1]
    assert (tl_logits[:, 1] - wrong).abs().max() < TOL[F64]
