"""Notebook display of result objects: short ``__repr__`` text and ``_repr_html_`` tables.

Every result object (``KVCache``, ``Record``, ``DivergenceReport``,
``Generation``, ``GenerationDiff``) shows a summary: counts, shapes and the
numbers that answer "is it right?", never the contents of a tensor. The
helpers here format those summaries; each class decides what goes in them.
"""

import html
import math
from typing import Iterable, List, Optional, Sequence, Tuple

__all__ = ["fmt", "short_list", "html_summary", "nbytes_text", "kvcache_html"]

_STYLE = (
    "<style>table.interpkv{border-collapse:collapse;font-size:0.9em;margin:0.2em 0}"
    "table.interpkv td,table.interpkv th{border:1px solid #ccc;padding:0.1em 0.5em;text-align:left}</style>"
)


def fmt(value: object) -> str:
    """A table cell: floats to 3 significant digits, None as ``-``, bools as yes/no."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.3g}"
    return str(value)


def short_list(values: Sequence, limit: int = 8) -> str:
    """``[1, 2, 3]``, or the first ``limit`` items and a count of the rest."""
    values = list(values)
    shown = ", ".join(fmt(v) for v in values[:limit])
    rest = len(values) - limit
    return f"[{shown}, ... +{rest}]" if rest > 0 else f"[{shown}]"


def nbytes_text(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _table(rows: Iterable[Sequence[object]], header: Optional[Sequence[str]] = None) -> str:
    parts: List[str] = ['<table class="interpkv">']
    if header:
        parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def html_summary(
    title: str,
    fields: Sequence[Tuple[str, object]],
    detail: Optional[Tuple[Sequence[str], Sequence[Sequence[object]]]] = None,
    note: str = "",
) -> str:
    """A bold title, a two-column field/value table and an optional detail table.

    Args:
        title: the class name (and a word of context).
        fields: ``(name, value)`` rows of the summary table.
        detail: ``(header, rows)`` of a second table (per row, per family, per step...).
        note: a line under the tables (e.g. "first 20 of 60 steps shown").
    """
    parts = [f"<div>{_STYLE}<b>{html.escape(title)}</b>", _table(fields)]
    if detail is not None:
        header, rows = detail
        parts.append(_table(rows, header))
    if note:
        parts.append(f"<small>{html.escape(note)}</small>")
    parts.append("</div>")
    return "".join(parts)


def kvcache_html(cache) -> str:
    """The notebook table of a :class:`~interpkv.cache.kvcache.KVCache` (kept here, out of the cache class)."""
    sig = cache.signature
    fields = [
        ("model", f"{sig['architecture']}, {sig['n_layers']} layers"),
        ("positional", sig["positional"]),
        ("stored heads", f"{sig['kv_heads']} kv heads x d_head {sig['d_head']}"),
        ("batch_size", cache.batch_size),
        ("seq_len (slots per row)", cache.seq_len),
        ("next_positions", short_list(cache.next_positions.tolist())),
        ("window", "none" if cache.window is None else f"{cache.window} (sinks {cache.sinks})"),
        ("dtype", str(cache.dtype).replace("torch.", "")),
        ("nbytes", f"{cache.nbytes:,} ({nbytes_text(cache.nbytes)})"),
        ("frozen", cache.frozen),
    ]
    return html_summary("KVCache", fields)
