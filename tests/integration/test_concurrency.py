"""One model, several threads; and what a failing call leaves behind (nothing).

Each call routes its attention through a per-call view of the model and gates
its hooks to its own context (interpkv.core.calls / overlay), so concurrent
calls give their single-thread results and a plain TransformerLens call at
the same time is unaffected. The stress test is bounded (a few seconds).
"""

import threading

import pytest
import torch

import interpkv
from interpkv import patching

N_NEW = 12


@pytest.fixture(scope="module")
def model():
    return interpkv.zoo.load("llama", trained=True)


def model_state(model):
    """Everything a call could leave on a model: instance forwards, hooks, TL's hook registry."""
    state = []
    for name, module in model.named_modules():
        state.append(
            (
                name,
                "forward" in module.__dict__,
                tuple(module._forward_hooks),
                tuple(module._forward_pre_hooks),
                tuple(module._backward_hooks),
                len(getattr(module, "fwd_hooks", ())),
                len(getattr(module, "bwd_hooks", ())),
            )
        )
    return state, model.context_level


def steer_hook(direction):
    def hook(act, hook):
        return act + direction  # every position: means the same cached or not

    return hook


@pytest.fixture(scope="module")
def workload(model):
    torch.manual_seed(0)
    prompt = model.to_tokens(["the cat sat on the mat", "once upon a time"], padding_side="left")
    mask = (prompt != model.tokenizer.pad_token_id).long()
    mask[:, 0] = 1  # BOS
    direction = 3 * torch.randn(model.cfg.d_model)
    steer = [("blocks.0.hook_resid_post", steer_hook(direction))]
    probe = prompt[:1, -8:]

    def plain():
        return interpkv.generate(model, prompt, attention_mask=mask, max_new_tokens=N_NEW).tokens

    def steered():
        return interpkv.generate(model, prompt, attention_mask=mask, max_new_tokens=N_NEW, fwd_hooks=steer).tokens

    def captured():
        record = interpkv.capture(model, probe, steps=[4, 1, 1, 1, 1], names=["blocks.1.hook_resid_post"])
        return record["blocks.1.hook_resid_post"]

    def tl_plain():
        with torch.no_grad():
            return model(probe)

    jobs = {"plain": plain, "steered": steered, "captured": captured, "tl_plain": tl_plain}
    reference = {name: job() for name, job in jobs.items()}
    return jobs, reference


def test_steering_changes_the_tokens(workload):
    """Otherwise the stress test below could not tell the two decoders apart."""
    _, reference = workload
    assert not torch.equal(reference["plain"], reference["steered"])


def test_threads_on_one_model_give_their_single_thread_results(model, workload):
    jobs, reference = workload
    before = model_state(model)
    results, errors = [], []
    barrier = threading.Barrier(len(jobs) * 2)

    def run(name):
        try:
            barrier.wait()
            for _ in range(2):
                results.append((name, jobs[name]()))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((name, repr(exc)))

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(results) == len(jobs) * 4
    for name, value in results:
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-5, msg=f"{name} differs")
    assert model_state(model) == before


def test_a_thread_s_fwd_hooks_never_fire_in_another_thread(model):
    """A hook given to one call is gated to that call: a concurrent plain call passes it untouched."""
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    inside, release = threading.Event(), threading.Event()
    fired_in = []

    def slow_hook(act, hook):
        fired_in.append(threading.get_ident())
        inside.set()
        release.wait(timeout=30)
        return act * 0  # would wreck any call that saw it

    worker = threading.Thread(
        target=lambda: interpkv.forward(model, tokens, fwd_hooks=[("blocks.0.hook_resid_post", slow_hook)])
    )
    with torch.no_grad():
        expected = model(tokens)
        worker.start()
        assert inside.wait(timeout=30)
        # The hook is registered on the shared hook point right now...
        assert model.blocks[0].hook_resid_post._forward_hooks
        during_tl = model(tokens)
        during_interpkv = interpkv.forward(model, tokens)
    release.set()
    worker.join(timeout=30)
    assert fired_in == [worker.ident]
    torch.testing.assert_close(during_tl, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(during_interpkv, expected, rtol=0, atol=1e-5)
    assert not model.blocks[0].hook_resid_post._forward_hooks


class Boom(Exception):
    pass


def raising_at(layer, exc_type, after=0):
    calls = {"n": 0}

    def hook(act, hook):
        calls["n"] += 1
        if calls["n"] > after:
            raise exc_type(f"raised at layer {layer}")

    return hook


CALLS = {
    "forward": lambda m, t, h: interpkv.forward(m, t, fwd_hooks=h),
    "forward_cached": lambda m, t, h: interpkv.forward(m, t, cache=interpkv.KVCache.for_model(m), fwd_hooks=h),
    "generate": lambda m, t, h: interpkv.generate(m, t, max_new_tokens=4, fwd_hooks=h),
    "capture": lambda m, t, h: interpkv.capture(m, t, steps=[3, 1, 1], fwd_hooks=h),
    "compare": lambda m, t, h: interpkv.compare(m, t, steps=[3, 1, 1], fwd_hooks=h),
    "compare_generation": lambda m, t, h: interpkv.compare_generation(m, t, max_new_tokens=3, fwd_hooks=h),
}


@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt], ids=["exception", "interrupt"])
@pytest.mark.parametrize("call", list(CALLS), ids=list(CALLS))
@pytest.mark.parametrize("layer", [0, 1])
def test_a_call_that_fails_leaves_the_model_exactly_as_before(model, call, layer, exc_type):
    tokens = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        expected = model(tokens)
    before = model_state(model)
    # One forward fails at once; the others on their second forward (a cached step).
    after = 0 if call.startswith("forward") else 1
    hooks = [(f"blocks.{layer}.hook_attn_out", raising_at(layer, exc_type, after=after))]
    with pytest.raises(exc_type):
        CALLS[call](model, tokens, hooks)
    assert model_state(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)
        torch.testing.assert_close(interpkv.forward(model, tokens), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt], ids=["exception", "interrupt"])
def test_a_failing_metric_in_patching_leaves_the_model_as_before(model, exc_type):
    clean = torch.tensor([[1, 5, 9, 13, 17]])
    corrupt = torch.tensor([[1, 6, 9, 13, 17]])
    before = model_state(model)
    seen = {"n": 0}

    def metric(logits):
        seen["n"] += 1
        if seen["n"] > 2:
            raise exc_type("metric failed")
        return logits[0, -1, 0]

    with pytest.raises(exc_type):
        patching.patch(model, clean, corrupt, hook="resid_pre", metric=metric, progress=False)
    assert model_state(model) == before


def test_an_unknown_hook_name_is_refused_and_leaves_nothing(model):
    tokens = torch.tensor([[1, 2, 3]])
    before = model_state(model)
    ok = lambda act, hook: None  # noqa: E731
    with pytest.raises(ValueError, match="blocks.0.hook_resid_psot"):
        interpkv.forward(model, tokens, fwd_hooks=[("blocks.0.hook_resid_post", ok), ("blocks.0.hook_resid_psot", ok)])
    assert model_state(model) == before


def test_a_caller_s_bound_forward_on_a_block_still_reaches_the_routed_attention():
    """module.forward = MethodType(f, module) on a block must not bypass the cache's attention."""
    import types

    model = interpkv.zoo.load("llama", dtype=torch.float64)
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])
    calls = {"n": 0}
    block = model.blocks[1]
    original = type(block).forward

    def counting_forward(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    block.forward = types.MethodType(counting_forward, block)
    with torch.no_grad():
        full = interpkv.forward(model, tokens)
        cache = interpkv.KVCache.for_model(model)
        interpkv.forward(model, tokens[:, :4], cache=cache)
        step = interpkv.forward(model, tokens[:, 4:], cache=cache)
    assert calls["n"] == 3
    torch.testing.assert_close(step, full[:, 4:], rtol=0, atol=1e-10)
    assert block.__dict__["forward"].__self__ is block  # the caller's forward is left as it was
