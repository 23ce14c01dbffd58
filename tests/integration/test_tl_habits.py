"""TransformerLens habits: names_filter, return_type / loss, generate's keywords, right padding.

float64 throughout: interpkv and TransformerLens differ only by summation
order (~1e-14), so 1e-10 catches any real difference.
"""

import pytest
import torch

import interpkv
from interpkv import zoo

F64 = torch.float64
TOL = 1e-10


@pytest.fixture(scope="module")
def gpt2():
    return zoo.load("gpt2", dtype=F64)


@pytest.fixture(scope="module")
def trained():
    return zoo.load("llama", trained=True, dtype=F64)


def _ids(m, batch=2, n=9, seed=0):
    return torch.randint(0, m.cfg.d_vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------- names_filter
def test_names_filter_string_is_an_exact_name_as_in_run_with_cache(gpt2):
    tokens = _ids(gpt2)
    exact = interpkv.capture(gpt2, tokens, names_filter="blocks.0.hook_resid_pre")
    _, ref = gpt2.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    assert list(exact.activations) == list(ref.keys()) == ["blocks.0.hook_resid_pre"]
    substring = interpkv.capture(gpt2, tokens, names="hook_resid_pre")  # names= keeps its substring meaning
    assert len(substring.activations) == gpt2.cfg.n_layers
    by_list = interpkv.capture(gpt2, tokens, names_filter=["hook_embed", "blocks.1.hook_mlp_out"])
    assert list(by_list.activations) == ["hook_embed", "blocks.1.hook_mlp_out"]
    by_call = interpkv.capture(gpt2, tokens, names_filter=lambda n: n.endswith("ln_final.hook_normalized"))
    assert list(by_call.activations) == ["ln_final.hook_normalized"]


@pytest.mark.parametrize("call", ["capture", "compare", "generate"])
def test_names_and_names_filter_together_are_refused(gpt2, call):
    tokens = _ids(gpt2)
    with pytest.raises(ValueError, match="names_filter"):
        if call == "capture":
            interpkv.capture(gpt2, tokens, names="resid", names_filter="hook_embed")
        elif call == "compare":
            interpkv.compare(gpt2, tokens, steps=[5, 4], names="resid", names_filter="hook_embed")
        else:
            interpkv.generate(gpt2, tokens, max_new_tokens=2, capture="resid", names_filter="hook_embed")


def test_compare_and_generate_take_names_filter(gpt2):
    tokens = _ids(gpt2)
    report = interpkv.compare(gpt2, tokens, steps=[5, 4], names_filter="blocks.1.hook_resid_post")
    assert report.hooks == ["blocks.1.hook_resid_post", "logits"]
    out = interpkv.generate(gpt2, tokens, max_new_tokens=2, names_filter=["blocks.0.hook_resid_pre"])
    assert list(out.record.activations) == ["blocks.0.hook_resid_pre"]


# ---------------------------------------------------------------- return_type
def test_return_types_match_transformer_lens(gpt2):
    tokens = _ids(gpt2)
    logits = interpkv.forward(gpt2, tokens)
    assert (interpkv.forward(gpt2, tokens, return_type="logits") - gpt2(tokens)).abs().max() < TOL
    loss = interpkv.forward(gpt2, tokens, return_type="loss")
    assert loss.ndim == 0 and abs(float((loss - gpt2(tokens, return_type="loss")).detach())) < TOL
    per_token = interpkv.forward(gpt2, tokens, return_type="loss", loss_per_token=True)
    want = gpt2(tokens, return_type="loss", loss_per_token=True)
    assert per_token.shape == (2, 8) and (per_token - want).abs().max() < TOL
    both = interpkv.forward(gpt2, tokens, return_type="both")
    assert (both.logits - logits).abs().max() < TOL and abs(float((both.loss - loss).detach())) < TOL
    seen = []
    hook = [("blocks.0.hook_resid_pre", lambda x, hook: seen.append(x.shape))]
    assert interpkv.forward(gpt2, tokens, return_type=None, fwd_hooks=hook) is None
    assert seen == [(2, 9, gpt2.cfg.d_model)]  # the forward still ran


def test_loss_with_padding_matches_transformer_lens_attention_mask(gpt2):
    tokens = _ids(gpt2)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding: padding pairs are not counted
    ours = interpkv.forward(gpt2, tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
    alone = gpt2(tokens[1:, 4:], return_type="loss", loss_per_token=True)
    assert (ours[1, 4:] - alone[0]).abs().max() < TOL and (ours[1, :4] == 0).all()
    mean = interpkv.forward(gpt2, tokens, attention_mask=mask, return_type="loss")
    assert abs(float((mean - ours.sum() / (8 + 4)).detach())) < TOL


def test_loss_through_a_cache_is_the_new_tokens_after_the_first(gpt2):
    tokens = _ids(gpt2, batch=1, n=12)
    cache = interpkv.KVCache.for_model(gpt2)
    interpkv.forward(gpt2, tokens[:, :7], cache=cache)
    cached = interpkv.forward(gpt2, tokens[:, 7:], cache=cache, return_type="loss", loss_per_token=True)
    full = gpt2(tokens, return_type="loss", loss_per_token=True)  # [1, 11]: token t+1 from token t
    assert cached.shape == (1, 4) and (cached - full[:, 7:]).abs().max() < TOL


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(return_type="logit"), "return_type must be"),
        (dict(loss_per_token=True), "loss_per_token"),
        (dict(return_type="loss", logits="last"), "logits=\"last\""),
    ],
    ids=["unknown", "per-token-without-loss", "loss-with-last"],
)
def test_return_type_misuse_is_refused(gpt2, kwargs, match):
    with pytest.raises(ValueError, match=match):
        interpkv.forward(gpt2, _ids(gpt2), **kwargs)


def test_loss_of_one_token_or_embeddings_is_refused(gpt2):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        interpkv.forward(gpt2, torch.tensor([[3]]), return_type="loss")
    with pytest.raises(ValueError, match="embeddings"):
        interpkv.forward(gpt2, gpt2.embed(_ids(gpt2)), return_type="loss")


# ----------------------------------------------------------- generate keywords
def test_do_sample(gpt2):
    tokens = _ids(gpt2)
    greedy = interpkv.generate(gpt2, tokens, max_new_tokens=5)
    assert torch.equal(interpkv.generate(gpt2, tokens, max_new_tokens=5, do_sample=False).tokens, greedy.tokens)
    sampled = interpkv.generate(gpt2, tokens, max_new_tokens=5, do_sample=True, seed=4)
    at_one = interpkv.generate(gpt2, tokens, max_new_tokens=5, temperature=1.0, seed=4)
    assert torch.equal(sampled.tokens, at_one.tokens) and not torch.equal(sampled.tokens, greedy.tokens)
    hot = interpkv.generate(gpt2, tokens, max_new_tokens=5, do_sample=True, temperature=2.0, seed=4)
    assert torch.equal(hot.tokens, interpkv.generate(gpt2, tokens, max_new_tokens=5, temperature=2.0, seed=4).tokens)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(do_sample=False, temperature=0.7), "do_sample=False is greedy"),
        (dict(do_sample=False, top_k=3), "do_sample=False is greedy"),
        (dict(do_sample=True, temperature=0.0), "temperature=0 is greedy"),
        (dict(stop_at_eos=False, eos_token_id=3), "would be ignored"),
        (dict(stop_at_eos=True), "eos_token_id"),
    ],
    ids=["greedy-with-temperature", "greedy-with-top-k", "sample-at-zero", "eos-ignored", "no-eos"],
)
def test_generate_keywords_that_would_be_ignored_are_refused(gpt2, kwargs, match):
    with pytest.raises(ValueError, match=match):
        interpkv.generate(gpt2, _ids(gpt2), max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("name,fix", [("freq_penalty", "temperature="), ("return_type", ".text"),
                                      ("prepend_bos", "to_tokens"), ("padding_side", "attention_mask")])
def test_transformer_lens_keywords_without_a_meaning_here_name_the_interpkv_form(gpt2, name, fix):
    with pytest.raises(TypeError, match=fix):
        interpkv.generate(gpt2, _ids(gpt2), max_new_tokens=2, **{name: 1})
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        interpkv.generate(gpt2, _ids(gpt2), max_new_tokens=2, colour=1)


def test_stop_at_eos_and_eos_token_id_map_to_stop_tokens(gpt2, trained):
    tokens = _ids(gpt2)
    free = interpkv.generate(gpt2, tokens, max_new_tokens=6)
    eos = int(free.new_tokens[0, 1])
    by_id = interpkv.generate(gpt2, tokens, max_new_tokens=6, eos_token_id=eos)
    by_stops = interpkv.generate(gpt2, tokens, max_new_tokens=6, stop_tokens=[eos])
    assert torch.equal(by_id.tokens, by_stops.tokens) and bool(by_id.finished[0])
    listed = interpkv.generate(gpt2, tokens, max_new_tokens=6, stop_at_eos=True, eos_token_id=[eos])
    assert torch.equal(listed.tokens, by_stops.tokens)
    eos_id = trained.tokenizer.eos_token_id  # stop_at_eos=True alone: the tokenizer's EOS
    assert torch.equal(
        interpkv.generate(trained, "x = ", max_new_tokens=8, stop_at_eos=True).tokens,
        interpkv.generate(trained, "x = ", max_new_tokens=8, stop_tokens=[eos_id]).tokens,
    )


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_use_past_kv_cache_false_reruns_the_sequence_and_gives_the_same_tokens(name):
    m = zoo.load(name, dtype=F64)
    tokens = _ids(m, batch=3)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    hooks = [("blocks.0.hook_resid_post", lambda x, hook: x + 1.0)]
    seen = []
    counting = hooks + [("blocks.1.hook_resid_pre", lambda x, hook: seen.append(x.shape[1]))]
    kw = dict(attention_mask=mask, max_new_tokens=5, keep_logits=True, stop_tokens=[7])
    cached = interpkv.generate(m, tokens, fwd_hooks=hooks, **kw)
    uncached = interpkv.generate(m, tokens, fwd_hooks=counting, use_past_kv_cache=False, **kw)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert (cached.logits - uncached.logits).abs().max() < TOL
    assert seen == list(range(9, 9 + len(seen)))  # the whole sequence, one longer each step


def test_use_past_kv_cache_false_refuses_what_it_cannot_mean(gpt2):
    with pytest.raises(ValueError, match="drop cache="):
        interpkv.generate(gpt2, _ids(gpt2), max_new_tokens=2, use_past_kv_cache=False,
                          cache=interpkv.KVCache.for_model(gpt2, 2))
    with pytest.raises(ValueError, match="interpkv.capture"):
        interpkv.generate(gpt2, _ids(gpt2), max_new_tokens=2, use_past_kv_cache=False, capture="resid")


def test_verbose_shows_a_progress_bar(gpt2, capsys):
    interpkv.generate(gpt2, _ids(gpt2), max_new_tokens=3, verbose=True)
    assert "generate" in capsys.readouterr().err
    interpkv.generate(gpt2, _ids(gpt2), max_new_tokens=3)
    assert capsys.readouterr().err == ""


# -------------------------------------------------------------- right padding
def test_right_padded_ids_without_a_mask_are_refused(trained):
    tokens = trained.to_tokens(["def add", "x"], padding_side="right")  # TransformerLens's default side
    with pytest.raises(ValueError, match=r"rows \[1\] end with the pad id.*padding_side='left'.*attention_mask"):
        interpkv.generate(trained, tokens, max_new_tokens=3)


def test_right_padded_ids_with_their_mask_generate_each_row_as_alone(trained):
    texts = ["def add", "x"]
    tokens = trained.to_tokens(texts, padding_side="right")
    mask = torch.zeros_like(tokens)
    for row, text in enumerate(texts):
        mask[row, : trained.to_tokens(text).shape[1]] = 1
    out = interpkv.generate(trained, tokens, attention_mask=mask, max_new_tokens=6)
    for row, text in enumerate(texts):
        assert out.text[row] == interpkv.generate(trained, text, max_new_tokens=6).text
