"""A bounded fuzzer of the public API: every malformed call is a clear interpkv error.

Each case is one public call with one argument replaced by a malformed value
of a known class (wrong type, NaN/inf, negative, zero, huge, out of range,
wrong shape, a selection matching nothing, a cache of another batch or
model...). Its outcome is classified:

- ``clear``: an exception raised by interpkv's own code whose message names
  the argument;
- ``vague``: raised by interpkv without naming the argument;
- ``opaque``: raised inside torch / TransformerLens / the standard library
  (the user sees someone else's error);
- ``oom``: a memory error (something was allocated in proportion to a bad value);
- ``silent``: no error at all.

The suite requires 0 silent, 0 opaque, 0 oom and 0 vague. New entry points
and arguments belong in :func:`_cases`; the run is bounded (tiny models, a few
tokens, a few hundred calls).
"""

import math
import os
import traceback

import pytest
import torch

import interpkv
from interpkv import zoo
from interpkv.patching import patch

PACKAGE = os.path.dirname(interpkv.__file__) + os.sep
TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9]])
MASK = torch.ones_like(TOKENS)


@pytest.fixture(scope="module")
def models():
    return {"gpt2": zoo.load("gpt2"), "llama": zoo.load("llama"), "opt": zoo.load("opt")}


def _bad_values(kind):
    """Malformed values by class of argument."""
    common = {"str": "x", "list-of-str": ["x"], "dict": {"a": 1}, "float-nan": math.nan}
    if kind == "count":  # int >= 0 or >= 1
        return {**common, "negative": -1, "float": 1.5, "bool": True, "huge": 10**12, "inf": math.inf}
    if kind == "tol":  # float >= 0
        return {"nan": math.nan, "negative": -1e-3, "str": "1e-5", "inf-neg": -math.inf, "list": [1e-5]}
    if kind == "prob":
        return {"nan": math.nan, "zero": 0.0, "above-one": 1.5, "negative": -0.1, "str": "0.9"}
    if kind == "mask":
        return {
            "list": [[1] * 6],
            "wrong-shape": torch.ones(1, 5, dtype=torch.long),
            "values-2": torch.full((1, 6), 2),
            "float-half": torch.full((1, 6), 0.5),
            "3d": torch.ones(1, 6, 1, dtype=torch.long),
            "str": "all",
        }
    if kind == "tokens":
        return {
            "list-of-ints": [3, 1, 4],
            "negative-id": torch.tensor([[3, -1, 4]]),
            "id-past-vocab": torch.tensor([[3, 10**6, 4]]),
            "3d": torch.zeros(1, 2, 3, dtype=torch.long),
            "empty": torch.zeros(1, 0, dtype=torch.long),
            "bool": torch.ones(1, 3, dtype=torch.bool),
            "none": None,
            "text-without-tokenizer": "hello",
        }
    if kind == "steps":
        return {"zero": [0, 6], "short": [3], "negative": [-1, 7], "float": [1.5, 4.5], "str": "6", "int": 6}
    if kind == "names":
        return {"int": 3, "list-int": [3], "empty-str": "", "no-match": "resid_pots", "empty-list": []}
    if kind == "tokens-list":
        return {"negative": [-1], "past-vocab": [10**9], "float": [1.5], "str": "a", "nested": [[1]]}
    raise KeyError(kind)


def _no_huge(values):
    return {k: v for k, v in values.items() if k != "huge"}


def _cases(models):
    """(id, argument, call) for every public entry point x argument x malformed value."""
    m = models["gpt2"]  # learned positions, n_ctx 256
    rot = models["llama"]
    cases = []

    def add(entry, arg, kind, call, *, values=None):
        for label, value in (values or _bad_values(kind)).items():
            cases.append((f"{entry}:{arg}={label}", arg, lambda v=value: call(v)))

    # tokens / masks everywhere
    for entry, fn in {
        "forward": lambda t: interpkv.forward(m, t),
        "generate": lambda t: interpkv.generate(m, t, max_new_tokens=2),
        "capture": lambda t: interpkv.capture(m, t),
        "compare": lambda t: interpkv.compare(
            m, t, steps=[1] * (t.shape[-1] if isinstance(t, torch.Tensor) and t.ndim >= 2 else 1)
        ),
        "compare_generation": lambda t: interpkv.compare_generation(m, t, max_new_tokens=2),
    }.items():
        add(entry, "tokens", "tokens", fn)
    for entry, fn in {
        "forward": lambda a: interpkv.forward(m, TOKENS, attention_mask=a),
        "generate": lambda a: interpkv.generate(m, TOKENS, max_new_tokens=2, attention_mask=a),
        "capture": lambda a: interpkv.capture(m, TOKENS, attention_mask=a),
        "compare": lambda a: interpkv.compare(m, TOKENS, steps=[3, 3], attention_mask=a),
        "compare_generation": lambda a: interpkv.compare_generation(m, TOKENS, max_new_tokens=2, attention_mask=a),
    }.items():
        add(entry, "attention_mask", "mask", fn)

    # generation options
    add("generate", "max_new_tokens", "count", lambda v: interpkv.generate(m, TOKENS, max_new_tokens=v))
    add("generate", "max_new_tokens", None, lambda v: interpkv.generate(rot, TOKENS, max_new_tokens=v),
        values={"huge-rotary": 10**9})  # an unwindowed cache larger than RAM
    add("generate", "max_new_tokens", None, lambda v: interpkv.generate(m, TOKENS, max_new_tokens=v),
        values={"past-n_ctx-learned": 300})  # gpt2: 256 learned positions
    add("generate", "temperature", "tol", lambda v: interpkv.generate(m, TOKENS, max_new_tokens=2, temperature=v))
    add("generate", "top_k", "count", lambda v: interpkv.generate(m, TOKENS, max_new_tokens=2, temperature=1.0, top_k=v))
    add("generate", "top_p", "prob", lambda v: interpkv.generate(m, TOKENS, max_new_tokens=2, temperature=1.0, top_p=v))
    add("generate", "seed", None, lambda v: interpkv.generate(m, TOKENS, max_new_tokens=2, seed=v),
        values={"str": "x", "float": 1.5, "list": [1]})
    add("generate", "stop_tokens", "tokens-list", lambda v: interpkv.generate(m, TOKENS, max_new_tokens=2, stop_tokens=v))
    add("generate", "pad_token", None, lambda v: interpkv.generate(m, TOKENS, max_new_tokens=2, pad_token=v),
        values={"negative": -1, "past-vocab": 10**9, "float": 1.5, "str": "x"})
    add("generate", "capture", "names", lambda v: interpkv.generate(m, TOKENS, max_new_tokens=2, capture=v))
    add("compare_generation", "max_new_tokens", "count", lambda v: interpkv.compare_generation(m, TOKENS, max_new_tokens=v))
    add("compare_generation", "atol", "tol", lambda v: interpkv.compare_generation(m, TOKENS, max_new_tokens=2, atol=v))

    # capture / compare
    add("capture", "steps", "steps", lambda v: interpkv.capture(m, TOKENS, steps=v))
    add("compare", "steps", "steps", lambda v: interpkv.compare(m, TOKENS, steps=v))
    add("capture", "names", "names", lambda v: interpkv.capture(m, TOKENS, names=v))
    add("compare", "names", "names", lambda v: interpkv.compare(m, TOKENS, steps=[3, 3], names=v))
    add("compare", "engine", None, lambda v: interpkv.compare(m, TOKENS, steps=[3, 3], engine=v),
        values={"unknown": "vllm", "int": 3})

    def wrong_batch():
        return interpkv.KVCache.for_model(m, batch_size=2)

    def other_model():
        cache = interpkv.KVCache.for_model(rot)
        interpkv.forward(rot, TOKENS, cache=cache)
        return cache

    caches = {"wrong-batch": wrong_batch, "other-model": other_model, "str": lambda: "cache"}
    add("forward", "cache", None, lambda v: interpkv.forward(m, TOKENS, cache=v()), values=caches)
    add("capture", "cache", None, lambda v: interpkv.capture(m, TOKENS, cache=v()), values=caches)
    add("compare", "cache", None, lambda v: interpkv.compare(m, TOKENS, steps=[3, 3], cache=v()), values=caches)
    add("generate", "cache", None, lambda v: interpkv.generate(m, TOKENS, max_new_tokens=2, cache=v()), values=caches)

    # reports
    report = interpkv.compare(m, TOKENS, steps=[3, 3])
    add("DivergenceReport.ok", "atol", "tol", lambda v: report.ok(atol=v))
    add("DivergenceReport.ok", "rtol", "tol", lambda v: report.ok(rtol=v))
    add("DivergenceReport.first_divergence", "atol", "tol", lambda v: report.first_divergence(atol=v))

    # patching
    corrupt = torch.tensor([[3, 1, 4, 1, 5, 8]])
    metric = lambda logits: logits[:, -1, 1].mean()  # noqa: E731
    add("patch", "hook", None, lambda v: patch(m, TOKENS, corrupt, hook=v, metric=metric, progress=False),
        values={"layer-past-model": "blocks.99.hook_resid_pre", "unknown": "resid_pots", "int": 3, "none": None})
    add("patch", "positions", None,
        lambda v: patch(m, TOKENS, corrupt, hook="resid_pre", metric=metric, positions=v, progress=False),
        values={"float": [1.5], "past-end": [99], "str": "1", "bool": [True], "int": 1})
    add("patch", "metric", None, lambda v: patch(m, TOKENS, corrupt, hook="resid_pre", metric=v, progress=False),
        values={"none": None, "str": "logit_diff"})
    add("patch", "corrupt_tokens", None, lambda v: patch(m, TOKENS, v, hook="resid_pre", metric=metric, progress=False),
        values={"other-shape": torch.tensor([[1, 2]]), "list": [1, 2, 3]})

    # KVCache
    add("KVCache.for_model", "batch_size", "count", lambda v: interpkv.KVCache.for_model(m, batch_size=v),
        values={**_bad_values("count"), "zero": 0})
    add("KVCache.for_model", "window", "count", lambda v: interpkv.KVCache.for_model(rot, window=v),
        values={**_no_huge(_bad_values("count")), "zero": 0})
    # A window or sink count larger than any sequence never evicts: not malformed, so not "huge" here.
    add("KVCache.for_model", "sinks", "count", lambda v: interpkv.KVCache.for_model(rot, window=4, sinks=v),
        values=_no_huge(_bad_values("count")))

    def filled():
        cache = interpkv.KVCache.for_model(m)
        interpkv.forward(m, TOKENS, cache=cache)
        return cache

    add("KVCache.crop", "n", "count", lambda v: filled().crop(v), values={**_bad_values("count"), "past-end": 99})
    add("KVCache.repeat", "n", "count", lambda v: filled().repeat(v), values={**_bad_values("count"), "zero": 0})
    add("KVCache.select", "batch_indices", None, lambda v: filled().select(v),
        values={"past-end": [5], "float": [0.5], "empty": [], "str": "0"})

    # persistence (tmp paths made per call)
    import tempfile

    def in_tmp(fn):
        with tempfile.TemporaryDirectory() as d:
            return fn(d)

    add("KVCache.save", "metadata", None, lambda v: in_tmp(lambda d: filled().save(os.path.join(d, "c"), metadata=v)),
        values={"list": [1], "nan": {"x": math.nan}, "tuple-value": {"x": (1, 2)}, "int-key": {1: "a"}})
    add("KVCache.save", "path", None, lambda v: in_tmp(lambda d: filled().save(v(d))),
        values={"a-directory": lambda d: d, "missing-directory": lambda d: os.path.join(d, "no", "c")})
    add("KVCache.load", "model", None, lambda v: in_tmp(lambda d: (filled().save(os.path.join(d, "c")),
                                                                  interpkv.KVCache.load(os.path.join(d, "c"), v))),
        values={"none": None, "str": "gpt2"})
    add("KVCache.load", "path", None, lambda v: in_tmp(lambda d: interpkv.KVCache.load(v(d), m)),
        values={"missing": lambda d: os.path.join(d, "nothing"), "a-directory": lambda d: d})
    return cases


def _classify(arg, error):
    if error is None:
        return "silent"
    if isinstance(error, MemoryError) or "allocate" in str(error).lower():
        return "oom"
    frames = traceback.extract_tb(error.__traceback__)
    if not frames or not frames[-1].filename.startswith(PACKAGE):
        return "opaque"
    message = str(error)
    named = arg in message or (arg == "path" and any(p in message for p in ("/tmp", "directory", "c:")))
    return "clear" if named else "vague"


@pytest.mark.unchecked_shapes  # malformed arguments: interpkv's own error is the point
def test_every_malformed_call_is_a_clear_interpkv_error(models, capsys):
    outcomes = {}
    import time
    slow = []
    for case_id, arg, call in _cases(models):
        t0 = time.perf_counter()
        try:
            call()
            error = None
        except Exception as e:  # noqa: BLE001 (classifying every outcome is the point)
            error = e
        if time.perf_counter() - t0 > 1.0:
            slow.append((case_id, round(time.perf_counter() - t0, 1)))
        kind = _classify(arg, error)
        outcomes.setdefault(kind, []).append(f"{case_id}: {type(error).__name__ if error else '-'}: {str(error)[:160]}")
    counts = {k: len(v) for k, v in sorted(outcomes.items())}
    with capsys.disabled():
        print(f"\nAPI fuzzer: {sum(counts.values())} malformed calls: {counts}; slow: {slow}")
    problems = {k: v for k, v in outcomes.items() if k != "clear"}
    assert not problems, "\n".join(f"{k}: {line}" for k, v in problems.items() for line in v)
