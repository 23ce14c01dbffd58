"""The records of provenance: an :class:`Intervention`, the positions it declares (:class:`Where`).

Both are immutable and compared by value (a ``region`` anchor by identity:
the tensor of one generation), so a call's set of interventions can be
compared with a span's by plain equality.
"""

import dataclasses
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Bound", "Where", "Intervention", "Declared", "declare", "NONE"]

NONE: Tuple = ()  # no interventions
Bound = Optional[Union[int, Tuple[int, ...]]]


@dataclasses.dataclass(frozen=True, eq=False)
class Where:
    """Positions an intervention declares it acts on (None fields: no limit).

    ``start`` / ``stop``: absolute positions ``start <= p < stop``, an int or
    one per row. ``positions``: only these. ``region``: ``"prompt"`` /
    ``"generated"`` inside a generation, resolved against ``anchor`` (each
    row's first generated position, the tensor of that generation).
    """

    start: Bound = None
    stop: Bound = None
    positions: Optional[Tuple[int, ...]] = None
    region: Optional[str] = None
    anchor: Optional[Tensor] = None

    def _key(self):
        anchor = id(self.anchor) if self.anchor is not None else None
        return (self.start, self.stop, self.positions, self.region, anchor)

    def __eq__(self, other):
        return isinstance(other, Where) and self._key() == other._key() and (self.anchor is other.anchor)

    def __hash__(self):
        return hash(self._key())

    def resolved(self) -> "Where":
        """The same positions with ``region`` turned into per-row ``start`` / ``stop`` (for a file)."""
        if self.region is None or self.anchor is None:
            return self
        first = tuple(int(x) for x in self.anchor.tolist())
        if self.region == "generated":
            start = first if self.start is None else _tighter(self.start, first, max)
            return dataclasses.replace(self, start=start, region=None, anchor=None)
        stop = first if self.stop is None else _tighter(self.stop, first, min)
        return dataclasses.replace(self, stop=stop, region=None, anchor=None)

    def selects(self, pos: Tensor) -> Tensor:
        """``[batch, kv_pos]`` bool: which of ``pos`` (absolute positions) it acts on (all if unknown)."""
        batch = pos.shape[0]
        out = pos >= 0
        for bound, lower in ((self.start, True), (self.stop, False)):
            t = _bound_tensor(bound, batch, pos.device)
            if t is False:
                return out
            if t is not None:
                out = out & ((pos >= t) if lower else (pos < t))
        if self.positions is not None:
            out = out & torch.isin(pos, torch.tensor(self.positions, dtype=pos.dtype, device=pos.device))
        if self.region is not None and self.anchor is not None:
            if self.anchor.shape[0] != batch:
                return pos >= 0
            first = self.anchor.to(pos.device)[:, None]
            out = out & ((pos >= first) if self.region == "generated" else (pos < first))
        return out

    def text(self) -> str:
        parts = []
        for name in ("start", "stop", "positions", "region"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={list(value) if isinstance(value, tuple) else value!r}")
        return ", ".join(parts)

    def to_json(self) -> dict:
        w = self.resolved()
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                (("start", w.start), ("stop", w.stop), ("positions", w.positions), ("region", w.region))
                if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> "Where":
        def number(x) -> int:
            if isinstance(x, bool) or not isinstance(x, int) or abs(x) >= 2**62:
                raise ValueError(f"a declared position {x!r} is not an int64 position")
            return x

        def bound(v):
            return tuple(number(x) for x in v) if isinstance(v, list) else (None if v is None else number(v))

        positions, region = data.get("positions"), data.get("region")
        if region not in (None, "prompt", "generated"):
            raise ValueError(f"unknown region {region!r}")
        return cls(start=bound(data.get("start")), stop=bound(data.get("stop")),
                   positions=None if positions is None else tuple(number(x) for x in positions), region=region)


def _tighter(a, b, pick):
    if isinstance(a, int):
        a = (a,) * len(b)
    if len(a) != len(b):
        return b
    return tuple(pick(x, y) for x, y in zip(a, b))


def _bound_tensor(bound, batch: int, device):
    if bound is None:
        return None
    if isinstance(bound, int):
        return torch.tensor(bound, device=device)
    if len(bound) != batch:  # rows were selected or repeated since: unknown, act everywhere
        return False
    return torch.tensor(bound, device=device)[:, None]


@dataclasses.dataclass(frozen=True, eq=False)
class Intervention:
    """One thing that edited the forward pass.

    Attributes:
        kind: ``"hook"`` (a call's ``fwd_hooks``), ``"model hook"`` (held by the
            model), ``"sae"`` or ``"fault"``.
        point: the hook point (``"cache"`` for a fault).
        label: a short human name, e.g. ``"steering.add(v#3f2a, start=5)"``.
        digest: the identity two interventions are compared by.
        where: the positions it declares it acts on (None: every position).
        acts: False for one that leaves values unchanged (an SAE with its error term).
        automatic: False when the digest is the object's identity (name the hook).
    """

    kind: str
    point: str
    label: str
    digest: str
    where: Optional[Where] = None
    acts: bool = True
    automatic: bool = True

    def _key(self):
        return (self.kind, self.point, self.digest, self.where, self.acts)

    def __eq__(self, other):
        return isinstance(other, Intervention) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def text(self) -> str:
        # The declared positions, unless the label already states them (a steering label reads as its call:
        # "steering.add(v#3f2a, start=5)"); a region resolved in a file shows where it resolved to.
        shown = self.where.text() if self.where is not None else ""
        where = f" [{shown}]" if shown and shown not in self.label else ""
        kind = "" if self.kind == "hook" else f"{self.kind} "
        return f"{kind}{self.point} {self.label}{where}"

    def __repr__(self) -> str:
        return f"<{self.text()}>"

    def to_json(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind, "point": self.point, "label": self.label, "digest": self.digest}
        if self.where is not None:
            out["where"] = self.where.to_json()
        if not self.acts:
            out["acts"] = False
        if not self.automatic:
            out["automatic"] = False
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Intervention":
        where = data.get("where")
        return cls(str(data["kind"]), str(data["point"]), str(data["label"]), str(data["digest"]),
                   None if where is None else Where.from_json(where), bool(data.get("acts", True)),
                   bool(data.get("automatic", True)))


# ------------------------------------------------------ declared identities
@dataclasses.dataclass(frozen=True)
class Declared:
    """What a hook says about itself: a name (or values to digest), the positions it acts on, and the
    arguments its label shows (see :func:`declare`)."""

    label: str
    values: tuple = ()
    name: Optional[str] = None
    where: Optional[Where] = None
    shown: tuple = ()
    keywords: tuple = ()


def declare(hook, label: str, *, values: tuple = (), name: Optional[str] = None, start=None, stop=None,
            positions: Optional[Sequence[int]] = None, region: Optional[str] = None,
            shown: Sequence[Tuple[str, Any]] = (), keywords: Sequence[Tuple[str, Any]] = ()):
    """Attach an exact identity and declared positions to ``hook`` (returns ``hook``).

    ``name`` (if given) is the identity; else ``label`` and the content digest
    of ``values``. ``start`` / ``stop`` / ``positions`` / ``region`` as in
    :mod:`interpkv.steering`: the hook must act on no other position.

    The label reads as the call that made the hook when ``shown`` or
    ``keywords`` is given: ``label(v#3f2a, scale=2.0, start=5)``, each
    ``(text, value)`` of ``shown`` as ``text#`` and the first four hex digits
    of the value's content digest (just ``text`` when the hook is named: a
    named hook's values are not digested), each of ``keywords`` as
    ``text=value``, then the declared positions and ``name=``. Without them
    the label is ``name``, or ``label#digest``.
    """
    if region is not None and region not in ("prompt", "generated"):
        raise ValueError(f'region is "prompt" or "generated", got {region!r}')
    where = None
    if any(x is not None for x in (start, stop, positions, region)):
        where = Where(_as_bound(start), _as_bound(stop),
                      None if positions is None else tuple(int(p) for p in positions), region)
    hook._interpkv_declared = Declared(label, tuple(values), name, where, tuple(shown), tuple(keywords))
    return hook


def _as_bound(value) -> Bound:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.tolist()  # once, when the hook is made
    if isinstance(value, (list, tuple)):
        return tuple(int(x) for x in value)
    return int(value)


