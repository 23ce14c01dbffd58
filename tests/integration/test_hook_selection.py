"""One meaning for hook selection: names=, names_filter=, generate(capture=), patching hooks.

A string is an exact hook name, else a short name as Record[...] reads it
("resid_post" = every layer), else a part of hook names; a list is the union;
a callable is used as is. Matching nothing is an error naming the closest hooks.
"""

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.diagnostics.selection import select_hooks
from interpkv.patching import patch


@pytest.fixture(scope="module")
def gpt2():
    return zoo.load("gpt2")


TOKENS = torch.arange(2, 8)[None]
RESID_POST = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _hooks(record):
    return list(record.activations)


SELECTIONS = [
    # id, selection, hooks selected (gpt2: 2 layers)
    ("exact", "blocks.0.hook_resid_pre", ["blocks.0.hook_resid_pre"]),
    ("short at every layer", "resid_post", RESID_POST),
    ("short alias as Record reads it", "attn", ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]),
    ("short one letter is not a substring", "z", ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]),
    ("short with a layer", "k1", ["blocks.1.attn.hook_k"]),
    ("short outside the blocks", "embed", ["hook_embed"]),
    ("part of names", "blocks.1.ln2", ["blocks.1.ln2.hook_scale", "blocks.1.ln2.hook_normalized"]),
    ("list mixes forms", ["embed", "resid_post"], ["hook_embed", *RESID_POST]),
    ("Record key tuple", ("resid_post", -1), ["blocks.1.hook_resid_post"]),
    ("list of Record keys", [("pattern", 0), ("scale", 1, "ln2")], ["blocks.0.attn.hook_pattern", "blocks.1.ln2.hook_scale"]),
    ("callable", lambda n: n.endswith("mlp_out"), ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]),
]


@pytest.mark.parametrize("selection,expected", [c[1:] for c in SELECTIONS], ids=[c[0] for c in SELECTIONS])
def test_capture_compare_and_generate_select_the_same_hooks(gpt2, selection, expected):
    by_names = interpkv.capture(gpt2, TOKENS, names=selection)
    by_filter = interpkv.capture(gpt2, TOKENS, names_filter=selection)
    assert _hooks(by_names) == _hooks(by_filter) == expected
    report = interpkv.compare(gpt2, TOKENS, steps=[4, 2], names=selection)
    assert report.hooks[:-1] == expected  # logits last
    out = interpkv.generate(gpt2, TOKENS, max_new_tokens=2, capture=selection)
    assert _hooks(out.record) == expected
    # Record reads the short names it was captured with: same tensor either way.
    if selection == "resid_post":
        assert by_names["resid_post", 1] is by_names["blocks.1.hook_resid_post"]


NO_MATCH = [
    ("typo", "resid_pots", "hook_resid_post"),
    ("layer out of range", "blocks.9.hook_resid_pre", "blocks.0.hook_resid_pre"),
    ("list entry", ["hook_embed", "pattern_x"], "hook_pattern"),
]


@pytest.mark.parametrize("selection,closest", [c[1:] for c in NO_MATCH], ids=[c[0] for c in NO_MATCH])
def test_a_selection_matching_nothing_is_an_error_naming_the_closest_hooks(gpt2, selection, closest):
    calls = {
        "names": lambda: interpkv.capture(gpt2, TOKENS, names=selection),
        "names_filter": lambda: interpkv.capture(gpt2, TOKENS, names_filter=selection),
        "compare": lambda: interpkv.compare(gpt2, TOKENS, steps=[4, 2], names=selection),
        "capture": lambda: interpkv.generate(gpt2, TOKENS, max_new_tokens=2, capture=selection),
    }
    for kw, call in calls.items():
        with pytest.raises(ValueError, match="matches no hook point") as err:
            call()
        message = str(err.value)
        assert closest in message.split("closest:")[1], (kw, message)
        assert ("names_filter=" if kw == "names_filter" else "") in message


def test_a_callable_matching_nothing_and_an_empty_list_are_errors(gpt2):
    with pytest.raises(ValueError, match="True for no hook point"):
        interpkv.capture(gpt2, TOKENS, names=lambda n: n.endswith("hook_nothing"))
    with pytest.raises(ValueError, match=r"names=\[\] selects no hook point.*'logits'"):
        interpkv.compare(gpt2, TOKENS, steps=[3, 3], names=[])
    logits_only = interpkv.compare(gpt2, TOKENS, steps=[3, 3], names=["logits"])
    assert logits_only.hooks == ["logits"] and logits_only.ok()


def test_hf_models_select_among_their_recorded_sites():
    _, hf = zoo.load_pair("llama")
    report = interpkv.compare(hf, TOKENS, steps=[4, 2], names="resid_post")
    assert report.hooks[:-1] == [f"blocks.{L}.hook_resid_post" for L in range(hf.config.num_hidden_layers)]
    with pytest.raises(ValueError, match="closest: .*hook_attn_out"):
        interpkv.compare(hf, TOKENS, steps=[4, 2], names="attn_oot")


def test_select_hooks_keeps_forward_order_and_refuses_non_strings(gpt2):
    assert select_hooks(gpt2, ["resid_post", "embed"]) == ["hook_embed", *RESID_POST]
    with pytest.raises(TypeError, match="got 3 \\(int\\)"):
        select_hooks(gpt2, ["embed", 3])


def _metric(logits):
    return logits[:, -1, 1] - logits[:, -1, 2]


@pytest.mark.unchecked_shapes  # malformed arguments: interpkv's own error is the point
def test_patching_short_names_as_record_reads_them_and_no_silent_layer(gpt2):
    clean, corrupt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 3, 5]])
    by_alias = patch(gpt2, clean, corrupt, hook="attn", metric=_metric, progress=False)
    by_short = patch(gpt2, clean, corrupt, hook="pattern", metric=_metric, progress=False)
    assert torch.equal(by_alias, by_short)
    with pytest.raises(ValueError, match="hook='blocks.99.hook_resid_pre' matches no hook point.*closest"):
        patch(gpt2, clean, corrupt, hook="blocks.99.hook_resid_pre", metric=_metric, progress=False)
    with pytest.raises(TypeError, match=r"positions holds 1.5 \(float\)"):
        patch(gpt2, clean, corrupt, hook="resid_pre", metric=_metric, positions=[1.5], progress=False)
