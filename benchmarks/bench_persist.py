"""Benchmark: cache save/load against safetensors directly, file size, fork/repeat vs recompute.

Run:
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_persist.py [--seq 1024 --batch 4]
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_persist.py --sizes 64 1024 --repeats 5

Prints markdown tables (numbers go to docs/performance.md, section "Cache persistence").

- ``--sizes MIB ...`` (default ``64 1024``; ``--sizes`` alone skips them): the
  targets of the persistence work, at caches of those sizes (random keys and
  values through ``KVCache.from_state``, no forward): ``cache.save`` against
  ``safetensors.torch.save_file`` + ``fsync`` of the same tensors, and
  ``KVCache.load`` (every check, checksums included) against plain
  ``safe_open`` + ``get_tensor`` of every tensor (which maps the file and reads
  nothing) followed by one pass over each tensor (``sum``: the bytes are read,
  nothing is copied) or by ``clone`` (an owned copy, as a loaded cache needs:
  it is written into and must not change with the file). Each repetition runs ours and
  the baseline back to back (alternating which goes first); a ratio is the
  median of the per-repetition ratios, so adjacent runs share the machine's load.

- ``--candidate`` (with ``--sizes``): the persistence decision of issue 23.
  The safetensors library as the container (:mod:`persist_safetensors`: same
  format, XXH3 checksums and checks kept) and today's engine, each against
  ``save_file`` + ``fsync`` and ``safe_open`` + ``clone``, in interleaved pairs;
  the load average is printed before and after each size.

- save: ``cache.save(path)`` (write to a temp file + fsync + atomic rename) against
  ``safetensors.torch.save_file`` of the same tensors (no fsync), and against the
  same plus an fsync (what a durable write costs anyway).
- load: ``KVCache.load(path, model)`` (reads, checks the header, the model
  fingerprint and the positions) against ``safetensors.torch.load_file`` (which
  maps the file and reads nothing until a tensor is touched), the same plus one
  pass over every tensor, and ``safetensors.torch.load(bytes)``.
- size: file bytes against ``cache.nbytes`` (the difference is the header and
  ``next_positions``).
- fork / repeat(n): against recomputing the prefix with one uncached forward.
"""

import argparse
import os
import statistics
import tempfile
import time

import persist_safetensors
import safetensors.torch
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import interpkv
from interpkv.cache.persist import cachefile as persist


def build(args) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=args.layers, d_model=args.d_model, d_head=args.d_model // args.heads,
        n_heads=args.heads, n_key_value_heads=args.kv_heads, d_mlp=4 * args.d_model,
        n_ctx=args.seq, d_vocab=1000, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=args.d_model // args.heads,
        gated_mlp=True, dtype=torch.float32,
    )
    torch.manual_seed(0)
    model = HookedTransformer(cfg)
    model.eval()
    return model


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fsync_save(tensors, path):
    safetensors.torch.save_file(tensors, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def synthetic_cache(model: HookedTransformer, mib: int, batch: int) -> "interpkv.KVCache":
    """A cache of about ``mib`` MiB of random keys and values for ``model`` (no forward)."""
    cfg = model.cfg
    per_position = 2 * cfg.n_layers * batch * cfg.n_key_value_heads * cfg.d_head * 4
    length = max(1, mib * 2**20 // per_position)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, cfg.n_key_value_heads, length, cfg.d_head)
    keys = [torch.randn(shape, generator=gen) for _ in range(cfg.n_layers)]
    values = [torch.randn(shape, generator=gen) for _ in range(cfg.n_layers)]
    positions = torch.arange(length).repeat(batch, 1)
    return interpkv.KVCache.from_state(model, keys, values, positions, torch.full((batch,), length),
                                       copy=False)


def safe_open_read(path, touch):
    """Every tensor through ``safe_open`` / ``get_tensor`` (a view of the file's mapping), then ``touch``."""
    with safetensors.safe_open(path, framework="pt") as f:
        return {name: touch(f.get_tensor(name)) for name in f.keys()}


def paired(ours, base, repeats: int):
    """Median time of each and median of the per-repetition ratios base/ours (alternating order)."""
    mine, theirs, ratios = [], [], []
    for rep in range(repeats):
        pair = []
        for fn in ((ours, base) if rep % 2 == 0 else (base, ours)):
            start = time.perf_counter()
            fn()
            pair.append(time.perf_counter() - start)
        a, b = pair if rep % 2 == 0 else pair[::-1]
        mine.append(a)
        theirs.append(b)
        ratios.append(b / a)
    return statistics.median(mine), statistics.median(theirs), statistics.median(ratios), ratios


def bench_model(args) -> HookedTransformer:
    """The rotary GQA model whose caches both tables save and load (weights seeded, never run)."""
    cfg = HookedTransformerConfig(
        n_layers=args.layers, d_model=args.d_model, d_head=args.d_model // args.heads,
        n_heads=args.heads, n_key_value_heads=args.kv_heads, d_mlp=4 * args.d_model, n_ctx=64,
        d_vocab=1000, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=args.d_model // args.heads, gated_mlp=True, dtype=torch.float32,
    )
    torch.manual_seed(0)
    return HookedTransformer(cfg).eval()


def library_tensors(cache) -> dict:
    """The cache's used slots as the plain tensor dict the safetensors baselines write and read."""
    tensors = {"positions": cache.positions, "next_positions": cache.next_positions}
    for i, layer in enumerate(cache.layers):
        tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = layer.view(cache.seq_len)
    return tensors


def sizes_table(args) -> None:
    """Save and load ratios at each of ``args.sizes`` MiB (see the module docstring)."""
    model = bench_model(args)
    print("| cache | save MiB/s: interpkv / save_file + fsync | save ratio | load MiB/s: interpkv / safe_open + "
          "one pass / safe_open + clone | load ratio (one pass) | load ratio (clone) |")
    print("|---|---|---|---|---|---|")
    for mib in args.sizes:
        cache = synthetic_cache(model, mib, args.batch)
        workdir = tempfile.mkdtemp(dir=args.dir)
        ours, direct = os.path.join(workdir, "ours.safetensors"), os.path.join(workdir, "direct.safetensors")
        tensors = library_tensors(cache)
        size = cache.nbytes / 2**20
        cache.save(ours)  # warm-up: the weights fingerprint is memoized, files exist for the loads
        fsync_save(tensors, direct)
        s_ours, s_base, s_ratio, s_all = paired(lambda: cache.save(ours), lambda: fsync_save(tensors, direct),
                                                args.repeats)
        loads = [paired(lambda: interpkv.KVCache.load(ours, model), lambda: safe_open_read(direct, touch),
                        args.repeats) for touch in (torch.Tensor.sum, torch.Tensor.clone)]
        (l_ours, l_pass, p_ratio, p_all), (_, l_clone, c_ratio, c_all) = loads
        print(f"| {size:.0f} MiB | {size / s_ours:.0f} / {size / s_base:.0f} | {s_ratio:.2f}x "
              f"[{min(s_all):.2f}-{max(s_all):.2f}] | {size / l_ours:.0f} / {size / l_pass:.0f} / "
              f"{size / l_clone:.0f} | {p_ratio:.2f}x [{min(p_all):.2f}-{max(p_all):.2f}] | "
              f"{c_ratio:.2f}x [{min(c_all):.2f}-{max(c_all):.2f}] |", flush=True)
        cache = tensors = None  # free the memory before the next size
        for path in (ours, direct):
            os.unlink(path)
        os.rmdir(workdir)
    print(f"\nratio = baseline time / interpkv time (>= 0.8 is the target), median of {args.repeats} "
          "paired repetitions [min-max]; fsync on both sides.\n")


def candidate_table(args) -> None:
    """Today's engine and the safetensors-container candidate, each against the library's own save and load."""
    model = bench_model(args)
    print("| cache | load avg (1 min) before/after | save vs save_file + fsync: engine / candidate | "
          "validated load vs safe_open + clone: engine / candidate |")
    print("|---|---|---|---|")
    for mib in args.sizes:
        before = os.getloadavg()[0]
        cache = synthetic_cache(model, mib, args.batch)
        workdir = tempfile.mkdtemp(dir=args.dir)
        ours, cand, direct = (os.path.join(workdir, f"{n}.safetensors") for n in ("ours", "cand", "direct"))
        tensors = library_tensors(cache)
        cache.save(ours)  # warm-up: the weights fingerprint is memoized, files exist for the loads
        persist_safetensors.save(cache, cand)
        fsync_save(tensors, direct)
        base_save = lambda: fsync_save(tensors, direct)  # noqa: E731
        base_load = lambda: safe_open_read(direct, torch.Tensor.clone)  # noqa: E731
        rows = {}
        rows["save engine"] = paired(lambda: cache.save(ours), base_save, args.repeats)
        rows["save candidate"] = paired(lambda: persist_safetensors.save(cache, cand), base_save, args.repeats)
        rows["load engine"] = paired(lambda: interpkv.KVCache.load(ours, model), base_load, args.repeats)
        rows["load candidate"] = paired(lambda: persist_safetensors.load(cand, model, interpkv.KVCache),
                                        base_load, args.repeats)
        after = os.getloadavg()[0]

        size = cache.nbytes / 2**20

        def cell(key):
            mine, theirs, ratio, all_ratios = rows[key]
            return (f"{ratio:.2f}x [{min(all_ratios):.2f}-{max(all_ratios):.2f}] "
                    f"({size / mine:,.0f} vs {size / theirs:,.0f} MiB/s)")

        print(f"| {cache.nbytes / 2**20:.0f} MiB | {before:.1f} / {after:.1f} | {cell('save engine')} / "
              f"{cell('save candidate')} | {cell('load engine')} / {cell('load candidate')} |", flush=True)
        cache = tensors = None  # type: ignore[assignment]  # free them before the next size
        for path in (ours, cand, direct):
            os.unlink(path)
        os.rmdir(workdir)
    print(f"\nratio = library time / our time (>= 0.8 is the bar), median of {args.repeats} interleaved "
          "pairs [min-max]; fsync on every save.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat-n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where to write files (default: a temp dir)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 1024],
                        help="cache sizes in MiB for the save/load ratio table (none: skip it)")
    parser.add_argument("--only-sizes", action="store_true", help="print only the size table")
    parser.add_argument("--candidate", action="store_true",
                        help="with --sizes: the safetensors-container candidate against today's engine (only that)")
    args = parser.parse_args()
    if args.candidate:
        candidate_table(args)
        return
    if args.sizes:
        sizes_table(args)
    if args.only_sizes:
        return

    model = build(args)
    tokens = torch.randint(0, 1000, (args.batch, args.seq))
    cache = interpkv.KVCache.for_model(model, args.batch)
    with torch.no_grad():
        interpkv.forward(model, tokens, cache=cache)
    mb = cache.nbytes / 2**20

    workdir = tempfile.mkdtemp(dir=args.dir)
    ours, direct = os.path.join(workdir, "ours.safetensors"), os.path.join(workdir, "direct.safetensors")
    tensors = {"positions": cache.positions.contiguous(), "next_positions": cache.next_positions}
    for i, layer in enumerate(cache.layers):
        keys, values = layer.view(cache.seq_len)
        tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = keys.contiguous(), values.contiguous()

    start = time.perf_counter()
    persist.weights_fingerprint(model)  # sampled hash of the used weights, paid by every save and load
    hash_s = time.perf_counter() - start

    save_ours = timed(lambda: cache.save(ours), args.repeats)
    save_direct = timed(lambda: safetensors.torch.save_file(tensors, direct), args.repeats)
    save_fsync = timed(lambda: fsync_save(tensors, direct), args.repeats)
    load_ours = timed(lambda: interpkv.KVCache.load(ours, model), args.repeats)
    load_lazy = timed(lambda: safetensors.torch.load_file(direct), args.repeats)
    load_touch = timed(lambda: [t.sum() for t in safetensors.torch.load_file(direct).values()],
                       args.repeats)
    load_bytes = timed(lambda: safetensors.torch.load(open(direct, "rb").read()), args.repeats)
    size = os.path.getsize(ours)

    with torch.no_grad():
        fork_s = timed(cache.fork, args.repeats)
        repeat_s = timed(lambda: cache.repeat(args.repeat_n), args.repeats)
        recompute_s = timed(lambda: interpkv.forward(model, tokens), max(3, args.repeats // 2))
        recompute_rep_s = timed(
            lambda: interpkv.forward(model, tokens.repeat_interleave(args.repeat_n, 0)), 3
        )

    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads / "
          f"{args.kv_heads} kv heads, float32; cache: batch {args.batch} x {args.seq} positions "
          f"= {mb:.1f} MiB; torch threads {torch.get_num_threads()}\n")
    print("| operation | interpkv | baseline | ratio (baseline / interpkv time) |")
    print("|---|---|---|---|")
    print(f"| save | {mb / save_ours:.0f} MiB/s | safetensors save_file {mb / save_direct:.0f} MiB/s"
          f" | {save_direct / save_ours:.2f}x |")
    print(f"| save | {mb / save_ours:.0f} MiB/s | save_file + fsync {mb / save_fsync:.0f} MiB/s"
          f" | {save_fsync / save_ours:.2f}x |")
    for label, base in (("load_file (lazy mmap, reads no data)", load_lazy),
                        ("load_file + read every tensor once", load_touch),
                        ("load(f.read()) (read-only tensors)", load_bytes)):
        print(f"| load (validated) | {mb / load_ours:.0f} MiB/s | {label} {mb / base:.0f} MiB/s"
              f" | {base / load_ours:.2f}x |")
    print(f"| fork | {fork_s * 1e3:.1f} ms | recompute prefix {recompute_s * 1e3:.0f} ms "
          f"| {recompute_s / fork_s:.0f}x |")
    print(f"| repeat({args.repeat_n}) | {repeat_s * 1e3:.1f} ms | recompute {args.repeat_n}x prefix "
          f"{recompute_rep_s * 1e3:.0f} ms | {recompute_rep_s / repeat_s:.0f}x |")
    print(f"\nfile {size} bytes, nbytes {cache.nbytes}: file - nbytes = {size - cache.nbytes} bytes "
          f"({(size - cache.nbytes) / cache.nbytes:.4%}; next_positions {8 * args.batch} + header)")
    print(f"weights fingerprint (sampled sha256, every save and load): {hash_s * 1e3:.0f} ms")
    for path in (ours, direct):
        os.unlink(path)
    os.rmdir(workdir)


if __name__ == "__main__":
    main()
