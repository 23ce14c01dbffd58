"""interpkv.hook_positions, position-based steering hooks, and `.cause` for hooks that depend on the cache."""

import pytest
import torch

import interpkv
from interpkv import steering

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(autouse=True)
def _decode_under_no_grad():
    with torch.no_grad():
        yield


def recorder(seen, name=HOOK):
    def hook(act, hook):
        seen.append(interpkv.hook_positions(hook, act).clone())

    return [(name, hook)]


@pytest.fixture(scope="module")
def gpt2():
    return interpkv.zoo.load("gpt2", dtype=torch.float64)


def test_uncached_left_padded_positions(gpt2):
    seen = []
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    interpkv.forward(gpt2, torch.ones(2, 4, dtype=torch.long), attention_mask=mask, fwd_hooks=recorder(seen))
    assert seen[0].tolist() == [[-1, -1, 0, 1], [0, 1, 2, 3]]


def test_cached_steps_see_their_absolute_positions(gpt2):
    seen = []
    cache = interpkv.KVCache.for_model(gpt2, 2)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    interpkv.forward(gpt2, torch.ones(2, 3, dtype=torch.long), cache=cache, attention_mask=mask, fwd_hooks=recorder(seen))
    interpkv.forward(gpt2, torch.ones(2, 1, dtype=torch.long), cache=cache, fwd_hooks=recorder(seen))
    interpkv.forward(gpt2, torch.ones(2, 2, dtype=torch.long), cache=cache, fwd_hooks=recorder(seen))
    assert [s.tolist() for s in seen] == [[[-1, 0, 1], [0, 1, 2]], [[2], [3]], [[3, 4], [4, 5]]]


def test_a_windowed_cache_keeps_counting_absolute_positions():
    model = interpkv.zoo.load("llama", dtype=torch.float64)
    cache = interpkv.KVCache.for_model(model, window=4, sinks=1)
    seen = []
    for start in range(0, 12, 3):
        interpkv.forward(model, torch.arange(start, start + 3)[None], cache=cache, fwd_hooks=recorder(seen))
    assert torch.cat(seen, 1).tolist() == [list(range(12))]


def test_every_hook_of_one_forward_gets_the_same_tensor(gpt2):
    got = []

    def hook(act, hook):
        got.append(interpkv.hook_positions(hook))

    interpkv.forward(gpt2, torch.ones(1, 5, dtype=torch.long), fwd_hooks=[(lambda n: n.endswith("resid_post"), hook)])
    assert len(got) == gpt2.cfg.n_layers and all(g is got[0] for g in got)


def test_attention_hooks_get_query_positions(gpt2):
    seen = []
    cache = interpkv.KVCache.for_model(gpt2)
    interpkv.forward(gpt2, torch.ones(1, 4, dtype=torch.long), cache=cache)
    hooks = recorder(seen, "blocks.0.attn.hook_pattern")
    interpkv.forward(gpt2, torch.ones(1, 2, dtype=torch.long), cache=cache, fwd_hooks=hooks)
    assert seen[0].tolist() == [[4, 5]]


def test_generate_steps_and_patching(gpt2):
    seen = []
    interpkv.generate(gpt2, torch.tensor([[1, 2, 3]]), max_new_tokens=3, fwd_hooks=recorder(seen))
    assert [s.tolist() for s in seen] == [[[0, 1, 2]], [[3]], [[4]]]


def test_plain_transformer_lens_calls(gpt2):
    tokens = torch.tensor([[1, 2, 3, 4]])
    seen = []
    gpt2.run_with_hooks(tokens, fwd_hooks=recorder(seen))
    assert seen[0].tolist() == [[0, 1, 2, 3]]
    seen.clear()
    with gpt2.hooks(fwd_hooks=recorder(seen)):
        gpt2(tokens)
    assert seen[0].tolist() == [[0, 1, 2, 3]]


def test_transformer_lens_cached_generate_is_offset_by_its_cache():
    model = interpkv.zoo.load("llama", trained=True)
    seen = []
    tokens = model.to_tokens("the cat")
    with model.hooks(fwd_hooks=recorder(seen)):
        model.generate(tokens, max_new_tokens=3, use_past_kv_cache=True, verbose=False, do_sample=False)
    n = tokens.shape[1]
    assert [s.tolist() for s in seen] == [[list(range(n))], [[n]], [[n + 1]]]


def test_transformer_lens_left_padding_counts_real_tokens():
    model = interpkv.zoo.load("llama", trained=True)
    tokens = model.to_tokens(["a", "the cat"], padding_side="left")
    mask = (tokens != model.tokenizer.pad_token_id).long()
    mask[:, 0] = 1
    seen = []
    model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=recorder(seen))
    expected = (mask.cumsum(1) - 1).masked_fill(mask == 0, -1)
    assert seen[0].tolist() == expected.tolist() and (expected == -1).any()


def test_errors_outside_a_forward_and_without_act(gpt2):
    point = gpt2.blocks[0].hook_resid_post
    with pytest.raises(RuntimeError, match="inside a hook function"):
        interpkv.hook_positions(point)
    caught = []

    def hook(act, hook):
        try:
            interpkv.hook_positions(hook)
        except ValueError as exc:
            caught.append(str(exc))

    gpt2.run_with_hooks(torch.tensor([[1, 2]]), fwd_hooks=[(HOOK, hook)])
    assert caught and "hook_positions(hook, act)" in caught[0]


# ----------------------------------------------------------------- steering


def uncached_loop(model, prompt, n, hooks):
    """A researcher's uncached loop: rerun the whole sequence with the same hooks (TransformerLens)."""
    seq = prompt
    for _ in range(n):
        logits = model.run_with_hooks(seq, fwd_hooks=hooks)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def naive_last(direction):
    def steer_last(act, hook):
        act[:, -1] += direction  # the uncached shape: "the last position"
        return act

    return steer_last


STEERS = {
    "start": lambda v: steering.add(v, start=3),
    "positions": lambda v: steering.add(v, positions=[1, 4, 6]),
    "stop": lambda v: steering.add(v, stop=5),
    "replace": lambda v: steering.replace(v, positions=[2]),
}


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
@pytest.mark.parametrize("steer", list(STEERS))
def test_position_based_steering_equals_the_uncached_loop_float64(name, steer):
    model = interpkv.zoo.load(name, dtype=torch.float64)
    torch.manual_seed(1)
    v = 4 * torch.randn(model.cfg.d_model, dtype=torch.float64)
    hooks = [(HOOK, STEERS[steer](v))]
    prompt = torch.tensor([[3, 1, 4, 1]])
    cached = interpkv.generate(model, prompt, max_new_tokens=6, fwd_hooks=hooks).tokens
    assert torch.equal(cached, uncached_loop(model, prompt, 6, hooks))
    assert not torch.equal(cached, interpkv.generate(model, prompt, max_new_tokens=6).tokens) or steer == "stop"


@pytest.fixture(scope="module")
def trained():
    return interpkv.zoo.load("llama", trained=True)


def test_naive_last_position_hook_differs_and_is_named(trained):
    prompt = trained.to_tokens("return ")
    torch.manual_seed(0)
    v = 6 * torch.randn(trained.cfg.d_model)
    naive = [(HOOK, naive_last(v))]
    cached = interpkv.generate(trained, prompt, max_new_tokens=12, fwd_hooks=naive).tokens
    assert not torch.equal(cached, uncached_loop(trained, prompt, 12, naive))
    diff = interpkv.compare_generation(trained, prompt, max_new_tokens=12, fwd_hooks=naive)
    assert diff.cause is not None and HOOK in diff.cause and "steer_last" in diff.cause
    assert "hook_positions" in diff.cause and "cause:" in repr(diff) and "cause" in diff._repr_html_()
    head = prompt[:, :8] if prompt.shape[1] >= 8 else prompt
    report = interpkv.compare(trained, head, steps=[prompt.shape[1] - 1, 1], fwd_hooks=naive)
    assert report.cause is not None and "steer_last" in report.cause and "cause" in report._repr_html_()


def test_position_based_hooks_give_identical_tokens_on_the_trained_model(trained):
    prompt = trained.to_tokens("return ")
    torch.manual_seed(0)
    v = 6 * torch.randn(trained.cfg.d_model)
    hooks = [(HOOK, steering.add(v, start=prompt.shape[1] - 1))]
    cached = interpkv.generate(trained, prompt, max_new_tokens=12, fwd_hooks=hooks).tokens
    assert torch.equal(cached, uncached_loop(trained, prompt, 12, hooks))
    diff = interpkv.compare_generation(trained, prompt, max_new_tokens=12, fwd_hooks=hooks)
    assert diff.ok and diff.cause is None
    report = interpkv.compare(trained, prompt, steps=[prompt.shape[1] - 2, 1, 1], fwd_hooks=hooks)
    assert report.ok() and report.cause is None


def test_region_generated_and_prompt(trained):
    prompt = trained.to_tokens(["def f", "x = "], padding_side="left")
    mask = (prompt != trained.tokenizer.pad_token_id).long()
    torch.manual_seed(2)
    v = 6 * torch.randn(trained.cfg.d_model)
    for region in ("generated", "prompt"):
        hooks = [(HOOK, steering.add(v, region=region))]
        diff = interpkv.compare_generation(trained, prompt, attention_mask=mask, max_new_tokens=8, fwd_hooks=hooks)
        assert diff.ok and diff.cause is None, region
    seen = []

    def look(act, hook):
        seen.append(steering.positions_mask(hook, act, region="generated").clone())

    interpkv.generate(trained, prompt, attention_mask=mask, max_new_tokens=3, fwd_hooks=[(HOOK, look)])
    assert not seen[0].any() and seen[1].all() and seen[2].all()
    with pytest.raises(RuntimeError, match="region"):
        interpkv.forward(trained, prompt, attention_mask=mask, fwd_hooks=[(HOOK, steering.add(v, region="prompt"))])


def test_steering_value_shape_is_checked(gpt2):
    with pytest.raises(ValueError, match="trailing axes"):
        interpkv.forward(gpt2, torch.tensor([[1, 2]]), fwd_hooks=[(HOOK, steering.add(torch.ones(3)))])
