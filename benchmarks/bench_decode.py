"""Decode throughput: interpkv's cached loop vs TransformerLens vs HF.

A Llama-style model (4 layers, d_model 256, 8 heads, 4 kv heads), the same
weights in all runs, greedy decoding of ``--new`` tokens after prompts of 16
and 1024 tokens, batch 1, float32 on CPU. Reported: tokens/s per method and
ratios measured in the same run, and the cache's bytes vs TransformerLens's.

    python benchmarks/bench_decode.py [--prompts 16 1024] [--new 128] [--repeats 2]
"""

import argparse
import json
import time

import torch
import transformers

import interpkv
from interpkv import zoo


def build(seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        initializer_range=0.05,
        bos_token_id=None,
        eos_token_id=None,  # no EOS: HF would otherwise suppress it (min_new_tokens) and diverge
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.config._attn_implementation = "sdpa"
    return zoo.from_hf(hf, label="bench-llama"), hf


@torch.no_grad()
def interpkv_decode(model, prompt, new):
    cache = interpkv.KVCache.for_model(model, capacity=prompt.shape[1] + new)
    logits = interpkv.forward(model, prompt, cache=cache)
    out, steps = [], []
    for _ in range(new):
        steps.append(logits[:, -1])
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        logits = interpkv.forward(model, token, cache=cache)
    cache.step_logits = torch.stack(steps, 1)  # (B, new, d_vocab), for the parity column
    return torch.cat(out, 1), cache


@torch.no_grad()
def teacher_forced_gap(hf, prompt, tokens, step_logits):
    """max |our step logits - HF logits| on the sequence we generated (greedy
    token agreement with a random model flips on near-ties, so logits are compared)."""
    full = torch.cat([prompt, tokens], 1)
    ref = hf(full).logits[:, prompt.shape[1] - 1 : -1]
    return (ref - step_logits).abs().max().item()


@torch.no_grad()
def tl_decode(model, prompt, new, use_cache):
    out = model.generate(
        prompt, max_new_tokens=new, do_sample=False, use_past_kv_cache=use_cache,
        verbose=False, stop_at_eos=False, return_type="tokens",
    )
    return out[:, prompt.shape[1]:]


@torch.no_grad()
def hf_decode(hf, prompt, new):
    out = hf.generate(prompt, max_new_tokens=new, do_sample=False)
    return out[:, prompt.shape[1]:]


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def tl_cache_bytes(model, prompt, new):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, prompt.shape[0])
    tokens = torch.randint(0, model.cfg.d_vocab, (prompt.shape[0], prompt.shape[1] + new))
    with torch.no_grad():
        model(tokens, past_kv_cache=cache, attention_mask=torch.ones_like(tokens))
    return sum(e.past_keys.numel() * e.past_keys.element_size() * 2 for e in cache.entries)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 1024])
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-tl-uncached-over", type=int, default=4096)
    parser.add_argument("--json", help="also write results here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, hf = build()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length in args.prompts:
        prompt = torch.randint(0, 512, (1, length), generator=gen)
        t_ikv, (ours, cache) = timed(lambda: interpkv_decode(model, prompt, args.new), args.repeats)
        t_hf, theirs = timed(lambda: hf_decode(hf, prompt, args.new), args.repeats)
        t_tl, tl_tokens = timed(lambda: tl_decode(model, prompt, args.new, True), 1)
        row = {
            "prompt": length,
            "new": args.new,
            "interpkv_tok_s": args.new / t_ikv,
            "hf_tok_s": args.new / t_hf,
            "tl_cache_tok_s": args.new / t_tl,
            "agree_hf": float((ours == theirs).float().mean()),
            "teacher_forced_max_abs_vs_hf": teacher_forced_gap(hf, prompt, ours, cache.step_logits),
            "agree_tl": float((ours == tl_tokens).float().mean()),
            "interpkv_cache_bytes": cache.nbytes,
            "tl_cache_bytes": tl_cache_bytes(model, prompt, args.new),
        }
        if length <= args.skip_tl_uncached_over:
            t_nc, _ = timed(lambda: tl_decode(model, prompt, args.new, False), 1)
            row["tl_nocache_tok_s"] = args.new / t_nc
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("| prompt | interpkv tok/s | HF generate tok/s | TL generate (cache) tok/s | TL generate (no cache) tok/s | interpkv / HF | interpkv / TL cache | max abs dlogit vs HF (teacher forced) | greedy tokens equal to HF's | cache bytes interpkv / TL |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        nc = r.get("tl_nocache_tok_s")
        print(
            f"| {r['prompt']} | {r['interpkv_tok_s']:.1f} | {r['hf_tok_s']:.1f} | {r['tl_cache_tok_s']:.1f} | "
            f"{'-' if nc is None else f'{nc:.1f}'} | {r['interpkv_tok_s'] / r['hf_tok_s']:.2f}x | "
            f"{r['interpkv_tok_s'] / r['tl_cache_tok_s']:.1f}x | {r['teacher_forced_max_abs_vs_hf']:.1e} | {r['agree_hf']:.2f} | "
            f"{r['interpkv_cache_bytes']:,} / {r['tl_cache_bytes']:,} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
