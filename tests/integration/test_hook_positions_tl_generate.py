"""hook_positions inside TransformerLens's own cached ``generate`` on a model without a tokenizer.

TransformerLens then runs ``forward(residual, start_at_layer=0,
past_kv_cache=...)`` with no attention mask, so the positions must come from
its cache's length (it reported 0 for every decoded token before).
"""

import pytest
import torch

import interpkv
from interpkv import steering

PROMPT = 16
NEW = 3


def _recording(model, seen):
    names = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_q", "blocks.0.hook_resid_post",
             f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post",
             "ln_final.hook_normalized"]

    def hook(act, hook):
        seen.setdefault(hook.name, []).append(interpkv.hook_positions(hook, act)[:, -1].tolist())

    return [(name, hook) for name in names]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_positions_in_transformer_lens_cached_generate_without_a_tokenizer(name):
    model = interpkv.zoo.load(name, dtype=torch.float64)
    assert model.tokenizer is None
    tokens = torch.arange(1, PROMPT + 1)[None]
    seen = {}
    with model.hooks(fwd_hooks=_recording(model, seen)):
        model.generate(tokens, max_new_tokens=NEW, use_past_kv_cache=True, verbose=False, do_sample=False, stop_at_eos=False)
    want = [[PROMPT - 1 + k] for k in range(NEW)]  # the last query of each forward
    assert seen and all(got == want for got in seen.values()), seen


def test_steering_through_transformer_lens_cached_generate_equals_uncached():
    model = interpkv.zoo.load("llama", dtype=torch.float64)
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 30
    tokens = torch.arange(1, PROMPT + 1)[None]
    hooks = [("blocks.0.hook_resid_post", steering.add(vector, start=PROMPT + 1))]  # the second new token on
    runs = []
    for cached in (True, False):
        with model.hooks(fwd_hooks=hooks):
            out = model.generate(
                tokens, max_new_tokens=4, use_past_kv_cache=cached, verbose=False, do_sample=False,
                stop_at_eos=False, return_type="tokens",
            )
            runs.append(out)
    plain = model.generate(tokens, max_new_tokens=4, verbose=False, do_sample=False, stop_at_eos=False)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], plain)  # the steering changed the tokens: the check can fail
