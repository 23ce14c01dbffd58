"""What cache provenance costs a decode step: interpkv.forward with it and with it switched off.

One process, one model, the same cache state: decode steps of one token
through a caller's cache (``interpkv.forward(model, token, cache=cache,
logits="last")``), alternating blocks of steps with provenance on (as
shipped) and off (``interpkv.core.forward``'s ``provenance`` replaced by a
stub whose ``NONE`` is None, which skips the collection, the check and the
recording). Blocks alternate so both see the same machine load; the result is
the median over blocks of (on - off) per step, next to the step time.

Cases: no hooks (the path the "not measurable" claim is about); one steering
hook (``interpkv.steering.add`` on a middle layer: the hook's edit is noted
each step and compared with the span by equality).

    python benchmarks/bench_provenance.py            # zoo gpt2 + toy shape, 40 blocks of 25 steps
    python benchmarks/bench_provenance.py --quick
"""

import argparse
import statistics
import time
import types

import torch

import interpkv
import interpkv.core.forward as forward_module

OFF = types.SimpleNamespace(NONE=None)


def models(quick: bool):
    yield "zoo gpt2 (2 layers, d_model 64)", interpkv.zoo.load("gpt2")
    if not quick:
        yield "zoo llama (GQA, rotary)", interpkv.zoo.load("llama")


def run(model, hooked: bool, blocks: int, steps: int):
    on_module = forward_module.provenance
    hooks = []
    if hooked:
        layer = model.cfg.n_layers // 2
        hooks = [(f"blocks.{layer}.hook_resid_post", interpkv.steering.add(torch.ones(model.cfg.d_model) * 0.1))]
    token = torch.tensor([[1]])
    times = {"on": [], "off": []}
    with torch.no_grad():
        for block in range(blocks):
            for label in ("on", "off") if block % 2 == 0 else ("off", "on"):
                forward_module.provenance = on_module if label == "on" else OFF
                try:
                    cache = interpkv.KVCache.for_model(model, capacity=256)
                    interpkv.forward(model, torch.arange(1, 33)[None], cache=cache, fwd_hooks=hooks)
                    start = time.perf_counter()
                    for _ in range(steps):
                        interpkv.forward(model, token, cache=cache, fwd_hooks=hooks, logits="last")
                    times[label].append((time.perf_counter() - start) / steps)
                finally:
                    forward_module.provenance = on_module
    diffs = [a - b for a, b in zip(times["on"], times["off"])]
    return statistics.median(times["off"]), statistics.median(diffs), statistics.quantiles(diffs, n=4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    blocks = args.blocks or (10 if args.quick else 40)
    torch.set_num_threads(1)
    print(f"{'model':34} {'hooks':6} {'step (off)':>11} {'on - off':>10} {'IQR of on - off':>22}")
    for name, model in models(args.quick):
        for hooked in (False, True):
            step, diff, (q1, _, q3) = run(model, hooked, blocks, args.steps)
            print(f"{name:34} {'steer' if hooked else 'none':6} {step * 1e6:9.0f}us {diff * 1e6:8.1f}us "
                  f"{q1 * 1e6:9.1f} .. {q3 * 1e6:6.1f}us ({diff / step:+.1%})")


if __name__ == "__main__":
    main()
