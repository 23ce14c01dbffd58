"""Engines: whose KV cache :func:`interpkv.compare` audits.

An *engine* is an implementation of cached inference driven chunk by chunk
and recorded at TransformerLens hook names and absolute positions, so one
:class:`~interpkv.DivergenceReport` (``first_divergence``, plots, HTML)
describes any of them:

- ``"interpkv"`` (:func:`interpkv.diagnostics.capture.run`): interpkv's own
  :class:`~interpkv.KVCache`; the default for a HookedTransformer.
- ``"transformer_lens"`` (:mod:`interpkv.diagnostics.engines.transformer_lens`): TransformerLens's own
  ``past_kv_cache`` path on the same HookedTransformer.
- ``"hf"`` (:mod:`interpkv.diagnostics.engines.hf`): a ``transformers`` causal LM with its own cache
  (``DynamicCache`` by default); the default for a ``PreTrainedModel``.
- ``"transformer_bridge"`` (:mod:`interpkv.diagnostics.engines.transformer_bridge`): a TransformerLens
  ``TransformerBridge`` through its own HF cache (``DynamicCache`` by
  default, or a ``StaticCache``); the default for a bridge.

``"interpkv"`` and ``"transformer_lens"`` need transformer-lens 3.x
(HookedTransformer); ``"hf"`` needs no TransformerLens and
``"transformer_bridge"`` any TransformerLens with a ``TransformerBridge``
(4.x, or 3.9), so both run under TransformerLens 4.

In every case the reference is the same model, same engine, run once on all
tokens without a cache. :mod:`interpkv.diagnostics.engines._common` holds what
the runners share (positions, the valid grid, chunk bounds). Nothing here
changes a model or another library's classes: the fault injectors that patch
TransformerLens's and HF's caches, and the TransformerLens findings, are
:mod:`interpkv.verify.engine_faults` and :mod:`interpkv.verify.findings`.
"""

from typing import Callable, Optional, Sequence

from torch import Tensor

from interpkv.core import tl as _tl
from interpkv.diagnostics import fastpath
from interpkv.diagnostics.capture import NamesFilter, RecordBuilder, Sink
from interpkv.diagnostics.capture import run as _run_interpkv
from interpkv.diagnostics.comparator import Comparator
from interpkv.diagnostics.engines import hf, transformer_bridge, transformer_lens
from interpkv.diagnostics.record import Record
from interpkv.diagnostics.report import DivergenceReport

__all__ = ["ENGINES", "resolve", "run", "capture", "compare", "Tee"]

ENGINES = ("interpkv", "transformer_lens", "hf", "transformer_bridge")


def resolve(model, engine: Optional[str] = None) -> str:
    """The engine name for ``model`` (``engine`` checked, or the model's default).

    Raises:
        ValueError: an unknown engine, or one that cannot run this kind of model.
    """
    hooked = isinstance(model, _tl.HookedTransformer)
    bridge = _tl.is_transformer_bridge(model)
    if engine is None:
        engine = "interpkv" if hooked else "transformer_bridge" if bridge else "hf"
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "transformer_bridge":
        if not bridge:
            raise ValueError(
                f"engine='transformer_bridge' runs a TransformerLens TransformerBridge, got {type(model).__name__}; "
                "for a transformers model use engine='hf' (interpkv.zoo.load_bridge(name) gives a bridge)"
            )
    elif engine == "hf":
        from transformers import PreTrainedModel  # deferred: transformers, only for engine='hf'

        if not isinstance(model, PreTrainedModel):
            instead = (
                "for a TransformerBridge use engine='transformer_bridge' (bridge.original_model is its HF model)"
                if bridge else "for a HookedTransformer use engine='interpkv' or 'transformer_lens' "
                "(interpkv.zoo.load_pair(name) gives both models)"
            )
            raise ValueError(
                f"engine='hf' runs a transformers PreTrainedModel, got {type(model).__name__}; {instead}"
            )
    elif not hooked:
        _tl.require(f"engine={engine!r}")  # under TransformerLens 4 (or none) no model can be one: say why
        other = "engine='transformer_bridge' for a TransformerBridge" if bridge else "engine='hf' for a transformers model"
        raise ValueError(
            f"engine={engine!r} runs a TransformerLens HookedTransformer, got {type(model).__name__}; use {other}"
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
    ``transformers`` Cache or a :data:`.hf.CacheFactory`; for
    ``"transformer_bridge"`` the same, the factory called with the bridge's
    ``original_model``; TransformerLens always gets a fresh cache. ``fwd_hooks``: TransformerLens hooks active in
    the run (``"interpkv"`` only).
    """
    engine = resolve(model, engine)
    if fwd_hooks and engine != "interpkv":
        raise ValueError(
            f"fwd_hooks apply to engine='interpkv' only, got engine={engine!r}; add the hooks to the model instead"
        )
    if engine == "hf":
        return hf.run(model, tokens, sink_factory, steps=steps, attention_mask=attention_mask, names=names, cache=cache)
    if engine == "transformer_bridge":
        return transformer_bridge.run(
            model, tokens, sink_factory, steps=steps, attention_mask=attention_mask, names=names, cache=cache
        )
    if engine == "transformer_lens":
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
        model, tokens, RecordBuilder, engine=engine, steps=steps, attention_mask=attention_mask, names=names,
        cache=cache, fwd_hooks=fwd_hooks,
    )
    meta = {"steps": list(steps) if steps is not None else None, "engine": resolve(model, engine)}
    if isinstance(model, _tl.HookedTransformer) or _tl.is_transformer_bridge(model):
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
    prefix: int = 0,
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
    if steps is None:
        raise ValueError("compare needs steps=[...] for the cached run, e.g. steps=[8, 1, 1]")
    reference = capture(
        model, tokens, engine=engine, attention_mask=attention_mask, names=names, fwd_hooks=fwd_hooks
    )
    if prefix:  # the cache holds the first ``prefix`` positions: the cached run feeds the rest
        reference.valid[:, :prefix] = False
        for mask in reference.computed_masks.values():
            mask[:, :prefix] = False
        tokens = tokens[:, prefix:]
        attention_mask = None if attention_mask is None else attention_mask[:, prefix:]

    def sinks(valid: Tensor) -> Sink:
        comparator = Comparator(reference, valid)
        return comparator if also is None else Tee(comparator, also(valid))

    fast_cache = None
    if fast_path and resolve(model, engine) == "interpkv":
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
