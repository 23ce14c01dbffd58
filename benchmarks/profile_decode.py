"""Profile the decode steps (not the prefill) of interpkv.generate and HF generate at a real shape.

The profiler starts at the second forward call (a pre-hook on the token embedding) and stops when
generate returns: new - 1 decode steps with each library's per-token loop overhead. Prints the
top ATen ops by self CPU time per step.

    python benchmarks/profile_decode.py SHAPE PROMPT [THREADS [BATCH]]
    python benchmarks/profile_decode.py llama 1024 1
    python benchmarks/profile_decode.py gpt2 128 1 8      # batch 8, ragged left padding

Shapes as in bench_decode.py (random weights, no download).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import interpkv  # noqa: E402
from interpkv import zoo  # noqa: E402

shape, prompt_len = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
hf = bench_decode.hf_model(shape, prompt_len, 16)
model = zoo.from_hf(hf, label="prof")
for p in model.parameters():
    p.requires_grad_(False)
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 1
prompt = torch.randint(1, hf.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
mask = torch.ones_like(prompt)
for row in range(batch):
    mask[row, : row * prompt_len // (2 * batch)] = 0
new = 9

class Starter:
    def __init__(self):
        self.n, self.prof, self.t = 0, None, None

    def __call__(self, module, args):
        self.n += 1
        if self.n == 2 and self.prof is not None:
            self.t = time.perf_counter()
            self.prof.start()
starter = Starter()
model.embed.register_forward_pre_hook(starter)
hf.get_input_embeddings().register_forward_pre_hook(starter)

def ikv():
    interpkv.generate(model, prompt, attention_mask=mask, max_new_tokens=new)
def hfg():
    hf.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, use_cache=True, pad_token_id=0)
for f in (ikv, hfg):
    f()
for name, fn in (("interpkv", ikv), ("hf", hfg)):
    starter.n = 0
    starter.prof = profile(activities=[ProfilerActivity.CPU])
    fn()
    wall = (time.perf_counter() - starter.t) / (new - 1) * 1000
    starter.prof.stop()
    events = starter.prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1000 / (new - 1)
    print(f"== {name} {shape}:{prompt_len}: per decode step {wall:.1f} ms wall, {total:.1f} ms self CPU of ops (profiled)")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"   {e.key:45s} {e.self_cpu_time_total / 1000 / (new - 1):8.2f} ms  {e.count / (new - 1):6.1f} calls")
    starter.prof = None
