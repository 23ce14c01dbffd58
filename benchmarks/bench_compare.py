"""Cost of ``interpkv.compare`` against the forwards it is made of.

compare = one uncached forward recording every hook + one cached run
(a 128-token prefill, then 128 single-token steps) compared hook by hook.
The baseline is exactly those two runs without capture (interpkv.forward, fused
attention: nothing hooked). Target: <= 2x.

    PYTHONPATH=. python benchmarks/bench_compare.py [--models gpt2 llama] [--repeats 3]
"""

import argparse
import statistics
import time

import torch

import interpkv
from interpkv import zoo

PREFILL, TOTAL = 128, 256


def baseline(model, tokens, steps):
    with torch.no_grad():
        interpkv.forward(model, tokens)
        cache = interpkv.KVCache.for_model(model, tokens.shape[0])
        start = 0
        for n in steps:
            interpkv.forward(model, tokens[:, start : start + n], cache=cache)
            start += n


def timed(fn, repeats):
    fn()  # warm-up (rotary tables, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = [PREFILL] + [1] * (TOTAL - PREFILL)
    print(f"{'model':8} {'hooks':>5} {'forwards (s)':>13} {'compare (s)':>12} {'ratio':>6}")
    for name in args.models:
        model = zoo.load(name, dtype=torch.float32)
        tokens = torch.randint(0, model.cfg.d_vocab, (1, TOTAL), generator=torch.Generator().manual_seed(0))
        base = timed(lambda: baseline(model, tokens, steps), args.repeats)
        report = interpkv.compare(model, tokens, steps=steps)
        cost = timed(lambda: interpkv.compare(model, tokens, steps=steps), args.repeats)
        assert report.ok(atol=1e-4, rtol=1e-4), report.first_divergence(atol=1e-4, rtol=1e-4)
        print(f"{name:8} {len(report.hooks):5d} {base:13.3f} {cost:12.3f} {cost / base:6.2f}")


if __name__ == "__main__":
    main()
