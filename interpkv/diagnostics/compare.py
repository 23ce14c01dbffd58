"""``interpkv.compare``: a cached run checked against the uncached reference as it fires.

:func:`compare` never holds two full sets of activations: it records the
uncached reference, then runs the cached chunks comparing each activation
against the reference as it fires and dropping it.
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from interpkv.cache import provenance
from interpkv.cache.kvcache import KVCache
from interpkv.core import calls
from interpkv.core import tl as _tl
from interpkv.core.forward import Hook
from interpkv.core.inputs import TokensLike, as_inputs
from interpkv.diagnostics.assemble import attention_rows, fill_value
from interpkv.diagnostics.capture import NamesFilter, Sink
from interpkv.diagnostics.cause import blame
from interpkv.diagnostics.names import resolve_names
from interpkv.diagnostics.record import LOGITS, Record
from interpkv.diagnostics.report import DivergenceReport
from interpkv.diagnostics.stats import StatsTable, check_shapes, kl_divergence, site_stats

__all__ = ["compare"]


class _Comparator(Sink):
    """A sink comparing each activation to a reference Record as it fires.

    Activations wait in a small per-hook buffer (at most ``FLUSH_SITES``
    positions) and are compared in one batched call, then dropped: a chunk of
    one token costs an append, not a dozen small tensor ops per hook.
    """

    FLUSH_SITES = 64

    def __init__(self, reference: Record, valid: Tensor):
        if valid.shape != reference.valid.shape:
            raise ValueError(
                f"the reference covers positions {tuple(reference.valid.shape)} (batch, pos) but "
                f"this run covers {tuple(valid.shape)}; compare the same tokens and mask"
            )
        self.reference = reference
        self.table = StatsTable(*valid.shape)
        self.seen: Dict[str, None] = {}
        self.skipped: Dict[str, str] = dict(reference.skipped)
        self.pending: Dict[str, list] = {}
        self.pending_sites: Dict[str, int] = {}
        self._memo: Optional[Tuple[Tensor, Tensor, Tensor, Tensor, bool]] = None
        self._key_memo: Optional[Tuple[Tensor, bool]] = None

    def activation(self, name, act, q_pos, k_pos):
        self.seen[name] = None
        if name not in self.reference:
            return
        check_shapes(name, act, self.reference[name])
        # ``act`` is already a private copy (see interpkv.diagnostics.capture.run).
        # Sites (attention hooks: their rows and whether the keys are plain) are
        # worked out once per chunk: every hook of a chunk shares q_pos and k_pos.
        sites = self._sites(q_pos) if k_pos is None else (self._sites(q_pos)[0], self._keys(q_pos, k_pos))
        self._push(name, (act, q_pos, k_pos, sites))

    def skip(self, name, reason):
        self.seen.pop(name, None)
        self.pending.pop(name, None)
        self.pending_sites.pop(name, None)
        self.table.stats.pop(name, None)
        self.skipped[name] = reason

    def logits(self, logits, q_pos):
        self._push(LOGITS, (logits, q_pos, None, self._sites(q_pos)))

    def _push(self, name: str, entry) -> None:
        self.pending.setdefault(name, []).append(entry)
        self.pending_sites[name] = self.pending_sites.get(name, 0) + entry[1].shape[1]
        if self.pending_sites[name] >= self.FLUSH_SITES:
            self._flush(name)

    def finish(self) -> None:
        for name in list(self.pending):
            self._flush(name)

    def _sites(self, q_pos: Tensor):
        """Rows, chunk columns and absolute positions of a chunk's real tokens.

        Memoized on the chunk's ``q_pos`` object, which every hook of a chunk
        shares. ``dense`` (every entry a real token): the sites are
        ``act.flatten(0, 1)`` in that order, no gather needed.
        """
        if self._memo is None or self._memo[0] is not q_pos:
            rows, cols = (q_pos >= 0).nonzero(as_tuple=True)
            dense = rows.shape[0] == q_pos.numel()
            self._memo = (q_pos, rows, cols, q_pos[rows, cols], dense)
        return self._memo[1:]

    def _keys(self, q_pos: Tensor, k_pos: Tensor):
        """Whether a chunk's keys are every position ``0..S-1`` in order, in every row.

        Then its attention rows need no gather: the values go to key columns
        ``:S`` (the common case: no padding, no eviction). Memoized on ``k_pos``,
        which every attention hook of a chunk shares.
        """
        if self._key_memo is None or self._key_memo[0] is not k_pos:
            n_k = k_pos.shape[1]
            plain = self._sites(q_pos)[3] and bool(
                (k_pos == torch.arange(n_k, device=k_pos.device)).all()
            )
            self._key_memo = (k_pos, plain)
        return self._key_memo[1]

    def _flush(self, name: str) -> None:
        entries = self.pending.pop(name, [])
        self.pending_sites.pop(name, None)
        if not entries:
            return
        ref = self.reference[name]
        if entries[0][2] is not None:
            a_sites, rows, positions = self._attention_sites(name, entries, ref.shape[-1])
            b_sites = ref[..., : a_sites.shape[-1]].permute(0, 2, 1, 3)[rows, positions]  # (n, H, keys)
        else:
            a_parts, row_parts, pos_parts = [], [], []
            for act, _, _, (rows, cols, positions, dense) in entries:
                a_parts.append(act.flatten(0, 1) if dense else act[rows, cols])
                row_parts.append(rows)
                pos_parts.append(positions)
            rows, positions = torch.cat(row_parts), torch.cat(pos_parts)
            a_sites = torch.cat([a.to(a_parts[0].dtype) for a in a_parts])
            b_sites = ref[rows, positions]
        self.table.put(name, rows, positions, site_stats(a_sites, b_sites))
        if name != LOGITS:  # computed here but not in the reference (its explicit mask)
            absent = ~self.reference.computed(name)[rows, positions]
            self.table.missing(name, rows[absent], positions[absent])
        if name == LOGITS:
            self.table.kl[rows, positions] = kl_divergence(a_sites, b_sites).cpu()

    def _attention_sites(self, name, entries, n_positions: int):
        """``(values [n, head_index, keys], rows, positions)`` of attention-shaped entries.

        The values are :func:`~interpkv.diagnostics.assemble.attention_rows`'s
        (``fill_value(name)``, as in the reference Record, for keys not present
        and after their query) at key positions up to the last query of the
        flush: later keys are future keys of every site, the fill in both runs,
        which adds no error and no norm.
        """
        fill = fill_value(name)
        if not all(plain for _, _, _, (_, plain) in entries):
            return self._attention_sites_by_row(entries, n_positions, fill)
        rows = torch.cat([sites[0] for _, _, _, sites in entries])
        positions = torch.cat([q_pos.flatten() for _, q_pos, _, _ in entries])
        n_keys = int(positions.max()) + 1
        first = entries[0][0]
        dtype = first.dtype if first.is_floating_point() else torch.float64
        out = first.new_full((rows.shape[0], first.shape[1], n_keys), fill, dtype=dtype)  # (n, H, keys)
        i = 0
        for act, q_pos, k_pos, _ in entries:
            batch, _, n_q, n_k = act.shape
            future = k_pos[:, None, None, :] > q_pos[:, None, :, None]  # (B, 1, T, S)
            src = act.to(dtype).masked_fill(future, fill)  # (B, H, T, S)
            out[i : i + batch * n_q, :, :n_k] = src.transpose(1, 2).flatten(0, 1)
            i += batch * n_q
        return out, rows, positions

    @staticmethod
    def _attention_sites_by_row(entries, n_positions: int, fill: float):
        a_parts, row_parts, pos_parts = [], [], []
        for act, q_pos, k_pos, _ in entries:
            for b in range(q_pos.shape[0]):
                q_abs, a_rows = attention_rows(act, q_pos, k_pos, n_positions, b, fill)
                a_parts.append(a_rows.transpose(0, 1))  # (nq, H, P)
                row_parts.append(torch.full_like(q_abs, b))
                pos_parts.append(q_abs)
        positions = torch.cat(pos_parts)
        n_keys = int(positions.max()) + 1 if positions.numel() else 0
        a_sites = torch.cat([a[..., :n_keys].to(a_parts[0].dtype) for a in a_parts])
        return a_sites, torch.cat(row_parts), positions

    def report(self) -> DivergenceReport:
        for name, done in self.reference.computed_masks.items():  # computed there, not here
            if name in self.table.stats and name not in self.skipped:
                unseen = done.cpu() & self.reference.valid.cpu() & torch.isnan(self.table.stats[name]["max_abs"])
                self.table.missing(name, *unseen.nonzero(as_tuple=True))
        order = self.reference.order
        common = [h for h in order if h in self.table.stats and h not in self.skipped]
        return DivergenceReport(
            common,
            self.table.stats,
            self.table.kl,
            only_in_a=[h for h in self.seen if h not in self.reference and h not in self.skipped],
            only_in_b=[h for h in order if h not in (LOGITS, *self.seen, *self.skipped)],
            skipped=self.skipped,
        )


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
    from interpkv.diagnostics import engines


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
