"""What cache provenance costs a decode step: interpkv.forward with it and with it switched off.

One process, one model: decode steps of one token through a caller's cache
(``interpkv.forward(model, token, cache=cache, logits="last")``), with
provenance on (as shipped) and off (``interpkv.core.forward``'s
``provenance`` replaced by a stub whose ``NONE`` is None, which skips the
collection, the check and the recording), alternating step by step (on, off,
off, on, ...) so both see the same machine load and cache lengths. Reported:
the median step time of each, and the median over adjacent pairs of
(on - off).

Cases: no hooks (the path the "not measurable" claim is about); one steering
hook (``interpkv.steering.add`` on a middle layer: the hook's edit is noted
each step and compared with the span by equality).

    python benchmarks/bench_provenance.py            # zoo gpt2 and llama, 2000 pairs per case
    python benchmarks/bench_provenance.py --quick
"""

import argparse
import statistics
import time
import timeit
import types

import torch

import interpkv
import interpkv.core.forward as forward_module

OFF = types.SimpleNamespace(NONE=None)


def models(quick: bool):
    yield "zoo gpt2 (2 layers, d_model 64)", interpkv.zoo.load("gpt2")
    if not quick:
        yield "zoo llama (GQA, rotary)", interpkv.zoo.load("llama")


def run(model, hooked: bool, pairs: int):
    """Per-step times with provenance on and off, alternating step by step (on, off, off, on, ...)."""
    on_module = forward_module.provenance
    hooks = []
    if hooked:
        layer = model.cfg.n_layers // 2
        hooks = [(f"blocks.{layer}.hook_resid_post", interpkv.steering.add(torch.ones(model.cfg.d_model) * 0.1))]
    token = torch.tensor([[1]])
    times = {"on": [], "off": []}
    with torch.no_grad():
        cache = None
        for i in range(2 * pairs):
            if i % 100 == 0:  # a fresh cache now and then: the history stays short (n_ctx) and alike
                cache = interpkv.KVCache.for_model(model, capacity=256)
                interpkv.forward(model, torch.arange(1, 33)[None], cache=cache, fwd_hooks=hooks)
            label = "on" if (i % 4) in (0, 3) else "off"
            forward_module.provenance = on_module if label == "on" else OFF
            try:
                start = time.perf_counter()
                interpkv.forward(model, token, cache=cache, fwd_hooks=hooks, logits="last")
                times[label].append(time.perf_counter() - start)
            finally:
                forward_module.provenance = on_module
    diffs = [a - b for a, b in zip(times["on"], times["off"])]
    return statistics.median(times["off"]), statistics.median(times["on"]), statistics.median(diffs)


def direct(model, repeats: int = 20000) -> float:
    """Seconds per call of exactly what an unhooked cached step runs for provenance (timeit, best of 5)."""
    provenance, calls = forward_module.provenance, forward_module.calls
    cache = interpkv.KVCache.for_model(model)
    with torch.no_grad():
        interpkv.forward(model, torch.arange(1, 9)[None], cache=cache)

    def added():
        points = provenance.model_hook_points(model)
        if points or calls.active_hooks():
            raise AssertionError("the model holds hooks: not the unhooked path")
        acting = provenance.check(model, cache, ((), ()), None)
        provenance.written(cache, acting, cache.appended)

    return min(timeit.repeat(added, number=repeats, repeat=5)) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=None, help="on/off step pairs per case (default 2000)")
    args = parser.parse_args()
    pairs = args.pairs or (300 if args.quick else 2000)
    torch.set_num_threads(1)
    print(f"{'model':34} {'hooks':6} {'step off':>9} {'step on':>9} {'median(on - off)':>17}")
    for name, model in models(args.quick):
        print(f"{name:34} {'none':6} provenance work per step, timed alone: {direct(model) * 1e6:.2f}us")
        for hooked in (False, True):
            off, on, diff = run(model, hooked, pairs)
            print(f"{name:34} {'steer' if hooked else 'none':6} {off * 1e6:7.0f}us {on * 1e6:7.0f}us "
                  f"{diff * 1e6:9.1f}us ({diff / off:+.2%})")


if __name__ == "__main__":
    main()
