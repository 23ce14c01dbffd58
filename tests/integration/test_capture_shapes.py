"""capture / compare / check on hooks that are not ``[batch, pos, ...]`` once per call.

Q/K norms fire on ``[batch * pos * head, d_head]``, MoE routing on
``[batch * pos, ...]`` and each expert on the tokens routed to it; ``ln1``
fires once per q/k/v input (with different head counts under
``use_split_qkv_input`` and GQA). Each is recorded at absolute positions, or
skipped with a reason the Record and the report show; none crashes.
"""

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.core.tl import HookPoint
from interpkv.verify.checks import check_model

from ._parity import batch

TOL64 = dict(atol=1e-10, rtol=1e-10)  # float64: summation order only
STEPS = [9, 1, 1, 13]


def _b3(m):
    return batch("b3", m.cfg.d_vocab, length=sum(STEPS))


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_qk_norm_hooks_are_recorded_per_position_and_head(name):
    m = zoo.load(name, dtype=torch.float64)
    tokens, _ = batch("b1", m.cfg.d_vocab, length=10)
    _, ref = m.run_with_cache(tokens)
    record = interpkv.capture(m, tokens, steps=[6, 1, 3])
    for hook in ("attn.q_norm.hook_normalized", "attn.k_norm.hook_scale"):
        got, want = record[f"blocks.1.{hook}"], ref[f"blocks.1.{hook}"]
        assert got.shape[:2] == (1, 10)
        torch.testing.assert_close(got, want.reshape(got.shape), atol=1e-10, rtol=0)
    assert not record.skipped


def test_moe_expert_hooks_are_scattered_to_the_routed_positions():
    m = zoo.load("mixtral", dtype=torch.float64)
    tokens, _ = batch("b1", m.cfg.d_vocab, length=10)
    _, ref = m.run_with_cache(tokens)
    record = interpkv.capture(m, tokens, steps=[4, 1, 5])
    routing = ref["blocks.0.mlp.hook_expert_indices"]  # (pos, k)
    torch.testing.assert_close(record["blocks.0.mlp.hook_expert_indices"][0], routing)
    for expert in range(m.cfg.num_experts):
        got = record[f"blocks.0.mlp.experts.{expert}.hook_post"][0]  # (pos, d_mlp)
        routed = (routing == expert).any(dim=-1)
        done = record.computed(f"blocks.0.mlp.experts.{expert}.hook_post")[0]
        assert torch.equal(done, routed) and (got[~routed] == 0).all() and not torch.isnan(got).any()
        _, order = torch.where((routing == expert).T)  # TransformerLens's row order
        torch.testing.assert_close(got[order], ref[f"blocks.0.mlp.experts.{expert}.hook_post"], atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["qwen3", "mixtral", "gemma3"])
def test_compare_and_check_on_left_padded_batches(name):
    m, hf = zoo.load_pair(name, dtype=torch.float64)
    tokens, mask = _b3(m)
    report = interpkv.compare(m, tokens, steps=STEPS, attention_mask=mask)
    assert report.ok(**TOL64), report.first_divergence(**TOL64)
    assert not report.skipped
    special = "blocks.0.mlp.experts.0.hook_post" if name == "mixtral" else "blocks.0.attn.q_norm.hook_scale"
    assert special in report.hooks
    result = check_model(m, label=name, hf=hf)
    assert result.max_dlogit < 1e-10 and result.first_divergence is None
    assert result.max_dlogit_hf < 5e-5  # HF float64 runs softmax/norms in float32


def test_split_qkv_input_with_gqa():
    m, hf = zoo.load_pair("llama", dtype=torch.float64)
    m.set_use_split_qkv_input(True)
    tokens, mask = _b3(m)
    record = interpkv.capture(m, tokens, steps=STEPS, attention_mask=mask)
    # ln1 fired on the query (8 heads), key and value inputs (2 heads each): last kept.
    assert record["blocks.0.ln1.hook_normalized"].shape == (3, 24, 2, m.cfg.d_model)
    assert record["blocks.0.hook_q_input"].shape == (3, 24, 8, m.cfg.d_model)
    report = interpkv.compare(m, tokens, steps=STEPS, attention_mask=mask)
    assert report.ok(**TOL64) and "blocks.0.ln1.hook_normalized" in report.hooks
    result = check_model(m, label="llama+split", hf=hf)
    assert result.ok and result.max_dlogit < 1e-10


def test_a_hook_without_positions_is_skipped_with_its_reason():
    m = zoo.load("gpt2", dtype=torch.float64)
    m.blocks[0].hook_odd = HookPoint()
    m.setup()  # names the new hook point "blocks.0.hook_odd"
    mlp = m.blocks[0].mlp
    original = type(mlp).forward

    def forward(x):
        m.blocks[0].hook_odd(x.sum(dim=(0, 1)))  # (d_model,): no batch or position axis
        return original(mlp, x)

    mlp.forward = forward
    tokens, _ = batch("b1", m.cfg.d_vocab, length=8)
    record = interpkv.capture(m, tokens, steps=[5, 3])
    assert "blocks.0.hook_odd" not in record.activations
    assert "does not start with [batch, pos]" in record.skipped["blocks.0.hook_odd"]
    assert "1 skipped" in repr(record)
    with pytest.raises(KeyError, match="was skipped"):
        record["blocks.0.hook_odd"]
    report = interpkv.compare(m, tokens, steps=[5, 3])
    assert report.ok(**TOL64) and "blocks.0.hook_odd" in report.skipped
    assert "1 hooks skipped (blocks.0.hook_odd" in repr(report)
    assert "blocks.0.hook_odd" not in report.only_in_a + report.only_in_b
    assert "blocks.0.hook_odd" in interpkv.diff(record, interpkv.capture(m, tokens)).skipped
