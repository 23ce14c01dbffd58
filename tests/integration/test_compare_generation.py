"""interpkv.compare_generation: per-step cached-vs-uncached agreement of greedy generation."""

import dataclasses

import pytest
import torch

import interpkv
from interpkv import zoo

from ._generation import model, prompts

NAMES = zoo.names()

try:
    from interpkv import faults
except ImportError:  # lands with branch `capture`
    faults = None


@pytest.mark.parametrize("name", NAMES)
def test_a_correct_cache_never_diverges(name):
    m = model(name, torch.float64)
    tokens, mask = prompts(m.cfg.d_vocab)
    diff = interpkv.compare_generation(m, tokens, attention_mask=mask, max_new_tokens=5)
    assert diff.first_divergent_step is None
    assert len(diff.logits_max_abs) == len(diff.kl) == len(diff.top1_agree) == 5
    assert max(diff.logits_max_abs) < 1e-10
    assert max(diff.kl) < 1e-10
    assert all(diff.top1_agree)


def test_float32_uses_its_own_tolerance():
    m = model("llama", torch.float32)
    tokens, mask = prompts(m.cfg.d_vocab)
    diff = interpkv.compare_generation(m, tokens, attention_mask=mask, max_new_tokens=5)
    assert diff.first_divergent_step is None
    assert 0 < max(diff.logits_max_abs) < 1e-4  # float32 noise is visible, and small


def test_a_broken_cache_diverges_at_the_first_cached_step(monkeypatch):
    """Without the `capture` branch's faults: a cache that forgets its history."""
    m = model("gpt2", torch.float64)
    tokens, mask = prompts(m.cfg.d_vocab)
    original = interpkv.KVCache.begin

    def forgetful(self, q_pos):  # stored keys look like padding from step 1 on
        slots = original(self, q_pos)
        k_pos = slots.k_pos.clone()
        k_pos[:, : slots.start] = -1
        return dataclasses.replace(slots, k_pos=k_pos)

    monkeypatch.setattr(interpkv.KVCache, "begin", forgetful)
    diff = interpkv.compare_generation(m, tokens, attention_mask=mask, max_new_tokens=4)
    assert diff.first_divergent_step == 1
    assert diff.logits_max_abs[0] < 1e-10  # the prompt step reads no history
    assert min(diff.logits_max_abs[1:]) > 1e-3 and min(diff.kl[1:]) > 0


@pytest.mark.skipif(faults is None, reason="interpkv.faults (branch `capture`) is not merged yet")
@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_no_cache_history_fault_diverges_at_the_first_cached_step(name):
    m = model(name, torch.float64)
    tokens, mask = prompts(m.cfg.d_vocab)
    with faults.inject(m, "no_cache_history"):
        diff = interpkv.compare_generation(m, tokens, attention_mask=mask, max_new_tokens=4)
    assert diff.first_divergent_step == 1
    assert diff.logits_max_abs[0] < 1e-10
    assert min(diff.logits_max_abs[1:]) > 1e-3
    healthy = interpkv.compare_generation(m, tokens, attention_mask=mask, max_new_tokens=4)
    assert healthy.first_divergent_step is None  # the fault is gone after the with block


def test_token_embeddings_are_rejected():
    m = model("gpt2", torch.float64)
    with pytest.raises(TypeError, match="token ids"):
        interpkv.compare_generation(m, torch.zeros(1, 3, m.cfg.d_model, dtype=torch.float64), max_new_tokens=2)
