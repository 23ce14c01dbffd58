"""Cost of ``interpkv.compare`` against the forwards it is made of.

compare = one uncached forward recording every hook + one cached run
(chunked by ``steps``) compared hook by hook. The baseline is exactly those
two runs without capture (``interpkv.forward``, nothing hooked: fused
attention and norms). Target: <= 2x.

Models:

- zoo models (``--models``): 256 tokens, ``steps=[128] + [1] * 128``.
- real shapes (``--shapes``, random weights from a ``transformers`` config as in
  ``bench_decode.py``, converted by ``interpkv.zoo.from_hf``):
  ``gpt2`` (GPT-2-small: 12 layers, d_model 768, 12 heads, vocab 50257,
  n_ctx 1024), 512 tokens, ``steps=[256] + [1] * 256``;
  ``llama`` (Llama GQA, ~0.3B: 8 layers, d_model 1024, 16 heads / 4 kv heads,
  d_mlp 2816, vocab 32000), 1,024 tokens, ``steps=[512] + [1] * 256 + [256]``
  (a prefill, 256 decode steps, a second long chunk over a populated cache).

Per model, after a short warm-up, the baseline and compare run interleaved
(B, C, B, C, ...) ``--repeats`` times; times are medians, the ratio is the
median of the per-repetition ratios (adjacent runs see the same load).
Peak memory: growth of the process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` before each run), max over repetitions.
``--names no-attn`` compares every hook except ``hook_attn_scores`` /
``hook_pattern`` (which force the explicit attention route).

    PYTHONPATH=. python benchmarks/bench_compare.py [--models gpt2 llama] [--shapes gpt2 llama] [--repeats 3]
"""

import argparse
import gc
import statistics
import sys
import time

import torch

import interpkv
from interpkv import zoo

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode import _reset_peak, _rss_kb, hf_model  # noqa: E402

ZOO_TOKENS = 256
REAL = {  # shape: (tokens, steps)
    "gpt2": (512, [256] + [1] * 256),
    "llama": (1024, [512] + [1] * 256 + [256]),
}
NAMES = {
    "all": None,
    "no-attn": lambda name: not name.endswith(("hook_attn_scores", "hook_pattern")),
}


def baseline(model, tokens, steps):
    with torch.no_grad():
        interpkv.forward(model, tokens)
        cache = interpkv.KVCache.for_model(model, tokens.shape[0])
        start = 0
        for n in steps:
            interpkv.forward(model, tokens[:, start : start + n], cache=cache)
            start += n


def measure(fn):
    base = _reset_peak()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, seconds, (_rss_kb("VmHWM:") - base) / 1024


def bench(label, model, tokens, steps, names, repeats):
    warm = min(64, tokens.shape[1])
    interpkv.compare(model, tokens[:, :warm], steps=[warm // 2] + [1] * (warm - warm // 2), names=names)
    baseline(model, tokens[:, :warm], [warm])
    times = {"base": [], "cmp": []}
    peaks = {"base": [], "cmp": []}
    report = None
    for _ in range(repeats):
        _, t, p = measure(lambda: baseline(model, tokens, steps))
        times["base"].append(t)
        peaks["base"].append(p)
        report, t, p = measure(lambda: interpkv.compare(model, tokens, steps=steps, names=names))
        times["cmp"].append(t)
        peaks["cmp"].append(p)
        gc.collect()
    assert report.ok(atol=1e-4, rtol=1e-4), report.first_divergence(atol=1e-4, rtol=1e-4)
    ratio = statistics.median(c / b for c, b in zip(times["cmp"], times["base"]))
    print(
        f"{label:12} {tokens.shape[1]:6d} {len(steps):6d} {len(report.hooks):5d} "
        f"{statistics.median(times['base']):13.3f} {statistics.median(times['cmp']):12.3f} {ratio:6.2f} "
        f"{max(peaks['base']):9.0f} {max(peaks['cmp']):9.0f}",
        flush=True,
    )


def real_model(shape, n_tokens):
    hf = hf_model(shape, n_tokens, 0)
    model = zoo.from_hf(hf, label=f"bench-{shape}")
    vocab = hf.config.vocab_size
    del hf
    gc.collect()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, vocab


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["gpt2", "llama"], help="zoo models")
    parser.add_argument("--shapes", nargs="*", default=[], choices=sorted(REAL), help="real shapes")
    parser.add_argument("--names", default="all", choices=sorted(NAMES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = NAMES[args.names]
    print(f"names={args.names} threads={args.threads} repeats={args.repeats}; peak = VmHWM growth (MiB)")
    print(
        f"{'model':12} {'tokens':>6} {'chunks':>6} {'hooks':>5} {'forwards (s)':>13} {'compare (s)':>12} "
        f"{'ratio':>6} {'peak base':>9} {'peak cmp':>9}"
    )
    gen = torch.Generator().manual_seed(0)
    for name in args.models:
        model = zoo.load(name, dtype=torch.float32)
        tokens = torch.randint(0, model.cfg.d_vocab, (1, ZOO_TOKENS), generator=gen)
        steps = [ZOO_TOKENS // 2] + [1] * (ZOO_TOKENS // 2)
        bench(name, model, tokens, steps, names, args.repeats)
    for shape in args.shapes:
        n_tokens, steps = REAL[shape]
        model, vocab = real_model(shape, n_tokens)
        tokens = torch.randint(1, vocab, (1, n_tokens), generator=gen)
        bench(f"real-{shape}", model, tokens, steps, names, args.repeats)
        del model
        gc.collect()


if __name__ == "__main__":
    main()
