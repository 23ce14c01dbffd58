"""``interpkv.compare``: a cached run checked against the uncached reference as it fires.

:func:`compare` never holds two full sets of activations: it records the
uncached reference, then runs the cached chunks comparing each activation
against the reference as it fires and dropping it
(:class:`~interpkv.diagnostics.comparator.Comparator`, through
:func:`interpkv.diagnostics.engines.compare` for every engine).
"""

from typing import Optional, Sequence

from torch import Tensor

from interpkv.cache import provenance
from interpkv.cache.kvcache import KVCache
from interpkv.core import calls
from interpkv.core import tl as _tl
from interpkv.core.forward import Hook
from interpkv.core.inputs import TokensLike, as_inputs
from interpkv.diagnostics import engines
from interpkv.diagnostics.capture import NamesFilter
from interpkv.diagnostics.cause import blame
from interpkv.diagnostics.names import resolve_names
from interpkv.diagnostics.report import DivergenceReport

__all__ = ["compare"]


@calls.entry
def compare(
    model,
    tokens: TokensLike,
    *,
    steps: Sequence[int],
    attention_mask: Optional[Tensor] = None,
    names: NamesFilter = None,
    fwd_hooks: Sequence[Hook] = (),
    engine: Optional[str] = None,
    cache=None,
    names_filter: NamesFilter = None,
    fast_path: bool = True,
) -> DivergenceReport:
    """Cached (chunked by ``steps``) against uncached, site by site.

    What it checks: the uncached run is recorded first (it is the reference,
    ``b``); the cached run, recorded at ``names``, is then compared against it
    hook by hook as it fires. Recording a hook point forces the explicit path
    there (scores materialized, unfused norms), so with ``fast_path`` (the
    default, ``engine="interpkv"``) the same cached steps also run once with
    nothing recording them, the fused path ``forward`` and ``generate`` take,
    and their logits are compared with the reference's: the report's
    ``"fast_path.logits"`` sites (``report.stats``, named in ``report.audited``),
    checked by ``ok()`` and ``first_divergence()`` after the hooks and logits
    (:mod:`interpkv.diagnostics.fastpath`). The
    cached run is compared as it fires, so only
    the statistics of the cached run survive (memory: one Record plus one
    chunk's activations).

    Args:
        model: a HookedTransformer.
        tokens: token ids ``[batch, pos]`` (or ``[pos]``), or (model with a
            tokenizer) a string or list of strings, left-padded for you.
        steps: chunk lengths of the cached run, summing to ``pos``.
        attention_mask: ``[batch, pos]`` (1 = real, 0 = padding).
        names: hooks to compare (as in :func:`interpkv.capture`).
        fwd_hooks: TransformerLens ``(name or filter, hook)`` pairs active in
            both runs (every chunk of the cached one), e.g. a steering vector.
        engine: whose cache runs (see :mod:`interpkv.diagnostics.engines`):
            ``"interpkv"`` (default for a HookedTransformer), ``"transformer_lens"``
            (TransformerLens's own ``past_kv_cache``) or ``"hf"`` (a
            ``transformers`` model's own cache; default for a ``PreTrainedModel``).
            The reference is the same model and engine run uncached.
        cache: the cache (or a factory ``(model, batch_size, max_len) -> cache``)
            the cached run uses: a :class:`~interpkv.KVCache` for ``"interpkv"``,
            a ``transformers`` Cache (e.g. ``StaticCache``) for ``"hf"``. A
            KVCache holding positions ``0..n-1`` (no padding) is continued:
            ``tokens`` is then the whole sequence, its first ``n`` tokens
            already in the cache, ``steps`` cover the rest, and sites before
            ``n`` are not compared; when the run diverges and the cache was
            written under other interventions (:attr:`KVCache.provenance`),
            ``report.cause`` says so.
        names_filter: TransformerLens's spelling of ``names`` (same meaning;
            see :mod:`interpkv.diagnostics.names`). Not with ``names``.
        fast_path: also audit the unrecorded cached run (above); False
            checks the recorded path only (one run fewer).

    Returns:
        A :class:`DivergenceReport` (cached = ``a``, uncached = ``b``). When it
        diverges with ``fwd_hooks`` and the same comparison without them does
        not, ``report.cause`` names the hooks (:mod:`interpkv.diagnostics.cause`);
        it is None otherwise (and when a caller's cache instance was given).

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("llama", dtype=torch.float64)
    >>> report = interpkv.compare(model, torch.arange(12)[None], steps=[6, 1, 1, 4])
    >>> report.ok(atol=1e-10, rtol=1e-10), report.first_divergence(atol=1e-10, rtol=1e-10)
    (True, None)
    """
    if isinstance(model, _tl.HookedTransformer) and cache is not None and not callable(cache):
        if not isinstance(cache, KVCache):
            raise TypeError(
                f"cache must be an interpkv.KVCache or a factory (model, batch_size, max_len) -> cache, "
                f"got {type(cache).__name__}"
            )
    names = resolve_names(names, names_filter, model=model)
    if isinstance(model, _tl.HookedTransformer):
        tokens, attention_mask = as_inputs(model, tokens, attention_mask)  # text tokenized once for both runs

    prefix, why = provenance.history(model, cache, tokens, fwd_hooks) if isinstance(cache, KVCache) else (0, None)

    def run(hooks) -> DivergenceReport:
        return engines.compare(
            model, tokens, steps=steps, attention_mask=attention_mask, names=names, engine=engine, cache=cache,
            fwd_hooks=hooks, prefix=prefix, fast_path=fast_path,
        )

    report = run(fwd_hooks)
    report.run_names = ("the cached run", "the uncached run")
    if cache is not None and not callable(cache):  # a caller's cache was consumed: no rerun to blame with
        report.cause = why if why is not None and not report.ok() else None
        return report
    report.cause = blame(fwd_hooks, not report.ok(), lambda: not run(()).ok())
    return report
