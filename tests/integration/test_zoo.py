"""Integration tests for :mod:`interpkv.zoo`: loading, determinism, TL-vs-HF parity."""

from __future__ import annotations

import time

import pytest
import torch

from interpkv import zoo

from ._parity import CENTRED_UNEMBED, TL_WRONG

NAMES = zoo.names()
PAIRS = zoo.pairs()
SEQ = 40  # longer than every sliding / local window (8)

# HF float64 is not float64 end to end: its eager attention softmaxes in float32
# (softmax(..., dtype=torch.float32) in neox/llama/mistral/bloom/gemma2/opt),
# GPT-J/GPT-Neo cast q and k to float32, RMSNorm computes in float32
# (llama/mistral/gemma2) and rotary cos/sin tables are built in float32. So only
# GPT-2's HF forward is float64-clean and can be held to 1e-10; the others agree
# with TL to float32 rounding (measured max 1.1e-5, llama), inside 5e-5.
F64_ATOL = {"gpt2": 1e-10}
F64_ATOL_HF_FLOAT32_INTERNALS = 5e-5
F32_ATOL = 1e-4

# Known TL bug, fixed by interpkv itself: TransformerLens 3.9 gives head i the
# ALiBi slope 2^(-8 (i + 1) / n) for every n, while BLOOM/HF (and the ALiBi
# paper) use that only for powers of two and otherwise interleave two geometric
# series. For 6 heads HF has [2^-2, 2^-4, 2^-6, 2^-8, 2^-1, 2^-3] and TL
# [2^-4/3, 2^-8/3, ...]: every head differs, so TL and HF logits differ for
# "bloom6". Which models are affected is measured on the installed TransformerLens
# (tests/integration/_upstream.py), so the test holds whether or not it is fixed.
EXPECTED_MISMATCH = TL_WRONG


def _tokens(name: str, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    d_vocab = zoo.info(name)["d_vocab"]
    return torch.randint(0, d_vocab, (batch, seq), generator=torch.Generator().manual_seed(123))


def test_names_and_pairs() -> None:
    required = {
        "gpt2", "shortformer", "neox", "gptj", "llama", "mistral",
        "bloom", "bloom6", "gemma2", "opt", "gptneo",
    }  # fmt: skip
    assert required <= set(NAMES)
    assert {"qwen2", "qwen3", "phi3", "mixtral", "gemma3", "gpt2-tl"} <= set(NAMES)
    assert set(PAIRS) == set(NAMES) - {"shortformer"}
    assert zoo.trained_names() == ["bloom", "gpt2", "llama"]  # shipped by scripts/train_zoo.py


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_load_float32_float64_deterministic(name: str) -> None:
    for dtype in (torch.float32, torch.float64):
        a = zoo.load(name, dtype=dtype)
        b = zoo.load(name, dtype=dtype, seed=0)
        c = zoo.load(name, dtype=dtype, seed=1)
        assert a is not b
        assert a.cfg.d_model <= 256
        assert a.cfg.device == "cpu"
        assert a.cfg.default_prepend_bos is False
        assert a.tokenizer is None
        assert not a.training
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert all(v.dtype == dtype for v in a.parameters())
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
        # fresh copies: mutating one model must not leak into the next load
        with torch.no_grad():
            a.W_E.zero_()
        assert not torch.equal(zoo.load(name, dtype=dtype).W_E, a.W_E)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_reload_is_fast(name: str) -> None:
    zoo.load(name)
    t0 = time.perf_counter()
    zoo.load(name)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_low_precision_loads(name: str, dtype: torch.dtype) -> None:
    model = zoo.load(name, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    if dtype == torch.bfloat16:
        with torch.no_grad():
            assert torch.isfinite(model(_tokens(name, 1, 8)).float()).all()
    if name in PAIRS:
        _, hf = zoo.load_pair(name, dtype=dtype)
        assert next(hf.parameters()).dtype == dtype and not hf.training


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_logits_not_flat(name: str) -> None:
    model = zoo.load(name)
    with torch.no_grad():
        probs = model(_tokens(name)).softmax(-1)
    uniform = 1.0 / model.cfg.d_vocab
    max_p = probs.max(-1).values
    assert max_p.mean() > 0.1, f"mean max prob {max_p.mean():.3f} (uniform {uniform:.3f})"
    assert max_p.median() > 5 * uniform


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", PAIRS, ids=PAIRS)
def test_tl_matches_hf(name: str, dtype: torch.dtype) -> None:
    tl, hf = zoo.load_pair(name, dtype=dtype)
    assert not hf.training
    assert next(hf.parameters()).dtype == dtype
    tokens = _tokens(name)
    with torch.no_grad():
        tl_logits = tl(tokens)
        hf_logits = hf(tokens).logits
    assert tl_logits.dtype == hf_logits.dtype == dtype
    if name in CENTRED_UNEMBED:  # from_pretrained's center_unembed: a constant per position
        tl_logits = tl_logits - tl_logits.mean(-1, keepdim=True)
        hf_logits = hf_logits - hf_logits.mean(-1, keepdim=True)
    diff = (tl_logits - hf_logits).abs().max().item()
    if name in EXPECTED_MISMATCH:
        # The installed TL has the non-power-of-two ALiBi slope bug (see above): its logits must show it.
        assert diff > 1e-2, f"{name}: TL slopes differ from Bloom's yet TL matches HF ({diff:.3g})"
        return
    if dtype == torch.float32:
        atol = F32_ATOL
    else:
        atol = F64_ATOL.get(name, F64_ATOL_HF_FLOAT32_INTERNALS)
    assert diff <= atol, f"{name} {dtype}: max |TL - HF| = {diff:.3g} > {atol:g}"


def test_config_details() -> None:
    llama = zoo.load("llama")
    assert llama.cfg.use_NTK_by_parts_rope and llama.cfg.n_key_value_heads in (2, 4)
    assert llama.cfg.n_heads == 8
    mistral = zoo.info("mistral")
    assert mistral["window"] == 8 and mistral["attn_types"] == ["local"] * mistral["n_layers"]
    gemma2 = zoo.info("gemma2")
    assert gemma2["attn_types"][:2] == ["local", "global"] and gemma2["window"] == 8
    gptneo = zoo.info("gptneo")
    assert gptneo["attn_types"] == ["global", "local"] and gptneo["window"] == 8
    assert zoo.info("gptj")["rotary_dim"] < zoo.info("gptj")["d_head"]
    assert zoo.info("neox")["rotary_dim"] == zoo.info("neox")["d_head"] // 2
    assert zoo.load("shortformer").cfg.positional_embedding_type == "shortformer"
    assert zoo.info("bloom6")["n_heads"] == 6 and zoo.info("bloom6")["tl_pair_note"]


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_info(name: str) -> None:
    meta = zoo.info(name)
    for key in ("architecture", "positional", "attention"):
        assert isinstance(meta[key], str) and meta[key]
    assert meta["has_pair"] == (name in PAIRS)


def test_errors() -> None:
    with pytest.raises(ValueError, match="valid names: gpt2"):
        zoo.load("gpt5")
    with pytest.raises(ValueError, match="valid names"):
        zoo.load_pair("nope")
    with pytest.raises(ValueError, match="no trained weights.*bloom, gpt2, llama"):
        zoo.load("opt", trained=True)
    with pytest.raises(ValueError, match="no HuggingFace class.*gpt2"):
        zoo.load_pair("shortformer")
    with pytest.raises(ValueError, match="dtype"):
        zoo.load("gpt2", dtype=torch.int64)


WINDOWED = ["mistral", "gemma2", "gptneo"]


@pytest.mark.parametrize("name", WINDOWED, ids=WINDOWED)
def test_sliding_window_bites(name: str) -> None:
    """Local layers attend to exactly the last `window` keys, in TL and in HF."""
    tl, hf = zoo.load_pair(name, dtype=torch.float64)
    meta = zoo.info(name)
    window = meta["window"]
    tokens = _tokens(name)
    with torch.no_grad():
        _, cache = tl.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        hf_attn = hf(tokens, output_attentions=True).attentions
    q = torch.arange(SEQ)[:, None]
    k = torch.arange(SEQ)[None, :]
    outside = (k <= q - window) | (k > q)
    for layer, kind in enumerate(meta["attn_types"]):
        pattern = cache["pattern", layer]
        if kind == "local":
            assert pattern[..., outside].abs().max() == 0
            assert hf_attn[layer][..., outside].abs().max() == 0
        else:
            assert pattern[..., k <= q - window].abs().max() > 0
        # HF softmaxes in float32 (see F64 note above), hence the loose tolerance
        torch.testing.assert_close(pattern, hf_attn[layer], atol=1e-5, rtol=0)
