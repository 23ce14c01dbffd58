"""The public view of a cache's provenance (:class:`Provenance`) and its place in a cache file."""

import dataclasses
import json
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from interpkv._repr import html_summary
from interpkv.cache.fingerprint import weights_fingerprint
from interpkv.cache.provenance.records import Intervention
from interpkv.cache.provenance.spans import set_text
from interpkv.errors import CacheFileError

__all__ = ["Span", "Provenance", "describe", "adopt", "from_header", "HEADER_KEY"]

@dataclasses.dataclass(frozen=True)
class Span:
    """Stored slots written under one set of interventions.

    Attributes:
        slots: ``(first, end)`` slot indices (``cache.seq_len`` axis) the span covers.
        positions: ``(lowest, highest)`` absolute position stored in it, or None.
        interventions: what was active; None when unknown (a cache built with
            ``from_state``, or loaded from a file saved without provenance).
    """

    slots: Tuple[int, int]
    positions: Optional[Tuple[int, int]]
    interventions: Optional[Tuple[Intervention, ...]]


class Provenance:
    """What wrote each span of a cache's stored slots (``cache.provenance``).

    ``spans``: :class:`Span` s in slot order. ``weights``: the fingerprint of
    the weights (computed when first read; a loaded cache's is its file's,
    which :meth:`KVCache.load` checked). ``to_frame()``: a row per span and
    intervention.
    """

    def __init__(self, spans: List[Span], weights=None, model=None):
        self.spans = spans
        self._weights = weights
        self._model = weakref.ref(model) if model is not None else None

    @property
    def weights(self) -> Optional[str]:
        model = self._model() if self._weights is None and self._model is not None else None
        if model is not None:
            self._weights = weights_fingerprint(model)
        return self._weights

    @property
    def interventions(self) -> Tuple[Intervention, ...]:
        """Every distinct intervention that wrote any span, in first-seen order."""
        seen: Dict[Intervention, None] = {}
        for span in self.spans:
            for i in span.interventions or ():
                seen.setdefault(i, None)
        return tuple(seen)

    def _span_text(self, span: Span) -> str:
        where = "no position" if span.positions is None else (
            f"position {span.positions[0]}" if span.positions[0] == span.positions[1]
            else f"positions {span.positions[0]}-{span.positions[1]}")
        what = "unknown" if span.interventions is None else set_text(span.interventions)
        return f"{where}: {what}"

    def __repr__(self) -> str:
        if not self.spans:
            return "Provenance(empty)"
        shown = "; ".join(self._span_text(s) for s in self.spans[:4])
        more = f"; +{len(self.spans) - 4} spans" if len(self.spans) > 4 else ""
        return f"Provenance({shown}{more})"

    def to_frame(self):
        """A pandas DataFrame: a row per span and intervention (one row with none for a clean span)."""
        import pandas  # deferred: pandas, only when a frame is asked for

        rows = []
        for n, span in enumerate(self.spans):
            base = {"span": n, "first_slot": span.slots[0], "end_slot": span.slots[1],
                    "first_position": None if span.positions is None else span.positions[0],
                    "last_position": None if span.positions is None else span.positions[1]}
            items = span.interventions
            if not items:
                rows.append({**base, "kind": "unknown" if items is None else "none", "point": None,
                             "intervention": None, "digest": None, "declared_positions": None, "acts": None})
            for i in items or ():
                rows.append({**base, "kind": i.kind, "point": i.point, "intervention": i.label,
                             "digest": i.digest, "declared_positions": i.where.text() if i.where else None,
                             "acts": i.acts})
        frame = pandas.DataFrame(rows, columns=["span", "first_slot", "end_slot", "first_position",
                                                "last_position", "kind", "point", "intervention", "digest",
                                                "declared_positions", "acts"])
        frame.attrs["weights"] = self.weights  # the fingerprint, computed now if not yet known
        return frame

    COLUMNS = ("slots", "positions", "interventions")
    """The headers of :meth:`rows` (the notebook table, ``interpkv provenance`` and the HTML report)."""

    def rows(self) -> List[Tuple[str, str, str]]:
        """One ``(slots, positions, interventions)`` text row per span, as every table shows them.

        Slots and positions as ``first-last`` (one number for one), interventions
        as ``point label`` joined by ``; `` (``none``; ``unknown`` when not recorded).
        """

        def pair(a: int, b: int) -> str:
            return str(a) if a == b else f"{a}-{b}"

        return [(pair(s.slots[0], s.slots[1] - 1) if s.slots[1] > s.slots[0] else "-",
                 "-" if s.positions is None else pair(*s.positions),
                 "unknown" if s.interventions is None else set_text(s.interventions)) for s in self.spans]

    def _repr_html_(self) -> str:
        weights = self._weights or "(not computed yet: read .weights)"
        return html_summary("Provenance", [("spans", len(self.spans)), ("weights", weights)],
                            (list(self.COLUMNS), self.rows()))

    def to_json(self) -> str:
        return json.dumps({"version": 1, "spans": [
            {"slots": list(s.slots), "positions": None if s.positions is None else list(s.positions),
             "interventions": None if s.interventions is None else [i.to_json() for i in s.interventions]}
            for s in self.spans]}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, weights: Optional[str] = None) -> "Provenance":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("spans"), list):
            raise ValueError("not an interpkv provenance record (version 1)")
        spans = []
        for s in data["spans"]:
            items = s.get("interventions")
            slots = tuple(int(x) for x in s["slots"])
            positions = None if s.get("positions") is None else tuple(int(x) for x in s["positions"])
            if len(slots) != 2 or not 0 <= slots[0] < slots[1] or (positions is not None and len(positions) != 2):
                raise ValueError(f"a span's slots {slots} / positions {positions} are not [first, end] pairs")
            if items is not None and not isinstance(items, list):
                raise ValueError("a span's interventions are not a list")
            spans.append(Span(slots, positions,
                              None if items is None else tuple(Intervention.from_json(i) for i in items)))
        return cls(spans, weights)


def describe(cache) -> Provenance:
    """The :class:`Provenance` of ``cache``, spans by slot index (reads its slot ids and positions)."""
    length = cache.seq_len
    ids = cache.slot_ids.cpu()
    pos = cache.positions.cpu()
    spans_raw = cache._provenance
    # For each slot column, which recorded spans its rows belong to (rows agree unless a window compacted them).
    owner = torch.full((length,), -1, dtype=torch.long)
    mixed: Dict[int, set] = {}
    for n, (a, b, _) in enumerate(spans_raw):
        hit = ((ids >= a) & (ids < b)).any(dim=0)
        for col in hit.nonzero().flatten().tolist():
            if owner[col] >= 0 and owner[col] != n:
                mixed.setdefault(col, {int(owner[col])}).add(n)
            owner[col] = n
    spans: List[Span] = []
    col = 0
    while col < length:
        key = ("mixed", tuple(sorted(mixed[col]))) if col in mixed else int(owner[col])
        end = col + 1
        while end < length and (("mixed", tuple(sorted(mixed[end]))) if end in mixed else int(owner[end])) == key:
            end += 1
        if isinstance(key, tuple):
            seen: Dict[Intervention, None] = {}
            for n in key[1]:
                for i in spans_raw[n][2]:
                    seen.setdefault(i, None)
            items: Optional[Tuple[Intervention, ...]] = tuple(seen)
        else:
            items = None if key < 0 else spans_raw[key][2]
        real = pos[:, col:end][pos[:, col:end] >= 0]
        positions = None if real.numel() == 0 else (int(real.min()), int(real.max()))
        spans.append(Span((col, end), positions, items))
        col = end
    weights = cache.__dict__.get("_provenance_weights")
    return Provenance(spans, weights, cache.model)


def adopt(cache, provenance: Optional[Provenance]) -> None:
    """Give a cache built from stored slots (``load``) the spans of ``provenance`` (slot ids = slot indices)."""
    if provenance is None:  # a file saved before provenance: spans unknown
        return
    cache._provenance = tuple((s.slots[0], s.slots[1], s.interventions) for s in provenance.spans
                              if s.interventions is not None)
    cache._provenance_weights = provenance._weights


# ------------------------------------------------------------------ files
HEADER_KEY = "provenance"


def from_header(raw: dict, path: str) -> Optional[Provenance]:
    """The provenance in a cache file's header metadata ``raw`` (None if it has none)."""
    if HEADER_KEY not in raw:
        return None
    try:
        return Provenance.from_json(raw[HEADER_KEY], raw.get("weights_fingerprint"))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError, RecursionError) as error:
        # RecursionError: JSON nested too deeply (json.loads recurses)
        raise CacheFileError(f"{path}: corrupted provenance in the header ({type(error).__name__}: "
                             f"{str(error)[:200]})") from None
