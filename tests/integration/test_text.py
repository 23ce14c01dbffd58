"""Text in, text out: the trained models' HF tokenizer, string prompts, ``Generation.text``,
continuing from a cache without a held-back token, ``zoo.load_pair(trained=True)`` and
``zoo.load_hf_dir``."""

import functools

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.generation import resume
from interpkv.generation.resume import held_tokens
from interpkv.zoo import charvocab

F64 = torch.float64
TOL = 1e-10  # float64: summation-order noise only


@functools.cache
def trained(name: str = "llama", dtype=F64):
    return zoo.load(name, trained=True, dtype=dtype)


def ids_and_mask(m, texts):
    """What the text path must produce: TL's left-padded ids and a mask from each text's length."""
    ids = m.to_tokens(texts, padding_side="left")
    lengths = torch.tensor([len(t) for t in texts])  # one token per character
    mask = (torch.arange(ids.shape[1]) >= ids.shape[1] - lengths[:, None]).long()
    return ids, mask


# ---------------------------------------------------------------- tokenizer
TEXTS = ["def f(x):\n    return x", "a , b . c", "  two  spaces", "tab\tand café", "~{}|\n\n"]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_hf_tokenizer_has_the_charvocab_ids(text):
    tok = charvocab.hf_tokenizer()
    assert tok(text)["input_ids"] == charvocab.encode(text).tolist()
    assert tok.decode(tok(text)["input_ids"]) == charvocab.decode(charvocab.encode(text))
    assert len(tok) == charvocab.VOCAB_SIZE


@pytest.mark.parametrize("name", zoo.trained_names())
def test_trained_models_carry_a_tokenizer_transformer_lens_can_use(name):
    m = trained(name)
    assert m.cfg.default_prepend_bos is False and m.cfg.tokenizer_prepends_bos is False
    assert m.tokenizer.pad_token_id == charvocab.UNK and m.tokenizer.eos_token_id == charvocab.UNK
    assert m.to_tokens("def ").tolist() == [charvocab.encode("def ").tolist()]  # no BOS
    assert m.to_string(m.to_tokens("a\nb")) == ["a\nb"]
    ids = m.to_tokens(["ab", "abcd"], padding_side="left")
    assert ids[0, :2].tolist() == [charvocab.UNK] * 2
    # TL's own generate runs (greedy, uncached) and agrees with interpkv's cached generate
    tl_text = m.generate("Return the ", max_new_tokens=12, do_sample=False, verbose=False, use_past_kv_cache=False)
    assert interpkv.generate(m, "Return the ", max_new_tokens=12).text == tl_text
    assert zoo.load(name).tokenizer is None  # random models stay tokenizer-free


def test_text_without_a_tokenizer_is_refused_with_the_fix():
    m = zoo.load("llama")
    for call in (interpkv.generate, interpkv.capture):
        with pytest.raises(TypeError, match="no tokenizer.*trained=True"):
            call(m, "def ", **({"max_new_tokens": 1} if call is interpkv.generate else {}))
    with pytest.raises(ValueError, match="no tokenizer"):
        _ = interpkv.generate(m, torch.tensor([1, 2]), max_new_tokens=1).text


# ------------------------------------------------------------ string inputs
def test_string_inputs_equal_left_padded_ids_everywhere():
    m = trained()
    texts = ["def add(a, b):", "Return the"]
    ids, mask = ids_and_mask(m, texts)
    a = interpkv.capture(m, texts, steps=[10, 1, 3])
    b = interpkv.capture(m, ids, attention_mask=mask, steps=[10, 1, 3])
    assert torch.equal(a.valid, b.valid) and a.valid.sum(1).tolist() == [14, 10]
    assert torch.equal(a.logits.nan_to_num(), b.logits.nan_to_num())
    assert interpkv.compare(m, texts, steps=[10, 4]).ok(atol=TOL, rtol=TOL)
    gen_a = interpkv.generate(m, texts, max_new_tokens=6)
    gen_b = interpkv.generate(m, ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(gen_a.tokens, gen_b.tokens) and torch.equal(gen_a.attention_mask, gen_b.attention_mask)
    diff = interpkv.compare_generation(m, texts, max_new_tokens=6)
    assert diff.ok and torch.equal(diff.tokens_a, gen_b.new_tokens)


def test_generation_text_follows_the_prompt_and_drops_padding():
    m = trained()
    one = interpkv.generate(m, "def ", max_new_tokens=5)
    assert isinstance(one.text, str) and one.text.startswith("def ") and len(one.text) == 9
    assert one.new_text == one.text[4:]
    listed = interpkv.generate(m, ["def "], max_new_tokens=5)
    assert listed.text == [one.text]  # a list of one stays a list
    ids = interpkv.generate(m, charvocab.encode("def "), max_new_tokens=5)  # [pos] ids: a str
    assert ids.text == one.text
    batch = interpkv.generate(m, ["def ", "Return the value"], max_new_tokens=5)
    assert [t[: len(p)] for t, p in zip(batch.text, ["def ", "Return the value"])] == ["def ", "Return the value"]
    assert [len(t) for t in batch.text] == [9, 21]  # left padding is not decoded
    # after a stop token: kept, the pad written after it is not decoded
    stop = int(one.new_tokens[0, 0])
    stopped = interpkv.generate(m, ["def ", "Return the value"], max_new_tokens=5, stop_tokens=[stop])
    assert stopped.text[0] == one.text[:5] and len(stopped.text[1]) == 21


# ------------------------------------------------------ continuing a cache
@pytest.mark.parametrize("window", [None, 6], ids=["full", "window6"])
def test_continuing_from_a_cache_equals_one_call(window):
    """``generate(prompt + continuation)`` == the prompt's cache continued with no tokens."""
    m = trained()
    prompt = ["def add(a, b):", "Return the"]
    cache = interpkv.KVCache.for_model(m, 2, window=window)
    first = interpkv.generate(m, prompt, cache=cache, max_new_tokens=5)
    assert held_tokens(cache)[0].tolist() == first.tokens[:, -1].tolist()
    more = interpkv.generate(m, cache=cache, max_new_tokens=7)
    assert more.prompt_length == 1 and torch.equal(more.tokens[:, 0], first.tokens[:, -1])
    one_call = interpkv.generate(m, prompt, max_new_tokens=12, cache=interpkv.KVCache.for_model(m, 2, window=window))
    assert torch.equal(torch.cat([first.tokens, more.new_tokens], 1), one_call.tokens)
    # the same from the text: prompt + continuation, fed as one prompt
    both = [p + c for p, c in zip(prompt, first.new_text)]
    continued = interpkv.generate(m, both, max_new_tokens=7, cache=interpkv.KVCache.for_model(m, 2, window=window))
    assert continued.new_text == more.new_text


def test_prefill_with_zero_new_tokens_makes_a_prompt_cache():
    m = trained()
    cache = interpkv.KVCache.for_model(m)
    pre = interpkv.generate(m, "Return the ", cache=cache, max_new_tokens=0)
    assert pre.text == "Return the " and cache.seq_len == len("Return the ") - 1
    branches = cache.repeat(3)  # carries the held-back token to every copy
    sampled = interpkv.generate(m, cache=branches, max_new_tokens=8, temperature=1.0, seed=0)
    alone = interpkv.generate(m, ["Return the "] * 3, max_new_tokens=8, temperature=1.0, seed=0)
    assert torch.equal(sampled.new_tokens, alone.new_tokens)
    greedy = interpkv.generate(m, cache=cache, max_new_tokens=8)
    assert greedy.text == " " + interpkv.generate(m, "Return the ", max_new_tokens=8).new_text


def test_stopped_rows_stay_stopped_when_continued():
    m = trained()
    prompt = ["def add(a, b):", "Return the"]
    whole = interpkv.generate(m, prompt, max_new_tokens=10)
    stop = int(whole.new_tokens[0, 2])  # row 0 emits it at step 2
    ref = interpkv.generate(m, prompt, max_new_tokens=10, stop_tokens=[stop])
    for split in (2, 3, 5):  # stop emitted exactly at the split, just before, earlier
        cache = interpkv.KVCache.for_model(m, 2)
        a = interpkv.generate(m, prompt, cache=cache, max_new_tokens=split, stop_tokens=[stop])
        b = interpkv.generate(m, cache=cache, max_new_tokens=10 - split, stop_tokens=[stop])
        assert torch.equal(torch.cat([a.tokens, b.new_tokens], 1), ref.tokens), split
        assert torch.equal(b.finished, ref.finished)


def test_a_cache_without_a_held_back_token_is_refused_with_the_fix():
    m = trained()
    cache = interpkv.KVCache.for_model(m)
    interpkv.forward(m, m.to_tokens("def "), cache=cache)
    with pytest.raises(ValueError, match="no held-back token.*max_new_tokens=0"):
        interpkv.generate(m, cache=cache, max_new_tokens=3)
    interpkv.generate(m, "def ", cache=(cache := interpkv.KVCache.for_model(m)), max_new_tokens=2)
    with pytest.raises(ValueError, match="holds back the last token generate chose"):
        interpkv.forward(m, m.to_tokens("x"), cache=cache)  # the multi-turn rule (core/heldback.py)
    held = resume.snapshot(cache)
    resume.release(cache)
    interpkv.forward(m, m.to_tokens("x"), cache=cache)  # the cache moves past the held-back token
    resume.restore(cache, held)
    with pytest.raises(ValueError, match=r"rows \[0\] of this cache moved on"):
        interpkv.generate(m, cache=cache, max_new_tokens=3)
    cache.crop(cache.seq_len - 1)  # back where generate left it: valid again
    assert interpkv.generate(m, cache=cache, max_new_tokens=1).tokens.shape == (1, 2)
    with pytest.raises(ValueError, match="neither"):
        interpkv.generate(m, max_new_tokens=3)


# ------------------------------------------------------------- zoo helpers
def test_load_pair_trained_and_load_hf_dir(tmp_path):
    tl, hf = zoo.load_pair("gpt2", trained=True, dtype=F64)
    ids = tl.to_tokens("def f(x):")
    assert (tl(ids) - hf(ids).logits).abs().max() < TOL
    assert (tl(ids) - trained("gpt2")(ids)).abs().max() < TOL

    hf.save_pretrained(tmp_path / "bare")
    bare = zoo.load_hf_dir(tmp_path / "bare", dtype=F64)
    assert bare.tokenizer is None and (bare(ids) - hf(ids).logits).abs().max() < TOL

    hf.save_pretrained(tmp_path / "full")
    charvocab.hf_tokenizer().save_pretrained(tmp_path / "full")
    model, again = zoo.load_hf_dir(str(tmp_path / "full"), dtype=F64, return_hf=True)
    assert model.cfg.default_prepend_bos is False  # the HF tokenizer prepends nothing
    assert torch.equal(model.to_tokens("def f(x):"), ids)
    assert interpkv.generate(model, "def ", max_new_tokens=8).text == interpkv.generate(tl, "def ", max_new_tokens=8).text
    assert (again(ids).logits - hf(ids).logits).abs().max() < TOL
    with pytest.raises(ValueError, match="no config.json"):
        zoo.load_hf_dir(tmp_path)
    with pytest.raises(ValueError, match="no trained weights"):
        zoo.load_pair("opt", trained=True)


def test_a_saved_prompt_cache_continues_after_load_with_no_tokens(tmp_path):
    """Save carries the held-back token, so a loaded cache continues with no tokens."""
    m = trained()
    cache = interpkv.KVCache.for_model(m)
    interpkv.generate(m, "Return the ", cache=cache, max_new_tokens=0)
    path = tmp_path / "prompt.safetensors"
    cache.save(path, metadata={"prompt": "Return the "})
    loaded = interpkv.KVCache.load(path, m)
    assert loaded.metadata == {"prompt": "Return the "}
    assert torch.equal(held_tokens(loaded)[0], held_tokens(cache)[0])
    resumed = interpkv.generate(m, cache=loaded, max_new_tokens=8)
    assert resumed.text == " " + interpkv.generate(m, "Return the ", max_new_tokens=8).new_text
