"""interpkv.patching.patch equals TransformerLens's patching functions, with a cached prefix."""

import pytest
import torch
from transformer_lens import patching as TL_PATCHING  # the reference implementation

import interpkv
from interpkv import zoo
from interpkv.patching import HOOKS, patch, shared_prefix_length

from ._generation import model
from ._parity import TL_WRONG

F32 = torch.float32
# float32: TransformerLens and interpkv sum attention in different orders
# (~1e-7 relative per op, logits ~1-10, a metric of one logit difference).
TOL_F32 = 1e-5
TOL_F64 = 1e-10  # float64: summation-order noise only
# TransformerLens 3.9 uses wrong ALiBi slopes for 6 heads: no reference there
# (measured on the installed version, see _upstream.py).
TL_NAMES = [n for n in zoo.names() if n not in TL_WRONG]


def _pair(d_vocab, batch=2, length=7, seed=0, differ=((0, 5), (1, 4), (0, 6), (1, 6))):
    """Clean/corrupt sharing a prefix: row 0 differs from column 5, row 1 from column 4."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (batch, length), generator=gen)
    corrupt = clean.clone()
    for row, col in differ:
        if row < batch and col < length:
            corrupt[row, col] = (clean[row, col] + 1 + row) % d_vocab
    return clean, corrupt


def _metric(logits):
    return (logits[:, -1, 1] - logits[:, -1, 2]).mean()


def _tl_patch(m, clean, corrupt, hook, metric=_metric):
    _, clean_cache = m.run_with_cache(clean)
    kind = HOOKS[hook]
    if kind.tl_function == "generic_activation_patch":  # resid_post has no named TL function
        return TL_PATCHING.generic_activation_patch(
            m,
            corrupt,
            clean_cache,
            metric,
            patch_setter=TL_PATCHING.layer_pos_patch_setter,
            activation_name=hook,
            index_axis_names=("layer", "pos"),
        )
    return getattr(TL_PATCHING, kind.tl_function)(m, corrupt, clean_cache, metric)


@pytest.mark.parametrize("name", TL_NAMES)
def test_resid_pre_equals_transformer_lens_on_every_zoo_model(name):
    m = model(name, F32)
    clean, corrupt = _pair(m.cfg.d_vocab)
    ref = _tl_patch(m, clean, corrupt, "resid_pre")
    got = patch(m, clean, corrupt, hook="resid_pre", metric=_metric, progress=False)
    assert got.shape == ref.shape == (m.cfg.n_layers, 7)
    assert (got - ref).abs().max() < TOL_F32
    assert (ref - ref[0, 0]).abs().max() > 1e-3  # patching really moves the metric


ALL_HOOKS = [
    "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "z_by_pos",
    "q", "k", "v", "q_by_pos", "k_by_pos", "v_by_pos", "pattern", "pattern_by_pos",
]  # fmt: skip
# gpt2 runs every hook in CI; GQA (llama) and ALiBi (bloom) run them under `make test-all`,
# except k and v on llama (GQA: TL counts key-value heads), which always run.
HOOK_CASES = (
    [pytest.param("gpt2", hook, id=f"gpt2-{hook}") for hook in ALL_HOOKS]
    + [pytest.param("llama", hook, id=f"llama-{hook}") for hook in ("k", "v_by_pos")]
    + [
        pytest.param(name, hook, id=f"{name}-{hook}", marks=pytest.mark.slow)
        for name in ("llama", "bloom")
        for hook in ALL_HOOKS
        if not hook.endswith("_by_pos") and (name, hook) != ("llama", "k")
    ]
)


@pytest.mark.parametrize("name, hook", HOOK_CASES)
def test_every_hook_equals_transformer_lens(name, hook):
    m = model(name, F32)
    length = 5 if hook.endswith("_by_pos") else 7
    clean, corrupt = _pair(m.cfg.d_vocab, length=length, differ=((0, 3), (1, 4)))
    ref = _tl_patch(m, clean, corrupt, hook)
    got = patch(m, clean, corrupt, hook=hook, metric=_metric, progress=False)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < TOL_F32
    assert (ref - ref.flatten()[0]).abs().max() > 1e-4  # the patches really move the metric


@pytest.mark.parametrize("short, layer", [("resid_pre", 0), ("mlp_out", 1), ("pattern", 1), ("q", 0), ("z", 1)])
def test_full_transformer_lens_names_mean_their_family(short, layer):
    """``get_act_name("resid_pre", 0)`` = ``blocks.0.hook_resid_pre`` patches resid_pre in every layer."""
    from transformer_lens.utilities import get_act_name

    m = model("gpt2", torch.float64)
    clean, corrupt = _pair(m.cfg.d_vocab, length=6)
    full = patch(m, clean, corrupt, hook=get_act_name(short, layer), metric=_metric, progress=False)
    assert torch.equal(full, patch(m, clean, corrupt, hook=short, metric=_metric, progress=False))
    assert full.shape[0] == m.cfg.n_layers


def test_text_prompts_are_tokenized_together():
    m = zoo.load("llama", trained=True, dtype=torch.float64)
    clean, corrupt = ["The cat sat", "A dog"], ["The car sat", "A cow"]
    ids = m.to_tokens(clean + corrupt, padding_side="left")  # one padding length for both
    mask = (torch.arange(ids.shape[1]) >= ids.shape[1] - torch.tensor([11, 5, 11, 5])[:, None]).long()
    got = patch(m, clean, corrupt, hook="resid_pre", metric=_metric, progress=False)
    want = patch(m, ids[:2], ids[2:], hook="resid_pre", metric=_metric, attention_mask=mask[2:], progress=False)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"rows \[1\] tokenize to different lengths"):
        patch(m, clean, ["The car sat", "A cows"], hook="resid_pre", metric=_metric)
    with pytest.raises(TypeError, match="both be text"):
        patch(m, clean, ids[2:], hook="resid_pre", metric=_metric)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "bloom", "gemma2", "mistral"])
def test_z_by_pos_equals_transformer_lens_slow(name):
    m = model(name, F32)
    clean, corrupt = _pair(m.cfg.d_vocab, length=6, differ=((0, 3), (1, 4)))
    ref = _tl_patch(m, clean, corrupt, "z_by_pos")
    got = patch(m, clean, corrupt, hook="attn_head_out_by_pos", metric=_metric, progress=False)
    assert got.shape == ref.shape == (m.cfg.n_layers, 6, m.cfg.n_heads)
    assert (got - ref).abs().max() < TOL_F32


@pytest.mark.parametrize("hook", ["resid_pre", "z", "z_by_pos"])
def test_shared_prefix_changes_nothing_in_float64(hook):
    m = model("neox", torch.float64)
    clean, corrupt = _pair(m.cfg.d_vocab, length=6, differ=((0, 4), (1, 5)))
    shared = patch(m, clean, corrupt, hook=hook, metric=_metric, progress=False)
    full = patch(m, clean, corrupt, hook=hook, metric=_metric, progress=False, share_prefix=False)
    assert (shared - full).abs().max() < TOL_F64


def test_prefix_positions_take_the_unpatched_metric_without_a_run():
    m = model("gpt2", torch.float64)
    clean, corrupt = _pair(m.cfg.d_vocab)  # rows differ from columns 5 and 4: prefix of 4
    assert shared_prefix_length(clean, corrupt) == 4
    calls = []

    def counting(logits):
        calls.append(logits.shape)
        return _metric(logits)

    out = patch(m, clean, corrupt, hook="resid_pre", metric=counting, progress=False)
    # one clean-free baseline + layers x the 3 suffix columns; full-length logits each time
    assert len(calls) == 1 + m.cfg.n_layers * 3
    assert all(shape[:2] == (2, 7) for shape in calls)
    assert (out[:, :4] == out[0, 0]).all()


def test_positions_select_columns_in_the_given_order():
    m = model("llama", torch.float64)
    clean, corrupt = _pair(m.cfg.d_vocab)
    full = patch(m, clean, corrupt, hook="attn_out", metric=_metric, progress=False)
    some = patch(m, clean, corrupt, hook="attn_out", metric=_metric, positions=[-1, 2, 5], progress=False)
    assert (some - full[:, [6, 2, 5]]).abs().max() < TOL_F64
    head_some = patch(m, clean, corrupt, hook="z", metric=_metric, positions=[4, 5, 6], progress=False)
    head_all = patch(m, clean, corrupt, hook="z", metric=_metric, progress=False)
    assert (head_some - head_all).abs().max() < TOL_F64  # columns < 4 are shared: no-ops


@pytest.mark.parametrize(
    "name", ["gpt2", pytest.param("llama", marks=pytest.mark.slow), pytest.param("bloom", marks=pytest.mark.slow)]
)
def test_left_padded_rows_match_transformer_lens_on_each_row_alone(name):
    """Row 1 is left-padded by 2: its patch at column p is TL's patch of the unpadded row at p - 2."""
    m = model(name, F32)
    clean, corrupt = _pair(m.cfg.d_vocab, length=7, differ=((0, 5), (1, 5), (1, 6)))
    mask = torch.ones_like(clean)
    mask[1, :2] = 0
    clean[1, :2] = 0  # padding ids: any value
    corrupt[1, :2] = 0
    for row, pad in ((0, 0), (1, 2)):

        def row_metric(logits, row=row):
            return logits[row, -1, 1] - logits[row, -1, 2]

        got = patch(m, clean, corrupt, hook="resid_pre", metric=row_metric, attention_mask=mask, progress=False)
        alone = _tl_patch(m, clean[row : row + 1, pad:], corrupt[row : row + 1, pad:], "resid_pre", _metric)
        assert (got[:, pad:] - alone).abs().max() < TOL_F32, row
        if pad:  # padding columns: nothing to patch, the unpatched metric
            unpatched = row_metric(interpkv.forward(m, corrupt, attention_mask=mask))
            assert (got[:, :pad] - unpatched).abs().max() < TOL_F32


def test_identical_clean_and_corrupt_give_a_flat_result():
    m = model("gpt2", torch.float64)
    clean, _ = _pair(m.cfg.d_vocab)
    out = patch(m, clean, clean.clone(), hook="mlp_out", metric=_metric, progress=False)
    assert (out - out[0, 0]).abs().max() < TOL_F64


def test_progress_bar_can_be_silenced(capsys):
    m = model("gpt2", torch.float64)
    clean, corrupt = _pair(m.cfg.d_vocab, length=5)
    patch(m, clean, corrupt, hook="resid_pre", metric=_metric, progress=False)
    assert capsys.readouterr().err == ""
    patch(m, clean, corrupt, hook="resid_pre", metric=_metric, progress=True)
    assert "patch resid_pre (shared prefix" in capsys.readouterr().err


@pytest.mark.unchecked_shapes  # checks interpkv's own error for a wrong argument
def test_misuse_is_named():
    m = model("gpt2", torch.float64)
    clean, corrupt = _pair(m.cfg.d_vocab)
    with pytest.raises(ValueError, match="same shape"):
        patch(m, clean, corrupt[:, 1:], hook="resid_pre", metric=_metric)
    with pytest.raises(ValueError, match="not supported; choose one of"):
        patch(m, clean, corrupt, hook="attn_scores", metric=_metric)
    with pytest.raises(ValueError, match="outside the 7 columns"):
        patch(m, clean, corrupt, hook="resid_pre", metric=_metric, positions=[7])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_model_level_position_hooks_give_transformer_lens_values(name):
    """A hook on the model indexing positions (act[:, -1] += v): share_prefix must not shift it."""
    m = model(name, torch.float64)
    clean, corrupt = _pair(m.cfg.d_vocab)
    vector = torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def last_token(act, hook):
        act[:, -1] += vector
        return act

    m.add_hook("blocks.0.hook_resid_post", last_token)
    try:
        ref = _tl_patch(m, clean, corrupt, "resid_pre")
        with pytest.warns(interpkv.patching.SharedPrefixWarning, match="blocks.0.hook_resid_post"):
            shared = patch(m, clean, corrupt, hook="resid_pre", metric=_metric, progress=False)
        whole = patch(m, clean, corrupt, hook="resid_pre", metric=_metric, share_prefix=False, progress=False)
    finally:
        m.reset_hooks()
    # TransformerLens stores its patching result in float32 (~1e-7 rounding of metrics ~1);
    # the bug this guards against was off by 0.18-0.85.
    assert (whole - ref.double()).abs().max() < 1e-6
    assert (shared - whole).abs().max() < TOL_F64
    without = _tl_patch(m, clean, corrupt, "resid_pre")
    assert (without - ref).abs().max() > 1e-3  # the hook really moves the metric
