"""Train the character-level zoo models shipped with ``interpkv.zoo.load(name, trained=True)``.

One small HuggingFace model per positional-scheme family, trained from scratch
on Python standard-library docstrings (see ``interpkv/zoo/_corpus.py``; no
download) with the 97-id character vocabulary of ``interpkv/zoo/charvocab.py``:

- ``gpt2``  (``GPT2LMHeadModel``): learned absolute positions,
- ``llama`` (``LlamaForCausalLM``): rotary, grouped-query attention (4 query / 2 kv heads),
- ``bloom`` (``BloomForCausalLM``): ALiBi.

Usage (from the repository root)::

    python scripts/train_zoo.py --seed 0            # all three, ~3-5 min each on 2 idle cores
    python scripts/train_zoo.py --models llama --steps 50 --out /tmp/zoo   # quick try

Writes, per model, ``<out>/<name>.safetensors`` (the HF state dict in
bfloat16, tied weights stored once) and ``<out>/<name>.json`` (HF config and
training metadata: seed, steps, losses, corpus description and hashes, greedy
samples), and ``tests/data/zoo_valid.txt.gz`` (the validation split, so the
recorded validation loss can be checked on any Python version).

The recorded ``val_loss`` is the mean next-character negative log-likelihood
(nats/char) of the *shipped* (bfloat16-rounded) weights, computed in float32
with eager attention over non-overlapping windows of ``context`` characters of
the validation split (every window, the last one shorter).

Reproducibility: with the same seed, torch version, thread count and Python
standard library, the run is deterministic (fixed step count, seeded data
order); across machines, float reductions may differ in the last bits.
"""

import argparse
import gzip
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interpkv.zoo import _corpus, charvocab  # noqa: E402

V = charvocab.VOCAB_SIZE
CONTEXT = 128
PROMPTS = ("def ", "Return the ")

MODELS = {
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=V, n_positions=CONTEXT, n_ctx=CONTEXT, n_embd=128, n_layer=3, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
        ),
    ),
    "llama": (
        "LlamaConfig",
        dict(
            vocab_size=V, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=4 * CONTEXT, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=None,
        ),
    ),
    "bloom": (
        "BloomConfig",
        dict(
            vocab_size=V, hidden_size=128, n_layer=3, n_head=4,
            hidden_dropout=0.0, attention_dropout=0.0,
            bos_token_id=0, eos_token_id=0, pad_token_id=None, tie_word_embeddings=True,
        ),
    ),
}


def build_hf(name: str, seed: int) -> transformers.PreTrainedModel:
    cls_name, kwargs = MODELS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa" if name != "bloom" else "eager")
    return model


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def val_loss(model, ids: torch.Tensor, context: int, batch: int = 32) -> float:
    """Mean next-char NLL over non-overlapping windows (see module docstring)."""
    starts = list(range(0, len(ids) - 1, context))
    total, count = 0.0, 0
    full = [s for s in starts if s + context + 1 <= len(ids)]
    rest = [s for s in starts if s not in set(full)]
    for group in [full[i : i + batch] for i in range(0, len(full), batch)] + [[s] for s in rest]:
        n = min(context, len(ids) - 1 - group[0])
        x = torch.stack([ids[s : s + n] for s in group])
        y = torch.stack([ids[s + 1 : s + n + 1] for s in group])
        logits = model(x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum")
        total += nll.item()
        count += y.numel()
    return total / count


@torch.no_grad()
def greedy(model, prompt: str, n: int, context: int) -> str:
    ids = charvocab.encode(prompt)[None]
    for _ in range(n):
        logits = model(ids[:, -context:]).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return charvocab.decode(ids[0])


def unique_state_dict(model) -> dict:
    """The state dict with tied tensors stored once (first key wins)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        ptr = v.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().contiguous()
    return out


def train_one(name, args, train_ids, valid_ids, corpus_info):
    torch.manual_seed(args.seed)
    model = build_hf(name, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.time()
    log = []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, len(train_ids) - args.context - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + args.context] for s in starts.tolist()])
        y = torch.stack([train_ids[s + 1 : s + args.context + 1] for s in starts.tolist()])
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            log.append((step, round(loss.item(), 4)))
            print(f"[{name}] step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    train_seconds = time.time() - t0

    # Round to the shipped dtype, then measure what ships.
    state = {k: v.to(torch.bfloat16) for k, v in unique_state_dict(model).items()}
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.tie_weights()
    model.eval()
    model.config._attn_implementation = "eager"
    for module in model.modules():  # eager attention for the recorded numbers
        if hasattr(module, "config") and module.config is not model.config:
            module.config._attn_implementation = "eager"
    vl = val_loss(model, valid_ids, args.context)
    tail = train_ids[-(64 * args.context + 1):]  # a fixed slice of training text, same protocol
    tl = val_loss(model, tail, args.context)
    samples = {p: greedy(model, p, args.sample_chars, args.context) for p in PROMPTS}
    print(f"[{name}] val {vl:.4f} train-slice {tl:.4f} in {train_seconds:.0f}s")
    for p, s in samples.items():
        print(f"[{name}] sample {p!r}: {s!r}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / f"{name}.safetensors"), metadata={"format": "pt", "hf_class": type(model).__name__})
    cls_name, _ = MODELS[name]
    config = model.config.to_dict()
    config["_attn_implementation"] = "eager"
    meta = {
        "name": name,
        "architecture": type(model).__name__,
        "hf_config_class": cls_name,
        "hf_config": config,
        "weights_dtype": "bfloat16",
        "n_params": n_params,
        "vocab": "interpkv.zoo.charvocab (97 ids: newline, printable ASCII, unknown)",
        "training": {
            "seed": args.seed,
            "steps": args.steps,
            "batch": args.batch,
            "context": args.context,
            "lr": args.lr,
            "warmup": args.warmup,
            "schedule": "linear warmup, cosine to 10% of lr",
            "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.1 on matrices), grad clip 1.0",
            "threads": torch.get_num_threads(),
            "seconds": round(train_seconds, 1),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": platform.machine(),
            "loss_log": log,
        },
        "train_loss": round(tl, 6),
        "train_loss_note": f"same protocol as val_loss on the last {64 * args.context + 1} chars of the train split",
        "val_loss": round(vl, 6),
        "val_loss_note": "mean next-char NLL (nats/char) of the shipped bfloat16 weights in float32, "
        f"eager attention, non-overlapping windows of {args.context} chars over the whole validation split",
        "corpus": corpus_info,
        "samples": samples,
        "sample_note": f"greedy, {args.sample_chars} new chars, HF model, float32",
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="gpt2,llama,bloom")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=CONTEXT)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-chars", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "interpkv" / "zoo" / "weights"))
    parser.add_argument("--valid-copy", default=str(ROOT / "tests" / "data" / "zoo_valid.txt.gz"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    corpus = _corpus.build()
    corpus_info = {
        "description": _corpus.describe(),
        "python": platform.python_version(),
        "train_chars": len(corpus["train"]),
        "valid_chars": len(corpus["valid"]),
        "train_sha256": _corpus.sha256(corpus["train"]),
        "valid_sha256": _corpus.sha256(corpus["valid"]),
        "valid_copy": "tests/data/zoo_valid.txt.gz",
    }
    print(json.dumps(corpus_info, indent=1))
    if args.valid_copy:
        path = Path(args.valid_copy)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
            f.write(corpus["valid"].encode("utf-8"))  # no name, no mtime: byte-identical reruns
    train_ids = charvocab.encode(corpus["train"])
    valid_ids = charvocab.encode(corpus["valid"])
    for name in args.models.split(","):
        train_one(name, args, train_ids, valid_ids, corpus_info)


if __name__ == "__main__":
    main()
