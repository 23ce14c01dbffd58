"""Device-to-host syncs and ATen ops per cached decode step: interpkv vs HF.

A ``TorchDispatchMode`` (:class:`OpCounter`) sees every ATen op a piece of
code dispatches. It counts all of them, and separately the ones that make
the host wait for the device:

- ``aten._local_scalar_dense``: ``.item()``, ``int(t)``, ``float(t)``,
  ``bool(t)``, ``if t:`` (a scalar read);
- ``aten.nonzero``, ``aten.masked_select``, ``aten.unique*``,
  ``aten.repeat_interleave`` (without ``output_size``): ops whose output
  shape depends on the data, so the host must read it to allocate;
- a copy from a non-CPU tensor to the CPU (``.cpu()``, ``.tolist()`` of a
  device tensor; invisible on a CPU model).

On a CPU model nothing really waits (CPU ops run synchronously), but the
same op on a GPU model is a sync, so the count on CPU is the count on GPU.
What it cannot see: reads of CPU tensors that bypass the dispatcher
(``.numpy()``, ``.tolist()`` of a CPU tensor). interpkv reads only the
caller's own CPU inputs that way (token-id and mask checks), never a tensor
the model computed; the meta-device test (``tests/integration/test_syncs.py``)
is the guard for that: there any host read fails.

    python benchmarks/opcount.py                 # zoo gpt2 / llama / bloom, forward + generate
    python benchmarks/opcount.py --models llama --steps 8 --new 16

Used by the tests too: ``from benchmarks.opcount import OpCounter``.
"""

import argparse
import collections
import json
import os
import sys
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "unique_dim_consecutive", "repeat_interleave")


def _op_name(func) -> str:
    # "aten::nonzero" / overload packet name without namespace
    return func._schema.name.split("::")[-1]


class OpCounter(TorchDispatchMode):
    """Count ATen ops and device-to-host syncs while active.

    Attributes:
        ops: total ATen ops dispatched.
        syncs: ops that read data back to the host (see the module docstring).
        by_op: ``Counter`` of every op name.
        sync_sites: ``Counter`` of ``"op @ file:line"`` for each sync (the
            innermost interpkv / transformers frame), when ``where=True``.

    >>> with OpCounter() as counter:
    ...     _ = torch.ones(3).sum().item()
    >>> counter.syncs
    1
    """

    def __init__(self, where: bool = False):
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.by_op: collections.Counter[str] = collections.Counter()
        self.sync_sites: collections.Counter[str] = collections.Counter()
        self._where = where

    def _is_sync(self, name: str, args, kwargs) -> bool:
        if name in SYNC_OPS:
            if name == "repeat_interleave":
                return kwargs.get("output_size") is None and not (len(args) > 3 and args[3] is not None)
            return True
        if name in ("_to_copy", "copy_", "to"):
            src = args[1] if name == "copy_" else args[0]
            dst_device = kwargs.get("device") if name != "copy_" else args[0].device
            if isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta"):
                return dst_device is not None and torch.device(dst_device).type == "cpu"
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        self.ops += 1
        self.by_op[name] += 1
        if self._is_sync(name, args, kwargs):
            self.syncs += 1
            if self._where:
                self.sync_sites[f"{name} @ {_site()}"] += 1
        return func(*args, **kwargs)


def _site() -> str:
    """The innermost frame in interpkv or transformers (else the innermost non-torch one)."""
    frame = sys._getframe(2)
    fallback = None
    while frame is not None:
        path = frame.f_code.co_filename
        if ("/interpkv/" in path or "/transformers/" in path) and "opcount" not in path:
            return f"{path.split('/site-packages/')[-1].split('/interpkv/')[-1]}:{frame.f_lineno}"
        if fallback is None and "/torch/" not in path and "opcount" not in path:
            fallback = f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


def count(fn, *, where: bool = False) -> OpCounter:
    """Run ``fn()`` under an :class:`OpCounter` and return the counter."""
    with OpCounter(where=where) as counter:
        fn()
    return counter


# ---------------------------------------------------------------- the benchmark


def _per_step(model_name: str, steps: int, new: int, where: bool) -> Dict[str, dict]:
    import interpkv
    from interpkv import zoo

    tl, hf = zoo.load_pair(model_name)
    torch.manual_seed(0)
    vocab = tl.cfg.d_vocab
    prompt = torch.randint(1, vocab, (2, 12))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # a left-padded row
    layer = tl.cfg.n_layers // 2
    vec = 0.01 * torch.randn(tl.cfg.d_model)
    steer = [(f"blocks.{layer}.hook_resid_post", lambda resid, hook: resid + vec)]
    out: Dict[str, dict] = {}

    def ikv_forward(label, hooks=(), window=None, padded=False):
        cache = interpkv.KVCache.for_model(tl, 2, window=window)
        with torch.no_grad():
            interpkv.forward(tl, prompt, cache=cache, attention_mask=mask if padded else None)
            nxt = torch.randint(1, vocab, (2, 1))
            interpkv.forward(tl, nxt, cache=cache, fwd_hooks=hooks, logits="last")  # warm

            def run():
                for _ in range(steps):
                    interpkv.forward(tl, nxt, cache=cache, fwd_hooks=hooks, logits="last")

            c = count(run, where=where)
        out[label] = _row(c, steps)

    ikv_forward("interpkv.forward")
    ikv_forward("interpkv.forward steered", hooks=steer)
    ikv_forward("interpkv.forward left-padded", padded=True)
    ikv_forward("interpkv.forward windowed (8)", window=8)

    # HF: the same decode step through its DynamicCache.
    with torch.no_grad():
        o = hf(prompt, use_cache=True)
        past = o.past_key_values
        nxt = torch.randint(1, vocab, (2, 1))
        n = prompt.shape[1]
        o = hf(nxt, past_key_values=past, use_cache=True)
        n += 1

        def hf_run():
            nonlocal n
            for _ in range(steps):
                ids = torch.full((2, 1), n % vocab)
                hf(ids, past_key_values=past, use_cache=True, logits_to_keep=1)
                n += 1

        out["HF model forward"] = _row(count(hf_run, where=where), steps)

    def ikv_generate(label, **kw):
        with torch.no_grad():
            c = count(lambda: interpkv.generate(tl, prompt, attention_mask=mask, max_new_tokens=new, **kw),
                      where=where)
        out[label] = _row(c, new)

    ikv_generate("interpkv.generate")
    ikv_generate("interpkv.generate steered", fwd_hooks=steer)
    ikv_generate("interpkv.generate stop_tokens", stop_tokens=[vocab - 1])
    with torch.no_grad():
        c = count(lambda: hf.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, pad_token_id=0), where=where)
    out["HF generate"] = _row(c, new)
    return out


def _row(counter: OpCounter, per: int) -> dict:
    row = {"syncs": counter.syncs / per, "ops": counter.ops / per}
    if counter.sync_sites:
        row["sites"] = {k: v / per for k, v in counter.sync_sites.most_common(12)}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama", "bloom"])
    parser.add_argument("--steps", type=int, default=8, help="decode steps counted per forward case")
    parser.add_argument("--new", type=int, default=16, help="tokens per generate case")
    parser.add_argument("--where", action="store_true", help="print where each sync comes from")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {m: _per_step(m, args.steps, args.new, args.where) for m in args.models}
    cases = list(next(iter(rows.values())))
    head = "| per step (generate: per token) | " + " | ".join(
        f"{m} syncs | {m} ops" for m in args.models) + " |"
    print(head)
    print("|---|" + "---|---|" * len(args.models))
    for case in cases:
        cells = " | ".join(f"{rows[m][case]['syncs']:.2f} | {rows[m][case]['ops']:.0f}" for m in args.models)
        print(f"| {case} | {cells} |")
    if args.where:
        for m, r in rows.items():
            for case, row in r.items():
                for site, n in row.get("sites", {}).items():
                    print(f"{m} {case}: {n:.2f} x {site}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
