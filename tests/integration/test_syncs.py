"""A cached decode step never waits on the device, and runs on the ``meta`` device.

Counted at the ATen level (``benchmarks/opcount.py``'s ``OpCounter``: scalar
reads, ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave``,
device-to-CPU copies). On a CPU model nothing really waits, but the same ops
on a GPU model would, so the count here is the GPU count. The meta-device
runs are the other half: there any host read of a tensor fails, and every
op's output device is checked, so no tensor is made on the CPU for a model
that lives elsewhere.
"""

import copy

import pytest
import torch

import interpkv
from benchmarks.opcount import OpCounter
from interpkv import zoo

MODELS = ["gpt2", "llama", "bloom"]
STEPS = 4


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return zoo.load(request.param)


def _steer(model):
    vec = 0.01 * torch.ones(model.cfg.d_model, device=model.W_E.device)
    return [(f"blocks.{model.cfg.n_layers // 2}.hook_resid_post", lambda resid, hook: resid + vec)]


def _prompt(model, batch=2, length=10):
    tokens = torch.randint(1, model.cfg.d_vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # row 1 left-padded
    return tokens, mask


CASES = {
    "idle": dict(),
    "steered": dict(steered=True),
    "left-padded": dict(padded=True),
    "windowed": dict(window=4, sinks=1),  # evicts on every step
    "windowed-steered-padded": dict(window=4, sinks=1, steered=True, padded=True),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_a_cached_forward_step_makes_no_host_read(model, case):
    opts = CASES[case]
    tokens, mask = _prompt(model)
    cache = interpkv.KVCache.for_model(model, 2, window=opts.get("window"), sinks=opts.get("sinks", 0))
    interpkv.forward(model, tokens, cache=cache, attention_mask=mask if opts.get("padded") else None)
    hooks = _steer(model) if opts.get("steered") else ()
    step = tokens[:, -1:]
    with OpCounter(where=True) as counter:
        for _ in range(STEPS):
            step = interpkv.forward(model, step, cache=cache, fwd_hooks=hooks, logits="last").argmax(-1)
    assert counter.syncs == 0, dict(counter.sync_sites)
    assert counter.ops > 50 * STEPS  # the counter saw the steps
    if opts.get("window"):
        assert cache.seq_len == opts["window"] + opts["sinks"]  # it did evict


@torch.no_grad()
def test_the_counter_sees_a_host_read(model):
    """Not vacuous: the read a step makes near n_ctx (learned positions) is counted."""
    cache = interpkv.KVCache.for_model(model)
    cache.bound.tighten = lambda next_positions: 10**9  # as if the positions were near n_ctx
    cache.bound.get = lambda next_positions: 10**9
    with OpCounter() as counter:
        interpkv.forward(model, torch.tensor([[1, 2]]), cache=cache)
    # Learned positions read q_pos back near n_ctx; rotary and ALiBi have no limit.
    assert counter.syncs == (1 if model.cfg.positional_embedding_type == "standard" else 0)


@pytest.mark.parametrize("stops", [False, True], ids=["no-stop-tokens", "stop-tokens"])
@torch.no_grad()
def test_generate_reads_back_at_most_once_per_token(model, stops):
    tokens, mask = _prompt(model)
    new = 8
    kwargs = dict(stop_tokens=[model.cfg.d_vocab - 1]) if stops else {}
    with OpCounter(where=True) as counter:
        out = interpkv.generate(model, tokens, attention_mask=mask, max_new_tokens=new, fwd_hooks=_steer(model),
                                **kwargs)
    assert out.tokens.shape[1] == tokens.shape[1] + new
    if stops:
        assert counter.syncs <= new, dict(counter.sync_sites)
    else:
        assert counter.syncs == 0, dict(counter.sync_sites)


@torch.no_grad()
def test_a_stop_token_still_ends_rows_with_one_read_per_token(model):
    """The host-side finished count is the real one: rows stop, generation ends early."""
    tokens, mask = _prompt(model)
    free = interpkv.generate(model, tokens, attention_mask=mask, max_new_tokens=6)
    stop = int(free.tokens[0, tokens.shape[1] + 1])  # row 0's second new token
    with OpCounter() as counter:
        out = interpkv.generate(model, tokens, attention_mask=mask, max_new_tokens=6, stop_tokens=[stop])
    assert bool(out.finished[0])
    assert out.attention_mask[0, tokens.shape[1] + 2:].sum() == 0
    assert counter.syncs <= 6


class _Devices(OpCounter):
    """Also records every op whose output is not on ``device``."""

    def __init__(self, device):
        super().__init__(where=True)
        self.device = torch.device(device)
        self.elsewhere = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != self.device.type:
                self.elsewhere.append(func._schema.name)
        return out


def _meta(name, n_devices=1):
    model = copy.deepcopy(zoo.load(name))
    if n_devices > 1:
        model.cfg.n_devices = n_devices  # TransformerLens moves the residual to meta:i per block
    return model.to("meta")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", ["idle", "steered-padded", "windowed"])
@torch.no_grad()
def test_the_decode_step_runs_on_the_meta_device(name, case):
    model = _meta(name)
    assert next(model.parameters()).device.type == "meta"
    tokens, mask = _prompt(model)
    window = dict(window=4, sinks=1) if case == "windowed" else {}
    cache = interpkv.KVCache.for_model(model, 2, **window)
    assert cache.layers[0].keys.device.type == "meta"
    # The prompt comes from the host (checked there), the steps are meta tensors.
    interpkv.forward(model, tokens, cache=cache, attention_mask=mask if case == "steered-padded" else None)
    hooks = _steer(model) if case == "steered-padded" else ()
    step = torch.zeros(2, 1, dtype=torch.long, device="meta")
    with _Devices("meta") as seen:
        for _ in range(3):
            logits = interpkv.forward(model, step, cache=cache, fwd_hooks=hooks, logits="last")
    assert logits.shape == (2, 1, model.cfg.d_vocab) and logits.device.type == "meta"
    assert seen.syncs == 0 and seen.elsewhere == [], (dict(seen.sync_sites), seen.elsewhere)
    assert cache.seq_len == (5 if window else tokens.shape[1] + 3)


@torch.no_grad()
def test_meta_step_with_transformer_lens_n_devices():
    """``cfg.n_devices = 2``: TransformerLens moves the residual to each block's device.

    Without GPUs the blocks cannot really report different devices (``meta:1``
    tensors are ``meta``), so this covers the per-block moves, not split storage
    (docs/performance.md has the plan).
    """
    model = _meta("llama", n_devices=2)
    cache = interpkv.KVCache.for_model(model, 1)
    interpkv.forward(model, torch.tensor([[1, 2, 3]]), cache=cache)
    with _Devices("meta") as seen:
        out = interpkv.forward(model, torch.zeros(1, 1, dtype=torch.long, device="meta"), cache=cache)
    assert out.device.type == "meta" and seen.syncs == 0 and seen.elsewhere == []


def test_the_n_ctx_check_follows_crops_and_forks():
    """The host-side bound is recomputed after a crop (never a stale limit either way)."""
    model = zoo.load("gpt2")  # learned positions, n_ctx 64
    limit = model.cfg.n_ctx
    cache = interpkv.KVCache.for_model(model)
    with torch.no_grad():
        interpkv.forward(model, torch.zeros(1, limit - 1, dtype=torch.long), cache=cache)
        fork = cache.fork()
        cache.crop(10)
        interpkv.forward(model, torch.zeros(1, limit - 10, dtype=torch.long), cache=cache)  # fits exactly
        with pytest.raises(ValueError, match=f"position {limit} is past"):
            interpkv.forward(model, torch.zeros(1, 1, dtype=torch.long), cache=cache)
        interpkv.forward(model, torch.zeros(1, 1, dtype=torch.long), cache=fork)  # position 63: fits
        with pytest.raises(ValueError, match=f"position {limit} is past"):
            interpkv.forward(model, torch.zeros(1, 1, dtype=torch.long), cache=fork)
    assert cache.next_positions.tolist() == [limit] and fork.next_positions.tolist() == [limit]


def test_ragged_rows_reach_n_ctx_exactly():
    """With padding the bound is loose; near the limit it is tightened, not trusted."""
    model = zoo.load("gpt2")
    limit = model.cfg.n_ctx
    cache = interpkv.KVCache.for_model(model, 2)
    mask = torch.ones(2, limit, dtype=torch.long)
    mask[1, :8] = 0  # row 1 is 8 positions behind
    with torch.no_grad():
        interpkv.forward(model, torch.zeros(2, limit, dtype=torch.long), cache=cache, attention_mask=mask)
        with pytest.raises(ValueError, match=f"position {limit} is past"):
            interpkv.forward(model, torch.zeros(2, 1, dtype=torch.long), cache=cache)
        step_mask = torch.tensor([[0], [1]])  # only row 1 advances: fine up to the limit
        for _ in range(8):
            interpkv.forward(model, torch.zeros(2, 1, dtype=torch.long), cache=cache, attention_mask=step_mask)
        with pytest.raises(ValueError, match=f"position {limit} is past"):
            interpkv.forward(model, torch.zeros(2, 1, dtype=torch.long), cache=cache, attention_mask=step_mask)
    assert cache.next_positions.tolist() == [limit, limit]
