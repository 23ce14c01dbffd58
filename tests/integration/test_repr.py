"""Notebook display: every result object shows a short summary, never a tensor dump."""

import re

import pytest
import torch

import interpkv
from interpkv import faults, zoo
from interpkv.generation.result import GenerationDiff

TENSOR_DUMP = re.compile(r"tensor\(|\[\[|\.\.\.,")  # what printing a tensor looks like


@pytest.fixture(scope="module")
def model():
    return zoo.load("llama", dtype=torch.float64)


@pytest.fixture(scope="module")
def tokens(model):
    return torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def assert_summary(obj, *numbers):
    text, page = repr(obj), obj._repr_html_()
    assert len(text) < 300 and "\n" not in text, text
    assert "<table" in page and "</table>" in page and len(page) < 20_000
    for found in (text, page):
        assert not TENSOR_DUMP.search(found), found
    for number in numbers:
        assert str(number) in page, (number, page)
    return text, page


def test_kvcache(model, tokens):
    cache = interpkv.KVCache.for_model(model, batch_size=2, window=8, sinks=1)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    with torch.no_grad():
        interpkv.forward(model, tokens, cache=cache, attention_mask=mask)
    text, page = assert_summary(cache, cache.seq_len, f"{cache.nbytes:,}", "[12, 9]", "8 (sinks 1)")
    assert f"seq_len={cache.seq_len}" in text and f"nbytes={cache.nbytes}" in text


def test_record(model, tokens):
    record = interpkv.capture(model, tokens, names="hook_resid")
    shape = f"[2, 12, {model.cfg.d_model}]"
    text, page = assert_summary(record, "hook_resid_pre", shape, "[12, 12]", f"[2, 12, {model.cfg.d_vocab}]")
    assert text == f"Record({len(record.activations)} hooks + logits, batch=2, positions=12, layout='tokens')"
    families = {name.split(".", 2)[-1] for name in record.activations}
    assert page.count("<tr>") == 5 + 1 + len(families) + 1  # fields, header, families, logits


def test_divergence_report_names_the_first_divergence(model, tokens):
    with faults.inject(model, "stale_position_offset"):
        report = interpkv.compare(model, tokens[:1], steps=[8, 1, 3])
    site = report.first_divergence()
    text, page = assert_summary(report, site.hook, f"at pos {site.pos}", f"{report.logits_max_abs:.3g}")
    assert "attn.hook_rot_q" in text
    rows = {r[0]: r for r in report.family_summary()}
    family, hooks, max_abs, bad, first = rows["attn.hook_rot_q"]
    assert hooks == model.cfg.n_layers and first == site.pos and bad > 0
    assert rows["hook_embed"][3] == 0 and rows["hook_embed"][4] is None


def test_generation(model, tokens):
    prompt = tokens[:, :5]
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    out = interpkv.generate(model, prompt, attention_mask=mask, max_new_tokens=6, keep_logits=True)
    text, page = assert_summary(out, out.new_tokens[1, 0].item())
    assert text == "Generation(batch=2, prompt_length=5, new_tokens=6, finished=0/2, logits kept)"
    cells = re.findall(r"<t[dh][^>]*>([^<]*)</t[dh]>", page)
    row0 = cells[cells.index("new token ids") + 1 :][:4]
    assert row0 == ["0", "3", "6", "no"]  # row 0: 3 real prompt tokens, 6 new, not finished


def test_generation_diff_table_and_frame():
    diff = GenerationDiff([0.0, 1e-9, 0.5], [0.0, 0.0, 0.25], [True, True, False], 2, atol=1e-4)
    text, page = assert_summary(diff, "0.5", "0.25", "2/3")
    assert text.startswith("GenerationDiff(3 steps, first_divergent_step=2, max logits_max_abs=0.5")
    frame = diff.to_frame()
    assert list(frame.columns) == ["step", "logits_max_abs", "kl", "top1_agree", "top1_tied", "divergent"]
    assert frame.step.tolist() == [0, 1, 2] and frame.divergent.tolist() == [False, False, True]
    assert frame.logits_max_abs.tolist() == diff.logits_max_abs


def test_long_generation_diff_shows_twenty_steps_and_the_divergent_one():
    n = 60
    diff = GenerationDiff([0.0] * 50 + [1.0] * 10, [0.0] * n, [True] * n, 50)
    page = diff._repr_html_()
    assert page.count("<tr>") == 6 + 1 + 20 + 1  # fields, header, 20 steps, step 50
    assert "first 20 of 60 steps" in page and "<td" in page and ">50<" in page
