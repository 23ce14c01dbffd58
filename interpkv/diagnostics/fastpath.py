"""The fast path under audit: the cached steps run again with nothing recording them.

Recording a hook point makes the forward take the explicit path there
(attention scores and pattern materialized, unfused norms), because the hook
must see those tensors; a forward nobody records takes the fast path
(``F.scaled_dot_product_attention``, fused norms). So a comparison that
records every hook audits the explicit path only, while ``interpkv.forward``
and ``generate`` without hooks run the fast one. :func:`interpkv.compare`
therefore also runs the same cached steps through a fresh cache with only
the caller's ``fwd_hooks`` and compares their logits with the uncached
reference: the report's :data:`FAST_LOGITS` sites (``report.stats[FAST_LOGITS]``,
listed in ``report.audited``, not in ``report.hooks``), which ``ok()`` and
``first_divergence()`` check after every hook and the logits.
"""

from typing import Optional, Sequence

import torch
from torch import Tensor

from interpkv.core.forward import forward
from interpkv.core.inputs import as_inputs
from interpkv.core.positions import absolute_positions
from interpkv.diagnostics.capture import split_steps
from interpkv.diagnostics.record import Record
from interpkv.diagnostics.report import DivergenceReport
from interpkv.diagnostics.stats import StatsTable, site_stats

__all__ = ["FAST_LOGITS", "fresh_cache", "audit"]

FAST_LOGITS = "fast_path.logits"
"""Report site family: the logits of the cached steps run with no recording hook (the fast path)."""


def fresh_cache(model, batch: int, n_tokens: int, cache):
    """A cache for the fast-path run, like the one the recorded run gets (taken before it runs)."""
    from interpkv.cache.kvcache import KVCache

    if cache is None:
        return KVCache.for_model(model, batch)
    if callable(cache):
        return cache(model, batch, n_tokens)
    return cache.fork()


@torch.no_grad()
def audit(
    report: DivergenceReport,
    model,
    tokens: Tensor,
    *,
    steps: Sequence[int],
    attention_mask: Optional[Tensor],
    reference: Record,
    cache,
    fwd_hooks: Sequence = (),
) -> DivergenceReport:
    """Add :data:`FAST_LOGITS` to ``report``: the unrecorded cached run against ``reference``'s logits.

    Args:
        report: the recorded comparison (changed in place and returned).
        reference: the uncached reference Record (absolute layout).
        cache: a :func:`fresh_cache`.
    """
    tokens, mask = as_inputs(model, tokens, attention_mask)
    chunks = split_steps(tokens.shape[1], steps)
    q_pos_all = absolute_positions(mask, cache.next_positions.to(mask.device))  # (B, T)
    table = StatsTable(*reference.valid.shape)
    start = 0
    for n in chunks:
        logits = forward(
            model, tokens[:, start : start + n], cache=cache, attention_mask=mask[:, start : start + n],
            fwd_hooks=fwd_hooks,
        )
        q_pos = q_pos_all[:, start : start + n].to(logits.device)
        rows, cols = (q_pos >= 0).nonzero(as_tuple=True)
        positions = q_pos[rows, cols]
        ref = reference.logits.to(logits.device)
        table.put(FAST_LOGITS, rows, positions, site_stats(logits[rows, cols], ref[rows, positions]))
        start += n
    report.stats[FAST_LOGITS] = table.stats[FAST_LOGITS]
    report.audited = [*report.audited, FAST_LOGITS]
    return report
