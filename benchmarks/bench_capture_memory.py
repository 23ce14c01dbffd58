"""Memory of ``generate(..., capture=...)`` against the number of steps (issue 24).

For 1k / 2k / 4k greedy steps of the zoo llama (batch 1) recording one hook,
prints the bytes the generation keeps *besides* the activations themselves
(per-step bookkeeping: step masks, token lists) and the process's peak RSS
growth. Run it on two trees to compare::

    PYTHONPATH=/path/to/tree python benchmarks/bench_capture_memory.py
"""

import gc
import resource
import sys
import time

import torch

import interpkv


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bookkeeping_bytes(out) -> int:
    records = out.records
    masks = getattr(records, "step_valid", None)  # older trees: one mask per step
    if masks is not None:
        return sum(m.numel() * m.element_size() for m in masks)
    step_of = records.step_of
    return step_of.numel() * step_of.element_size()


def main(steps=(1000, 2000, 4000)) -> None:
    model = interpkv.zoo.load("llama")
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    interpkv.generate(model, prompt, max_new_tokens=4, capture="blocks.0.hook_resid_post")  # warm-up
    print(f"tree: {interpkv.__file__}")
    print("steps  bookkeeping_MB  record_MB  peak_rss_growth_MB")
    for n in steps:
        gc.collect()
        before, t0 = peak_rss_mb(), time.perf_counter()
        out = interpkv.generate(model, prompt, max_new_tokens=n, capture="blocks.0.hook_resid_post")
        record = sum(t.numel() * t.element_size() for t in out.record.activations.values())
        print(f"{n:5d}  {bookkeeping_bytes(out) / 1e6:14.3f}  {record / 1e6:9.3f}  {peak_rss_mb() - before:18.1f}"
              f"  ({time.perf_counter() - t0:.0f} s)")
        del out
        sys.stdout.flush()


if __name__ == "__main__":
    main(tuple(int(a) for a in sys.argv[1:]) or (1000, 2000, 4000))
