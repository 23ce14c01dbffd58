"""Weight edits by any route are seen by the next forward (no stale weight layouts).

An ablation edits weights between calls: ``W.data[...] = 0`` and
``W.data.copy_(...)`` do not bump ``param._version``, ``load_state_dict`` and
``copy_`` under ``no_grad`` do, swapping a Parameter or ``model.to(dtype)``
changes the tensor itself. Whatever the route, the next interpkv call (cached
or not, ``generate`` included) must compute what TransformerLens's own
``model(tokens)`` computes with the edited weights. Each edit runs after a
forward has already run (anything kept between calls would be stale then).
"""

import pytest
import torch

import interpkv
from interpkv import zoo

F64 = torch.float64
TOL = 1e-10  # float64: the cached and uncached paths reorder sums, ~1e-15 relative per op


def _param(m, name):
    return dict(m.named_parameters())[name]


def _kv_name(m, layer, which):
    """TransformerLens stores grouped-query K/V as ``_W_K``/``_W_V`` (``W_K`` is a repeated copy)."""
    names = dict(m.named_parameters())
    grouped = f"blocks.{layer}.attn._W_{which}"
    return grouped if grouped in names else f"blocks.{layer}.attn.W_{which}"


def _ramp(p):
    return torch.linspace(-1, 1, p.numel(), dtype=p.dtype).reshape(p.shape)


def edit_data_index(m):
    _param(m, "blocks.0.attn.W_Q").data[0] = 0


def edit_data_zero(m):
    _param(m, _kv_name(m, 0, "K")).data.zero_()


def edit_data_copy(m):
    p = _param(m, "blocks.1.mlp.W_in")
    p.data.copy_(_ramp(p))


def edit_value_data(m):
    p = _param(m, _kv_name(m, 1, "V"))
    p.data.mul_(-3.0)


def edit_unembed_data(m):
    p = _param(m, "unembed.W_U")
    p.data[:, : p.shape[1] // 2] = 0


def edit_embed_data(m):
    p = _param(m, "embed.W_E")
    p.data.add_(_ramp(p))


def edit_copy_no_grad(m):
    p = _param(m, "blocks.0.mlp.W_out")
    with torch.no_grad():
        p.copy_(_ramp(p))


def edit_load_state_dict(m):
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for key in ("blocks.0.attn.W_Q", "blocks.1.mlp.W_in", "unembed.W_U"):
        state[key] = _ramp(state[key])
    m.load_state_dict(state)


def edit_swap_parameter(m):
    mlp = m.blocks[0].mlp
    mlp.W_in = torch.nn.Parameter(_ramp(mlp.W_in), requires_grad=mlp.W_in.requires_grad)
    attn = m.blocks[1].attn
    attn.W_Q = torch.nn.Parameter(_ramp(attn.W_Q), requires_grad=attn.W_Q.requires_grad)


EDITS = [
    edit_data_index,
    edit_data_zero,
    edit_data_copy,
    edit_value_data,
    edit_unembed_data,
    edit_embed_data,
    edit_copy_no_grad,
    edit_load_state_dict,
    edit_swap_parameter,
]


def _cached_logits(m, tokens, steps):
    cache = interpkv.KVCache.for_model(m, tokens.shape[0])
    parts, start = [], 0
    for n in steps:
        parts.append(interpkv.forward(m, tokens[:, start : start + n], cache=cache))
        start += n
    return torch.cat(parts, 1)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__[len("edit_"):])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_edit_is_seen_by_the_next_forward(name, edit, grad):
    m = zoo.load(name, dtype=F64)
    tokens = torch.randint(0, m.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.set_grad_enabled(grad):
        before = interpkv.forward(m, tokens).detach()
        _cached_logits(m, tokens, [5, 1, 3])  # every per-call path has run once
        edit(m)
        with torch.no_grad():
            reference = m(tokens)
        assert (reference - before).abs().max() > 1e-3, "the edit must change TransformerLens's output"
        uncached = interpkv.forward(m, tokens).detach()
        cached = _cached_logits(m, tokens, [5, 1, 3]).detach()
    assert (uncached - reference).abs().max() < TOL
    assert (cached - reference).abs().max() < TOL


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_dtype_change_is_seen(name):
    m = zoo.load(name, dtype=F64)
    tokens = torch.randint(0, m.cfg.d_vocab, (1, 7), generator=torch.Generator().manual_seed(1))
    interpkv.forward(m, tokens)
    m.to(torch.float32)
    with torch.no_grad():
        reference = m(tokens)
    out = interpkv.forward(m, tokens)
    assert out.dtype == torch.float32
    # float32: relative to the logit scale, one rounding per op (~1e-7) over a few dozen ops
    assert (out - reference).abs().max() < 1e-5 * reference.abs().max()


def _greedy_loop(m, tokens, n):
    with torch.no_grad():
        for _ in range(n):
            tokens = torch.cat([tokens, m(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_follows_an_ablation(name):
    m = zoo.load(name, dtype=F64)
    prompt = torch.randint(0, m.cfg.d_vocab, (1, 6), generator=torch.Generator().manual_seed(2))
    before = interpkv.generate(m, prompt, max_new_tokens=6).tokens
    assert torch.equal(before, _greedy_loop(m, prompt, 6))
    for layer in range(m.cfg.n_layers):  # ablate every layer's values and MLP input through .data
        _param(m, _kv_name(m, layer, "V")).data.zero_()
        _param(m, f"blocks.{layer}.mlp.W_in").data.zero_()
    expected = _greedy_loop(m, prompt, 6)
    assert not torch.equal(expected, before), "the ablation must change TransformerLens's tokens"
    after = interpkv.generate(m, prompt, max_new_tokens=6).tokens
    assert torch.equal(after, expected)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_backward_works_after_an_inference_mode_call(name):
    m = zoo.load(name, dtype=F64)
    tokens = torch.randint(0, m.cfg.d_vocab, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        interpkv.forward(m, tokens)
        interpkv.generate(m, tokens, max_new_tokens=3)
        _cached_logits(m, tokens, [4, 1, 2])
    logits = interpkv.forward(m, tokens)
    logits[0, -1].sum().backward()
    assert _param(m, "blocks.0.attn.W_Q").grad.abs().sum() > 0
    assert _param(m, "blocks.0.mlp.W_in").grad.abs().sum() > 0
    assert _param(m, "unembed.W_U").grad.abs().sum() > 0
