"""Engines: whose KV cache :func:`interpkv.compare` audits.

An *engine* is an implementation of cached inference driven chunk by chunk
and recorded at TransformerLens hook names and absolute positions, so one
:class:`~interpkv.DivergenceReport` (``first_divergence``, plots, HTML)
describes any of them:

- ``"interpkv"`` (:func:`interpkv.diagnostics.capture.run`): interpkv's own
  :class:`~interpkv.KVCache`; the default for a HookedTransformer.
- ``"transformer_lens"`` (:mod:`.transformer_lens`): TransformerLens's own
  ``past_kv_cache`` path on the same HookedTransformer.
- ``"hf"`` (:mod:`.hf`): a ``transformers`` causal LM with its own cache
  (``DynamicCache`` by default); the default for a ``PreTrainedModel``.

In every case the reference is the same model, same engine, run once on all
tokens without a cache. :mod:`.faults` plants a corruption in each engine's
cache update; :mod:`.findings` holds the TransformerLens 3.x cache bugs
the demo shows.
"""

from typing import Callable, Optional, Sequence

from torch import Tensor

from interpkv.core import tl as _tl
from interpkv.diagnostics.capture import NamesFilter, Sink, _RecordBuilder
from interpkv.diagnostics.capture import run as _run_interpkv
from interpkv.diagnostics.record import Record
from interpkv.diagnostics.report import DivergenceReport

__all__ = ["ENGINES", "resolve", "run", "capture", "compare", "Tee"]

ENGINES = ("interpkv", "transformer_lens", "hf")


def resolve(model, engine: Optional[str] = None) -> str:
    """The engine name for ``model`` (``engine`` checked, or the model's default).

    Raises:
        ValueError: an unknown engine, or one that cannot run this kind of model.
    """
    hooked = isinstance(model, _tl.HookedTransformer)
    if engine is None:
        engine = "interpkv" if hooked else "hf"
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "hf":
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise ValueError(
                f"engine='hf' runs a transformers PreTrainedModel, got {type(model).__name__}; "
                "for a HookedTransformer use engine='interpkv' or 'transformer_lens' "
                "(interpkv.zoo.load_pair(name) gives both models)"
            )
    elif not hooked:
        raise ValueError(
            f"engine={engine!r} runs a TransformerLens HookedTransformer, got {type(model).__name__}; "
            "use engine='hf' for a transformers model"
        )
    return engine


def run(
    model,
    tokens: Tensor,
    sink_factory: Callable[[Tensor], Sink],
    *,
    engine: Optional[str] = None,
    steps: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
    names: NamesFilter = None,
    cache=None,
    fwd_hooks: Sequence = (),
) -> Sink:
    """Feed ``engine``'s run of ``model`` (chunked by ``steps``, or uncached) to a sink.

    ``cache``: for ``"interpkv"`` a :class:`~interpkv.KVCache` or a factory
    ``(model, batch_size, max_len) -> KVCache``; for ``"hf"`` a
    ``transformers`` Cache or a :data:`.hf.CacheFactory`; TransformerLens
    always gets a fresh cache. ``fwd_hooks``: TransformerLens hooks active in
    the run (``"interpkv"`` only).
    """
    engine = resolve(model, engine)
    if fwd_hooks and engine != "interpkv":
        raise ValueError(
            f"fwd_hooks apply to engine='interpkv' only, got engine={engine!r}; add the hooks to the model instead"
        )
    if engine == "hf":
        from interpkv.diagnostics.engines import hf

        return hf.run(model, tokens, sink_factory, steps=steps, attention_mask=attention_mask, names=names, cache=cache)
    if engine == "transformer_lens":
        from interpkv.diagnostics.engines import transformer_lens

        if cache is not None:
            raise ValueError("engine='transformer_lens' builds its own TransformerLensKeyValueCache; pass cache=None")
        return transformer_lens.run(model, tokens, sink_factory, steps=steps, attention_mask=attention_mask, names=names)
    if callable(cache):
        cache = cache(model, tokens.shape[0] if tokens.ndim > 1 else 1, tokens.shape[-1])
    return _run_interpkv(
        model, tokens, sink_factory, cache=cache, steps=steps, attention_mask=attention_mask, names=names,
        fwd_hooks=fwd_hooks,
    )


def capture(
    model,
    tokens: Tensor,
    *,
    engine: Optional[str] = None,
    steps: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
    names: NamesFilter = None,
    cache=None,
    fwd_hooks: Sequence = (),
) -> Record:
    """A :class:`~interpkv.Record` of ``engine``'s run (uncached when ``steps`` is None).

    Records of two engines on the same tokens can be diffed with
    :func:`interpkv.diff` over the sites both name (e.g. TransformerLens
    against HF on ``hook_resid_post`` and the logits).
    """
    sink = run(
        model, tokens, _RecordBuilder, engine=engine, steps=steps, attention_mask=attention_mask, names=names,
        cache=cache, fwd_hooks=fwd_hooks,
    )
    meta = {"steps": list(steps) if steps is not None else None, "engine": resolve(model, engine)}
    if isinstance(model, _tl.HookedTransformer):
        meta["n_layers"] = model.cfg.n_layers
    return sink.record(meta)


class Tee(Sink):
    """Hands each call of a run to every one of ``sinks``; :meth:`report` is the first one's."""

    def __init__(self, *sinks: Sink):
        self.sinks = sinks

    def activation(self, name, act, q_pos, k_pos) -> None:
        for sink in self.sinks:
            sink.activation(name, act, q_pos, k_pos)

    def logits(self, logits, q_pos) -> None:
        for sink in self.sinks:
            sink.logits(logits, q_pos)

    def skip(self, name, reason) -> None:
        for sink in self.sinks:
            sink.skip(name, reason)

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish()

    def report(self) -> DivergenceReport:
        return self.sinks[0].report()


def compare(
    model,
    tokens: Tensor,
    *,
    steps: Sequence[int],
    attention_mask: Optional[Tensor] = None,
    names: NamesFilter = None,
    engine: Optional[str] = None,
    cache=None,
    fwd_hooks: Sequence = (),
    also: Optional[Callable[[Tensor], Sink]] = None,
    fast_path: bool = True,
) -> DivergenceReport:
    """``engine``'s cached run against its uncached run: the one implementation of :func:`interpkv.compare`.

    The uncached reference is recorded first; the cached run is then compared
    against it hook by hook as it fires (``fwd_hooks`` active in both runs).
    ``also(valid)``, if given, builds a second sink that sees the cached run
    too (:class:`Tee`), for a caller that needs more of that run than the
    report (e.g. its logits) without running it again. ``fast_path``
    (``"interpkv"`` only): also run the cached steps with nothing recording
    them and compare their logits (:mod:`interpkv.diagnostics.fastpath`).
    """
    from interpkv.diagnostics.compare import _Comparator

    if steps is None:
        raise ValueError("compare needs steps=[...] for the cached run, e.g. steps=[8, 1, 1]")
    reference = capture(
        model, tokens, engine=engine, attention_mask=attention_mask, names=names, fwd_hooks=fwd_hooks
    )

    def sinks(valid: Tensor) -> Sink:
        comparator = _Comparator(reference, valid)
        return comparator if also is None else Tee(comparator, also(valid))

    fast_cache = None
    if fast_path and resolve(model, engine) == "interpkv":
        from interpkv.diagnostics import fastpath

        fast_cache = fastpath.fresh_cache(model, tokens.shape[0] if tokens.ndim > 1 else 1, tokens.shape[-1], cache)

    sink = run(
        model,
        tokens,
        sinks,
        engine=engine,
        steps=steps,
        attention_mask=attention_mask,
        names=names,
        cache=cache,
        fwd_hooks=fwd_hooks,
    )
    report = sink.report()
    report.dtype = reference.logits.dtype if reference.logits.is_floating_point() else None
    if fast_cache is not None:
        report = fastpath.audit(
            report, model, tokens, steps=steps, attention_mask=attention_mask, reference=reference,
            cache=fast_cache, fwd_hooks=fwd_hooks,
        )
    return report
