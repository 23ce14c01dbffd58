"""Benchmark: activation patching with a cached shared prefix vs TransformerLens.

A batch of prompts shares a long prefix and differs in its last tokens (the
usual clean/corrupt setup). ``resid_pre`` is patched at every layer and every
position, with interpkv (prefix run once, suffix recomputed per patch through a
frozen cache) and with TransformerLens's ``get_act_patch_resid_pre`` (the whole
sequence per patch). Prints both times, the speed-up and the largest
difference between the two result tensors.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_patching.py \\
        --model llama --batch 8 --prefix 512 --suffix 16
"""

import argparse
import time

import pandas as pd
import torch
from transformer_lens import patching as tl_patching  # the reference implementation

from interpkv import zoo
from interpkv.patching import patch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", help="zoo model (n_ctx must exceed prefix + suffix)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--suffix", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--skip-tl", action="store_true", help="time interpkv only")
    parser.add_argument(
        "--tl-sample",
        type=int,
        default=0,
        help="run TransformerLens on only this many (layer, pos) patches, spread over the grid, "
        "through the same generic_activation_patch code path, and extrapolate its time "
        "linearly to the full sweep (0 = the full get_act_patch_resid_pre sweep)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = zoo.load(args.model, dtype=torch.float32)
    d_vocab = model.cfg.d_vocab
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, d_vocab, (1, args.prefix), generator=gen).repeat(args.batch, 1)
    clean = torch.cat([prefix, torch.randint(0, d_vocab, (args.batch, args.suffix), generator=gen)], 1)
    corrupt = torch.cat([prefix, torch.randint(0, d_vocab, (args.batch, args.suffix), generator=gen)], 1)
    corrupt[:, args.prefix] = (clean[:, args.prefix] + 1) % d_vocab  # differ from the first suffix token
    answer = clean[:, -1]

    def metric(logits):
        return logits[torch.arange(logits.shape[0]), -1, answer].mean()

    n_patches = model.cfg.n_layers * clean.shape[1]
    print(
        f"model={args.model} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}), "
        f"batch={args.batch}, prefix={args.prefix}, suffix={args.suffix}, "
        f"{n_patches} resid_pre patches, torch threads={args.threads}"
    )

    start, cpu = time.perf_counter(), time.process_time()
    ours = patch(model, clean, corrupt, hook="resid_pre", metric=metric, progress=False)
    t_ours, c_ours = time.perf_counter() - start, time.process_time() - cpu
    print(f"interpkv.patching.patch (shared prefix): {t_ours:8.2f} s wall, {c_ours:8.2f} s CPU")
    print(f"  metric range over the sweep: [{ours.min().item():.4f}, {ours.max().item():.4f}]")
    if args.skip_tl:
        return

    tl = tl_patching
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    t_cache, c_cache = time.perf_counter() - start, time.process_time() - cpu  # once, not scaled
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if args.tl_sample:
            # The same per-patch code path as get_act_patch_resid_pre, on a subset of the grid.
            # TL's cost is the same for every patch (a full forward), so a sample extrapolates;
            # half the sample lies in the differing suffix, where the values are interesting.
            per_layer = max(2, args.tl_sample // model.cfg.n_layers)
            cols = torch.cat([
                torch.linspace(0, args.prefix - 1, per_layer // 2).long(),
                torch.linspace(args.prefix, clean.shape[1] - 1, per_layer - per_layer // 2).long(),
            ]).tolist()
            sample = pd.DataFrame(
                [(layer, col) for layer in range(model.cfg.n_layers) for col in cols], columns=["layer", "pos"]
            )
            values = tl.generic_activation_patch(
                model, corrupt, clean_cache, metric,
                patch_setter=tl.layer_pos_patch_setter, activation_name="resid_pre", index_df=sample,
            )
            theirs = ours[sample["layer"].tolist(), sample["pos"].tolist()]
            diff = (theirs - values).abs().max().item()
        else:
            full = tl.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
            diff = (ours - full).abs().max().item()
    t_tl, c_tl = time.perf_counter() - start, time.process_time() - cpu
    scale = n_patches / len(sample) if args.tl_sample else 1.0
    label = f"{len(sample)} sampled patches x {scale:.1f} (extrapolated)" if args.tl_sample else "full sweep"
    t_tl, c_tl = t_cache + t_tl * scale, c_cache + c_tl * scale
    print(f"transformer_lens get_act_patch_resid_pre: {t_tl:8.2f} s wall, {c_tl:8.2f} s CPU ({label})")
    print(f"speed-up: {t_tl / t_ours:.1f}x wall, {c_tl / c_ours:.1f}x CPU; max |difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
