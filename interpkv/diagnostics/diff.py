"""``interpkv.diff``: two Records compared site by site (see :mod:`interpkv.diagnostics.stats`)."""

from interpkv import tolerances
from interpkv.diagnostics.assemble import fill_value
from interpkv.diagnostics.record import Record, is_attention_hook
from interpkv.diagnostics.report import DivergenceReport
from interpkv.diagnostics.stats import (
    StatsTable,
    check_shapes,
    kl_divergence,
    pad_attention,
    pad_positions,
    pad_valid,
    site_stats,
)

__all__ = ["diff"]


def diff(a: Record, b: Record) -> DivergenceReport:
    """Compare two Records site by site; ``b`` is the reference.

    Works for any two Records of the same architecture and tokens: cached vs
    uncached, float16 vs float32, patched vs clean.

    Args:
        a: the run under test.
        b: the reference run.

    Returns:
        A :class:`DivergenceReport` over the hooks both captured, in ``b``'s
        forward order. Sites are matched by absolute position
        (:meth:`~interpkv.Record.absolute`), so a ragged batch and its rows
        run alone, or a chunked and a one-shot run, line up whatever their padding.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("gpt2", dtype=torch.float64)
    >>> tokens = torch.arange(10)[None]
    >>> report = interpkv.diff(interpkv.capture(model, tokens, steps=[5, 5]),
    ...                        interpkv.capture(model, tokens))
    >>> report.ok(atol=1e-10, rtol=1e-10)
    True
    """
    a, b = a.absolute(), b.absolute()
    if a.valid.shape[0] != b.valid.shape[0]:
        raise ValueError(
            f"the records have batch sizes {a.valid.shape[0]} and {b.valid.shape[0]}; "
            "diff compares runs over the same rows"
        )
    batch = b.valid.shape[0]
    n_positions = max(a.n_positions, b.n_positions)
    table = StatsTable(batch, n_positions)
    a_valid, b_valid = pad_valid(a.valid, n_positions), pad_valid(b.valid, n_positions)
    rows, positions = (a_valid & b_valid).nonzero(as_tuple=True)
    common = [h for h in b.order if h in a]
    for hook in common:
        x, y = a[hook], b[hook]
        check_shapes(hook, x, y)
        # Sites each run computed (its explicit mask, never a value): both -> compared,
        # one only -> infinite error, neither -> not a site.
        a_done, b_done = pad_valid(a.computed(hook), n_positions), pad_valid(b.computed(hook), n_positions)
        hook_rows, hook_positions = (a_done & b_done).nonzero(as_tuple=True)
        miss_rows, miss_positions = (a_done ^ b_done).nonzero(as_tuple=True)
        if is_attention_hook(hook):
            fill = fill_value(hook)
            x, y = pad_attention(x, n_positions, fill), pad_attention(y, n_positions, fill)
            x_sites = x.permute(0, 2, 1, 3)[hook_rows, hook_positions]  # (n, H, P)
            y_sites = y.permute(0, 2, 1, 3)[hook_rows, hook_positions]
        else:
            x_sites = pad_positions(x, n_positions)[hook_rows, hook_positions]  # (n, ...)
            y_sites = pad_positions(y, n_positions)[hook_rows, hook_positions]
        table.put(hook, hook_rows, hook_positions, site_stats(x_sites, y_sites))
        table.missing(hook, miss_rows, miss_positions)
    logits_a = pad_positions(a.logits, n_positions)[rows, positions]
    logits_b = pad_positions(b.logits, n_positions)[rows, positions]
    table.kl[rows, positions] = kl_divergence(logits_a, logits_b).cpu()
    report = DivergenceReport(
        common,
        table.stats,
        table.kl,
        only_in_a=[h for h in a.order if h not in b],
        only_in_b=[h for h in b.order if h not in a],
        skipped={**b.skipped, **a.skipped},
    )
    report.dtype = tolerances.coarser(*(r.logits.dtype for r in (a, b) if r.logits.is_floating_point()))
    return report
