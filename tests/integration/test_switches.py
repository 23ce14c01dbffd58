"""TransformerLens switches: interpkv.forward fires what ``run_with_cache`` records.

For every switch a researcher flips (``use_attn_result``, ``use_split_qkv_input``,
``use_hook_mlp_in``, ``use_attn_in``) on representative zoo models (learned
positions, partial rotary, ALiBi, rotary + GQA, Q/K norm with local/global
layers, mixture of experts), interpkv.forward fires the same hook names with the same shapes and
values as TransformerLens's own forward: uncached on the whole sequence, and
cached on the tokens after a prefix (compared with the same positions of the
uncached run).
"""

import pytest
import torch

import interpkv
from interpkv import zoo

from ._parity import batch

TOL = 1e-10  # float64: summation-order noise only (measured <= 2e-14)
PREFIX, LENGTH = 7, 12
SWITCHES = ["use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in"]
MODELS = ["gpt2", "neox", "bloom", "llama", "gemma3", "mixtral"]
GQA = {"llama", "gemma3", "mixtral"}  # TransformerLens refuses use_attn_in with GQA


def _params():
    for name in MODELS:
        for switch in SWITCHES:
            if not (switch == "use_attn_in" and name in GQA):
                yield pytest.param(name, switch, id=f"{name}-{switch}")


def _switched(name, switch):
    m = zoo.load(name, dtype=torch.float64)
    getattr(m, f"set_{switch}")(True)
    return m


def _fired(run):
    """Every hook's value; a hook firing several times keeps its last (as run_with_cache)."""
    seen = {}

    def record(x, hook):
        seen[hook.name] = x.detach().clone()

    run([(lambda name: True, record)])
    return seen


def _suffix(name, act, batch_size):
    """The activation of positions PREFIX.. of an uncached run, laid out as a cached call fires it."""
    if name.endswith(("hook_attn_scores", "hook_pattern")):
        return act[:, :, PREFIX:, :]  # (B, H, new queries, all keys)
    if act.shape[0] == batch_size:
        return act[:, PREFIX:]
    # Q/K norm and MoE routing: rows are flattened (batch, pos[, head])
    per_pos = act.reshape(batch_size, LENGTH, -1, *act.shape[1:])[:, PREFIX:]
    return per_pos.reshape(-1, *act.shape[1:])


@pytest.mark.parametrize("name,switch", list(_params()))
def test_switch_hooks_equal_run_with_cache(name, switch):
    m = _switched(name, switch)
    tokens, _ = batch("b1", m.cfg.d_vocab, length=LENGTH)
    with torch.no_grad():
        _, ref = m.run_with_cache(tokens)
        uncached = _fired(lambda hooks: interpkv.forward(m, tokens, fwd_hooks=hooks))
        cache = interpkv.KVCache.for_model(m)
        interpkv.forward(m, tokens[:, :PREFIX], cache=cache)
        cached = _fired(lambda hooks: interpkv.forward(m, tokens[:, PREFIX:], cache=cache, fwd_hooks=hooks))
    assert set(uncached) == set(ref.keys()) == set(cached)
    switch_hooks = {
        "use_attn_result": "attn.hook_result",
        "use_split_qkv_input": "hook_q_input",
        "use_hook_mlp_in": "hook_mlp_in",
        "use_attn_in": "hook_attn_in",
    }
    assert f"blocks.0.{switch_hooks[switch]}" in uncached
    for hook_name, want in ref.items():
        got = uncached[hook_name]
        _assert_close(got, want, hook_name)
        if ".experts." in hook_name:
            continue  # rows are the tokens routed to the expert: see test_capture_moe
        want = _suffix(hook_name, want, tokens.shape[0])
        _assert_close(cached[hook_name], want, f"{hook_name} (cached)")


def _assert_close(got, want, what):
    # Masked attention scores are -inf in both: equal infinities count as equal.
    torch.testing.assert_close(got.double(), want.double(), atol=TOL, rtol=0, msg=lambda m: f"{what}: {m}")
