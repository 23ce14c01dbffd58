"""Rotary rows are computed for the positions in use, never a table from position 0.

Regression (issue 24, item 7): the tables grew with the absolute position, so
a windowed cache, flat in ``nbytes``, was not flat in process memory: at
position 2^22 the next one-token forward of the zoo llama allocated two
``[2^23, rotary_dim]`` tables (+512 MB).
"""

import pytest
import torch

import interpkv
from benchmarks.opcount import OpCounter
from interpkv import zoo
from interpkv.core import tl as _tl


class _Largest(OpCounter):
    """Records the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _rss_peak_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.parametrize("name", ["llama", "gemma2"])
@torch.no_grad()
def test_a_windowed_cache_far_out_allocates_what_one_near_zero_does(name):
    model = zoo.load(name)
    window = 8
    cfg = model.cfg
    kv_heads = _tl.kv_head_count(cfg)
    far = 2**22
    gen = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, kv_heads, window, cfg.d_head, generator=gen, dtype=cfg.dtype) for _ in range(cfg.n_layers)]
    values = [torch.randn_like(k) for k in keys]
    positions = torch.arange(far - window, far)[None]
    cache = interpkv.KVCache.from_state(model, keys, values, positions, torch.tensor([far]), window=window)
    step = torch.tensor([[3]])
    interpkv.forward(model, step, cache=cache)  # first use of this model's rotary (its frequencies)
    measured = _reset_peak()
    before = _rss_peak_kb()
    with _Largest() as seen:
        logits = interpkv.forward(model, step, cache=cache)
    grown_mb = (_rss_peak_kb() - before) / 1024
    assert bool(torch.isfinite(logits).all())
    assert seen.largest < 1 << 20, seen.largest  # no op returns a tensor of 1 MiB (the table was 256 MiB)
    if measured:
        assert grown_mb < 64, grown_mb
    assert cache.next_positions.tolist() == [far + 2] and cache.seq_len == window


@pytest.mark.parametrize("name", ["neox", "gptj", "llama", "gemma2", "qwen3", "phi3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rows_equal_transformer_lens_table_rows_bit_for_bit(name, dtype):
    """Rows computed at any positions equal TransformerLens's own table rows."""
    model = zoo.load(name, dtype=dtype)
    scheme = interpkv.core.schemes.scheme_for(model)
    positions = torch.tensor([[0, 1, 7, 511, 4095, 70_000 - 1], [-1, 2, 3, 5, 11, 13]])
    for layer, block in enumerate(model.blocks):
        assert scheme._frequencies(layer, dtype, torch.device("cpu")) is not None  # not the table fallback
        scheme._last = None
        sin, cos = scheme._rows(layer, positions, dtype, torch.device("cpu"))
        table_sin, table_cos = _tl.rotary_tables(block.attn, 70_000, dtype)
        index = positions.clamp(min=0)
        assert torch.equal(sin[:, :, 0], table_sin[index]) and torch.equal(cos[:, :, 0], table_cos[index])
