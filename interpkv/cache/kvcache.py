"""``KVCache``: the multi-layer key/value cache bound to one HookedTransformer.

Keys are stored **after** rotary rotation, at the absolute position of each
token. A stored key is therefore final: it is never re-rotated when later
tokens arrive (TransformerLens 3.x stores raw keys and rotates the whole
history again on every step), and its position is recorded alongside it in
:attr:`KVCache.positions`, which rotary, ALiBi, windows and capture all read.

The whole class is here, in one body: binding, views, the forward protocol
(:meth:`KVCache.begin` / :meth:`KVCache.commit`, answering :class:`Slots`),
lifecycle (``freeze``, ``crop``, ``fork``, ``select``, ``repeat``),
:meth:`KVCache.from_state` and the two calls into persistence
(:meth:`KVCache.save` / :meth:`KVCache.load`, :mod:`interpkv.cache.persist`).
Beside it, pure checks of what callers hand it (:func:`check_state`,
:func:`validated_rows`). Per-layer storage is its own class
(:class:`~interpkv.cache.layer.LayerCache`); the window rule is
:mod:`interpkv.cache.window`; what a cache is bound to,
:mod:`interpkv.cache.signature`.
"""

import contextlib
import copy
import os
import weakref
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interpkv._repr import kvcache_html
from interpkv.cache import persist, provenance
from interpkv.cache.bound import PositionBound
from interpkv.cache.layer import LayerCache
from interpkv.cache.signature import describe, model_signature
from interpkv.cache.window import (
    check_holds_required,
    check_window_args,
    compact_positions,
    eviction,
)
from interpkv.core import calls
from interpkv.core import tl as _tl
from interpkv.core.arguments import check_memory
from interpkv.core.axes import PAD_POSITION
from interpkv.errors import CacheMismatchError, warn_graph_kept

__all__ = ["KVCache", "Slots", "model_signature", "check_state", "validated_rows"]

_INITIAL_CAPACITY = 64


@dataclass(frozen=True)
class Slots:
    """Where one forward call reads and writes, from :meth:`KVCache.begin`.

    Attributes:
        q_pos: ``Int[Tensor, "batch pos"]``, absolute positions of the new
            tokens (``-1`` for padding).
        k_pos: ``Int[Tensor, "batch kv_pos"]``, positions of every key the
            call attends: stored slots, then the new ones.
        start: first slot the new keys and values are written to.
    """

    q_pos: Tensor
    k_pos: Tensor
    start: int

    @property
    def end(self) -> int:
        """One past the last slot written (= ``k_pos.shape[1]``)."""
        return self.start + self.q_pos.shape[1]


def grown(table: Tensor, used: int, capacity: int, fill: int) -> Tensor:
    """``table`` ``[batch, n]`` widened to ``capacity`` columns, keeping the first ``used``."""
    grown = table.new_full((table.shape[0], capacity), fill)
    grown[:, :used] = table[:, :used]
    return grown


def validated_rows(batch_indices, batch_size: int, device) -> Tensor:
    """Row indices for ``select``: a 1-D list or tensor of ints in ``[0, batch_size)``."""
    if isinstance(batch_indices, Tensor):
        if batch_indices.dtype == torch.bool or batch_indices.is_floating_point():
            raise TypeError(
                f"select(batch_indices) takes integer row indices, got a {batch_indices.dtype} tensor; "
                "for a boolean row mask pass mask.nonzero().flatten()"
            )
        if batch_indices.ndim != 1:
            raise ValueError(
                f"select(batch_indices) takes a 1-D list of row indices, got shape {tuple(batch_indices.shape)}"
            )
        rows = batch_indices.tolist()
    else:
        if isinstance(batch_indices, (str, bytes)) or not hasattr(batch_indices, "__iter__"):
            raise TypeError(f"select(batch_indices) takes a list of row indices, got {batch_indices!r}")
        rows = list(batch_indices)
        bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, int)]
        if bad:
            raise TypeError(f"select(batch_indices) takes integer row indices, got {bad[:3]!r}")
    if not rows:
        raise ValueError("select(batch_indices) needs at least one row index (got none); a cache has >= 1 row")
    outside = [r for r in rows if not 0 <= r < batch_size]
    if outside:
        raise ValueError(
            f"batch_indices {outside[:5]} are outside [0, {batch_size}) for a cache "
            f"with batch_size={batch_size}"
        )
    return torch.tensor(rows, dtype=torch.long, device=device)


def _describe_tensor(t) -> str:
    if not isinstance(t, Tensor):
        return f"a {type(t).__name__}"
    return f"{t.dtype} {list(t.shape)} on {t.device}"


def check_state(
    model: "_tl.HookedTransformer",
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    positions: Tensor,
    next_positions: Tensor,
) -> None:
    """Raise :class:`CacheMismatchError` unless the state fits ``model``.

    Every message names what was given, what ``model`` needs, and the fix.
    """
    cfg = model.cfg
    device = torch.device(cfg.device) if cfg.device is not None else torch.device("cpu")
    if not (isinstance(positions, Tensor) and positions.dtype == torch.long and positions.ndim == 2
            and positions.shape[0] >= 1):
        raise CacheMismatchError(
            f"positions must be an int64 [batch, kv_pos] tensor with batch >= 1, got "
            f"{_describe_tensor(positions)}; pass cache.positions"
        )
    batch, length = positions.shape
    if not (isinstance(next_positions, Tensor) and next_positions.dtype == torch.long
            and tuple(next_positions.shape) == (batch,)):
        raise CacheMismatchError(
            f"next_positions must be an int64 [{batch}] tensor (one per row of positions), "
            f"got {_describe_tensor(next_positions)}; pass cache.next_positions"
        )
    if len(keys) != cfg.n_layers or len(values) != cfg.n_layers:
        raise CacheMismatchError(
            f"{len(keys)} key and {len(values)} value tensors for a {cfg.n_layers}-layer model; "
            "pass one of each per layer"
        )
    shape = (batch, _tl.kv_head_count(cfg), length, int(cfg.d_head))
    for layer, pair in enumerate(zip(keys, values)):
        for what, t in zip(("keys", "values"), pair):
            if not (isinstance(t, Tensor) and tuple(t.shape) == shape and t.dtype == cfg.dtype):
                raise CacheMismatchError(
                    f"layer {layer} {what} are {_describe_tensor(t)} but this model and positions "
                    f"{list(positions.shape)} need {cfg.dtype} {list(shape)} "
                    "([batch, kv_head, kv_pos, d_head], keys after rotary, kv heads not repeated)"
                )
            if t.device.type != device.type:
                raise CacheMismatchError(
                    f"layer {layer} {what} are on {t.device} but the model runs on {device}; "
                    f"move them with .to({str(device)!r})"
                )
    for what, t in (("positions", positions), ("next_positions", next_positions)):
        if t.device.type != device.type:
            raise CacheMismatchError(
                f"{what} are on {t.device} but the model runs on {device}; "
                f"move them with .to({str(device)!r})"
            )


class KVCache:
    """Key/value cache for a TransformerLens ``HookedTransformer``.

    Each row of the batch has its own absolute positions (left padding and
    ragged rows are fine); the cache, not the caller, owns them. Storage is
    preallocated per layer at ``n_key_value_heads`` heads (grouped-query
    attention is expanded only at attention time) and grows geometrically.

    Lifecycle: :meth:`crop` (in place), :meth:`fork`, :meth:`select` and
    :meth:`repeat` (new caches), :meth:`freeze` (read-only forwards),
    :meth:`save` / :meth:`load` (:mod:`interpkv.cache.persist`). A windowed
    cache evicts keys no future query can attend (:mod:`interpkv.cache.window`).

    Attributes:
        batch_size: rows in the cache.
        seq_len: stored key slots per row (padding slots included).
        positions: ``Int[Tensor, "batch kv_pos"]``, absolute position of each
            stored key, ``-1`` for padding.
        nbytes: bytes of stored keys and values plus the position index.
        next_positions: ``Int[Tensor, " batch"]``, position of each row's next token.
        window, sinks: a windowed cache keeps the first ``sinks`` and the last
            ``window`` positions of each row.
        row_state: ``{name: Int[Tensor, " batch"]}``, per-row tensors that code
            above the cache attaches to its rows (generation's held-back token,
            :mod:`interpkv.generation.resume`). The cache never reads them: it
            keeps their rows aligned with its own through :meth:`fork`,
            :meth:`select` and :meth:`repeat`, and :meth:`save` / :meth:`load`
            carry them.

    >>> import interpkv
    >>> model = interpkv.zoo.load("gpt2")
    >>> cache = interpkv.KVCache.for_model(model)
    >>> logits = interpkv.forward(model, torch.tensor([[1, 2, 3]]), cache=cache)
    >>> cache.seq_len
    3
    """

    #: The caller's metadata of a loaded cache (:meth:`save`'s ``metadata``), else None.
    metadata: Optional[dict] = None
    #: ``(first slot id, end slot id, interventions)`` per span, a tuple (copies share it safely).
    _provenance: tuple = ()

    def __init__(
        self,
        model: "_tl.HookedTransformer",
        batch_size: int,
        *,
        window: Optional[int] = None,
        sinks: int = 0,
        capacity: int = _INITIAL_CAPACITY,
        keep_graph: bool = False,
    ):
        check_window_args(batch_size, window, sinks, model, capacity)
        cfg = model.cfg
        self._model_ref = weakref.ref(model)
        self.signature = model_signature(model)
        self.dtype: torch.dtype = cfg.dtype
        self.device = torch.device(cfg.device) if cfg.device is not None else torch.device("cpu")
        self.window = window
        self.sinks = sinks
        self.keep_graph = keep_graph
        self._graph_calls = 0  # commits that left an autograd graph in the cache
        self._frozen: set = set()
        self._length = 0
        capacity = max(1, capacity)
        self.layers: List[LayerCache] = [
            LayerCache(batch_size, _tl.kv_head_count(cfg), cfg.d_head, capacity, self.dtype, self.device)
            for _ in range(cfg.n_layers)
        ]
        self._positions = torch.full(
            (batch_size, capacity), PAD_POSITION, dtype=torch.long, device=self.device
        )
        self._slot_ids = torch.full_like(self._positions, PAD_POSITION)
        self._appended = 0  # slots ever appended: the next slot id
        self._next_position = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.bound = PositionBound(self._next_position)
        self.row_state: Dict[str, Tensor] = {}  # see the class docstring

    @classmethod
    def for_model(
        cls,
        model: "_tl.HookedTransformer",
        batch_size: int = 1,
        *,
        window: Optional[int] = None,
        sinks: int = 0,
        capacity: int = _INITIAL_CAPACITY,
        keep_graph: bool = False,
    ) -> "KVCache":
        """An empty cache for ``model``.

        Args:
            model: the HookedTransformer the cache will be used with (and only it).
            batch_size: rows; every forward through this cache must have this batch.
            window: keep only the last ``window`` positions of each row (plus sinks).
            sinks: with a window, also keep the first ``sinks`` positions forever.
            capacity: slots to preallocate (it grows on demand either way).
            keep_graph: the cache is meant to hold an autograd graph across
                calls (gradients through the cached history, e.g. attribution
                patching): no :class:`~interpkv.errors.CacheGraphWarning`.

        Returns:
            An empty :class:`KVCache`.
        """
        _tl.require_hooked(model, "KVCache")
        return cls(
            model, batch_size, window=window, sinks=sinks, capacity=capacity, keep_graph=keep_graph
        )

    # ------------------------------------------------------------------ views
    @property
    def batch_size(self) -> int:
        return self._positions.shape[0]

    @property
    def seq_len(self) -> int:
        return self._length

    @property
    def positions(self) -> Int[Tensor, "batch kv_pos"]:
        return self._positions[:, : self._length]

    @property
    def slot_ids(self) -> Int[Tensor, "batch kv_pos"]:
        """Insertion index of each stored slot (the n-th slot ever appended has id n).

        Ids follow slots when a window evicts and compacts them, so a caller can
        tell which stored slot came from which earlier call; ``-1`` marks the
        padding a compaction puts in front of a shorter row.
        """
        return self._slot_ids[:, : self._length]

    @property
    def appended(self) -> int:
        """Slots ever appended to this cache: the id the next appended slot gets."""
        return self._appended

    @property
    def next_positions(self) -> Int[Tensor, " batch"]:
        """Absolute position the next real token of each row will get."""
        return self._next_position

    @property
    def nbytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        sig = self.signature
        kv = 2 * sig["n_layers"] * sig["kv_heads"] * sig["d_head"] * itemsize
        return self.batch_size * self._length * (kv + self._positions.element_size())

    @property
    def frozen(self) -> bool:
        return bool(self._frozen)

    @property
    def model(self) -> Optional["_tl.HookedTransformer"]:
        """The model this cache is bound to (None if it was garbage-collected)."""
        return self._model_ref()

    @property
    def provenance(self) -> "provenance.Provenance":
        """What wrote each span of the stored slots: hooks, SAEs, faults, model hooks, weights.

        A :class:`~interpkv.cache.provenance.Provenance` (short repr, ``to_frame()``,
        notebook HTML). Forwards record it; ``fork``, ``crop``, ``select``,
        ``repeat``, ``save`` and ``load`` carry it; a call continuing the cache
        under other interventions emits :class:`~interpkv.ProvenanceWarning`.
        """
        return provenance.describe(self)

    def __repr__(self) -> str:
        window = "" if self.window is None else f", window={self.window}, sinks={self.sinks}"
        return (
            f"KVCache(batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"dtype={self.dtype}, {describe(self.signature)}{window}, nbytes={self.nbytes})"
        )

    def _repr_html_(self) -> str:
        return kvcache_html(self)

    @classmethod
    def from_state(
        cls,
        model: "_tl.HookedTransformer",
        keys: Sequence[Float[Tensor, "batch kv_head kv_pos d_head"]],
        values: Sequence[Float[Tensor, "batch kv_head kv_pos d_head"]],
        positions: Int[Tensor, "batch kv_pos"],
        next_positions: Int[Tensor, " batch"],
        *,
        window: Optional[int] = None,
        sinks: int = 0,
        copy: bool = True,
    ) -> "KVCache":
        """A cache holding the given stored slots, e.g. a cache's public state.

        The inverse of reading ``cache.layers[i].view(cache.seq_len)``,
        ``cache.positions`` and ``cache.next_positions``: every shape, dtype and
        device is checked against ``model``, so a cache built here is one the
        forward pass accepts. Positions are not checked against
        ``next_positions`` (a file loader does that, naming the file).

        Args:
            model: the model the cache is for.
            keys: one tensor per layer, ``[batch, kv_head, kv_pos, d_head]``,
                keys after rotary, at ``n_key_value_heads`` heads.
            values: one tensor per layer, same shape as ``keys``.
            positions: absolute position of each slot, ``-1`` for padding (int64).
            next_positions: position of each row's next token (int64).
            window, sinks: as in :meth:`for_model`.
            copy: copy the tensors (default). ``False`` adopts them as storage,
                so later forwards and crops may write into them.

        Returns:
            A new :class:`KVCache` with ``seq_len == positions.shape[1]``.

        Raises:
            CacheMismatchError: a count, shape, dtype or device that does not fit
                ``model`` (the message names what was given and what was expected).
            ValueError: an impossible ``window`` / ``sinks``.

        >>> state = [layer.view(cache.seq_len) for layer in cache.layers]
        >>> same = interpkv.KVCache.from_state(model, [k for k, _ in state], [v for _, v in state],
        ...                                    cache.positions, cache.next_positions)
        """
        check_state(model, keys, values, positions, next_positions)
        cache = cls(model, positions.shape[0], window=window, sinks=sinks, capacity=1)
        if copy:
            keys = [k.clone() for k in keys]
            values = [v.clone() for v in values]
        layers = [LayerCache.from_tensors(k, v) for k, v in zip(keys, values)]
        cache._install(layers, positions, next_positions)
        return cache

    def save(self, path: Union[str, "os.PathLike[str]"], metadata: Optional[dict] = None) -> None:
        """Write the stored slots to a safetensors file, atomically; returns None.

        Only stored slots are written (never the preallocated capacity), with
        the positions, window, dtype, a fingerprint of the model, a checksum
        of every tensor and ``metadata`` (:mod:`interpkv.cache.persist`).

        Args:
            path: the file; a symlink is followed (the file it points to is
                replaced and keeps its permissions).
            metadata: small JSON data of yours (a dict with string keys, at
                most 1 MiB as JSON) returned as ``.metadata`` by :meth:`load`.
                ``None`` stores none (``cache.metadata`` is not re-saved
                implicitly: pass ``metadata=cache.metadata`` to keep it).

        Raises:
            TypeError: ``metadata`` is not a dict or does not survive a JSON
                round trip unchanged (tuples, non-string keys, objects).
            ValueError: ``metadata`` over 1 MiB, or non-finite keys/values.
            CacheSaveError: a disk error (an ``OSError``); the old file stays.

        >>> cache.save("prompt.safetensors", metadata={"prompt": "Once upon a time"})
        """
        persist.save_cache(self, path, metadata=metadata)

    @classmethod
    def load(
        cls, path: Union[str, "os.PathLike[str]"], model: "_tl.HookedTransformer"
    ) -> "KVCache":
        """Read a cache written by :meth:`save`, for ``model`` (which must be the same model).

        Returns:
            A new :class:`KVCache`; forwards through it continue exactly where
            the saved one stopped. Its ``.metadata`` is what was saved with
            it (``None`` if nothing was).

        Raises:
            CacheFileError: the file is not a valid interpkv cache for this
                model (another model or weights, dtype, truncated, corrupted,
                checksum mismatch, non-finite keys, not a regular file, not
                safetensors, inconsistent shapes or positions). Nothing is
                ever unpickled.

        >>> cache = interpkv.KVCache.load("prompt.safetensors", model)
        >>> cache.metadata
        {'prompt': 'Once upon a time'}
        """
        if not isinstance(model, _tl.HookedTransformer):  # the caller's error, never "a corrupted file"
            raise TypeError(
                f"KVCache.load(path, model) needs the HookedTransformer the cache was saved from, got "
                f"{type(model).__name__}; e.g. KVCache.load(path, interpkv.zoo.load(name))"
            )
        return persist.load_cache(path, model, cls)

    # -------------------------------------------------------------- lifecycle
    @contextlib.contextmanager
    def freeze(self) -> Iterator["KVCache"]:
        """Context manager: forwards inside read the cache but append nothing.

        Inside the block every forward attends to the stored keys plus its own
        new tokens, exactly as an unfrozen forward would, but nothing is stored
        and no position advances, so each call sees the same history (useful to
        score many candidate continuations of one prefix). Lifecycle calls that
        change the cache (``crop``) raise inside the block.

        Returns:
            The same cache (for ``with cache.freeze() as c:``).

        >>> with cache.freeze():
        ...     a = interpkv.forward(model, torch.tensor([[4]]), cache=cache)
        ...     b = interpkv.forward(model, torch.tensor([[4]]), cache=cache)  # same as a
        """
        token = object()
        # Undone by the running call's cleanup too (set.discard: no interpkv line), so an
        # interrupt in this block's own exit never leaves a caller's cache frozen.
        calls.on_exit(self._frozen.discard, token)
        try:
            self._frozen.add(token)
            yield self
        finally:
            self._frozen.discard(token)

    def crop(self, n: int) -> None:
        """Keep the first ``n`` stored slots of every row, in place; returns None.

        ``n`` counts slots (:attr:`seq_len`), padding slots included. Each row's
        next position becomes one past its last kept real position, so the next
        token continues right after the kept ones. To drop the last ``k`` tokens
        of rows fed without padding since then: ``cache.crop(cache.seq_len - k)``.

        Args:
            n: slots to keep, ``0 <= n <= seq_len``.

        Raises:
            ValueError: ``n`` out of range; or, for a windowed cache, cropping
                would need keys the window already evicted (keep a
                :meth:`fork` from before the point you want to return to).
            RuntimeError: the cache is frozen.

        >>> cache.crop(cache.seq_len - 1)  # forget the last token
        """
        if self.frozen:
            raise RuntimeError("cannot crop a frozen cache: crop after the `with cache.freeze()` block")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self._length:
            raise ValueError(
                f"crop(n) keeps the first n of the {self._length} stored slots: n must be an int "
                f"in [0, {self._length}], got {n!r}"
            )
        kept = self._positions[:, :n]  # (B, n)
        if n:
            next_positions = kept.max(dim=1).values + 1  # padding only -> -1 + 1 = 0
        else:
            next_positions = torch.zeros_like(self._next_position)
        if self.window is not None:
            check_holds_required(kept, next_positions, self.window, self.sinks, f"crop({n})")
        provenance.crop(self, self._slot_ids[:, :n])
        self._positions[:, n : self._length] = PAD_POSITION
        self._length = n
        self._next_position = next_positions

    def fork(self) -> "KVCache":
        """An independent deep copy: appending to either never changes the other.

        Returns:
            A new :class:`KVCache` bound to the same model (not frozen), holding
            the same slots in the same layout.

        >>> branch = cache.fork()
        >>> _ = interpkv.forward(model, torch.tensor([[9]]), cache=branch)  # cache is unchanged
        """
        return self._take_rows(torch.arange(self.batch_size, device=self.device))

    def select(self, batch_indices: Union[Sequence[int], Int[Tensor, " n"]]) -> "KVCache":
        """A new cache holding rows ``batch_indices`` (in that order; repeats allowed).

        The original is unchanged. The slot layout is kept (``seq_len`` stays).

        Args:
            batch_indices: row indices in ``[0, batch_size)``, a sequence of ints
                or a 1-D integer tensor, at least one.

        Returns:
            A new :class:`KVCache` with ``len(batch_indices)`` rows.

        Raises:
            TypeError: indices that are not integers (a bool mask, floats).
            ValueError: no index, or an index outside ``[0, batch_size)``.

        >>> pair = cache.select([0, 0])  # row 0 twice
        >>> pair.batch_size
        2
        """
        return self._take_rows(validated_rows(batch_indices, self.batch_size, self.device))

    def repeat(self, n: int) -> "KVCache":
        """A new cache with each row repeated ``n`` times, row-major.

        Rows come out as ``[r0] * n + [r1] * n + ...`` (like
        ``torch.repeat_interleave``), so row ``b * n + i`` is the ``i``-th copy of
        row ``b``. Use it to run ``n`` continuations of one prompt without
        recomputing the prompt. The original is unchanged.

        Args:
            n: copies per row, ``>= 1``.

        Returns:
            A new :class:`KVCache` with ``batch_size * n`` rows.

        >>> many = cache.repeat(4)  # 4 continuations of every row
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"repeat(n) needs an int n >= 1 (copies per row), got {n!r}")
        check_memory("n", n, self.nbytes * n, f"{n} copies of this cache's {self.nbytes} bytes")
        rows = torch.arange(self.batch_size, device=self.device).repeat_interleave(n)
        return self._take_rows(rows)

    # ------------------------------------------------------------ internals
    def _take_rows(self, rows: Tensor) -> "KVCache":
        layers = [layer.take(rows, self._length) for layer in self.layers]
        new = self._with_storage(
            layers, self.positions[rows], self._next_position[rows], self.slot_ids[rows]
        )
        new.row_state = {name: tensor[rows] for name, tensor in self.row_state.items()}
        return new

    def _with_storage(self, layers, positions, next_positions, slot_ids=None) -> "KVCache":
        """A new cache sharing this one's binding and window, with the given storage."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._frozen = set()
        new.metadata = copy.deepcopy(self.metadata)
        new._install(layers, positions, next_positions, slot_ids)
        return new

    def _install(
        self,
        layers: List[LayerCache],
        positions: Int[Tensor, "batch kv_pos"],
        next_positions: Int[Tensor, " batch"],
        slot_ids: Optional[Int[Tensor, "batch kv_pos"]] = None,
    ) -> None:
        """Adopt storage whose capacity equals ``positions.shape[1]`` (all slots in use)."""
        self.layers = layers
        self.bound = PositionBound(None)
        self._positions = positions.clone()
        self._next_position = next_positions.clone()
        self._length = positions.shape[1]
        if slot_ids is None:  # fresh numbering, in slot order
            slot_ids = torch.arange(self._length, device=positions.device).expand_as(positions)
        self._slot_ids = slot_ids.clone()
        self._appended = int(slot_ids.max()) + 1 if slot_ids.numel() else 0

    def _evict(self) -> None:
        """Drop slots no future query can attend (window), compacting rows in place."""
        length = self._length
        positions = self._positions[:, :length]
        index, real = eviction(positions, self._next_position, self.window, self.sinks)  # type: ignore[arg-type]  # (B, kept); only windowed caches evict
        if index is None:
            return
        kept = index.shape[1]
        for layer in self.layers:
            layer.gather_slots_(index, length)
        self._slot_ids[:, :kept] = compact_positions(self._slot_ids[:, :length], index, real)  # type: ignore[arg-type]  # None only when nothing is evicted (returned above)
        self._slot_ids[:, kept:length] = PAD_POSITION
        self._positions[:, :kept] = compact_positions(positions, index, real)  # type: ignore[arg-type]  # None only when nothing is evicted (returned above)
        self._positions[:, kept:length] = PAD_POSITION
        self._length = kept

    # ------------------------------------------------------ forward protocol
    def check_compatible(self, model: "_tl.HookedTransformer", batch: int, device) -> None:
        """Raise :class:`CacheMismatchError` unless this cache fits ``model`` and ``batch``."""
        bound = self.model
        if bound is not model:
            theirs = model_signature(model)
            if theirs != self.signature:
                raise CacheMismatchError(
                    f"this KVCache was made for {describe(self.signature)} but the model "
                    f"passed is {describe(theirs)}; create a cache with "
                    "interpkv.KVCache.for_model(model)."
                )
            raise CacheMismatchError(
                "this KVCache was made for another HookedTransformer object (same "
                f"architecture, {describe(theirs)}, possibly different weights); its keys "
                "mean nothing to this model: create a cache with interpkv.KVCache.for_model(model)."
            )
        if model.cfg.dtype != self.dtype:
            raise CacheMismatchError(
                f"cache dtype is {self.dtype} but the model now runs in {model.cfg.dtype}; "
                "make a new cache after changing the model's dtype."
            )
        if batch != self.batch_size:
            raise CacheMismatchError(
                f"the cache holds {self.batch_size} rows but the tokens have batch {batch}; "
                "use cache.select(indices) or cache.repeat(n) to reshape the cache, or make "
                f"one with KVCache.for_model(model, batch_size={batch})."
            )
        if torch.device(device).type != self.device.type:
            raise CacheMismatchError(
                f"the cache lives on {self.device} but the tokens are on {device}; "
                "move the tokens (or make the cache on the model's device)."
            )

    def begin(self, q_pos: Int[Tensor, "batch pos"]) -> Slots:
        """Reserve slots for one forward's new tokens and say where everything goes.

        The one call a forward makes before running: it grows storage if needed
        and records ``q_pos`` as the positions of the reserved slots. Nothing
        counts as stored until :meth:`commit` (a failed or frozen forward
        leaves the history as it was).

        Args:
            q_pos: absolute positions of the new tokens, ``-1`` for padding.

        Returns:
            :class:`Slots`: query and key positions, and the first slot to write.
        """
        start, n_new = self._length, q_pos.shape[1]
        end = start + n_new
        if end > self._positions.shape[1]:
            for layer in self.layers:
                layer.reserve(start, end)
            capacity = self.layers[0].capacity
            self._positions = grown(self._positions, start, capacity, PAD_POSITION)
            self._slot_ids = grown(self._slot_ids, start, capacity, PAD_POSITION)
        self._positions[:, start:end] = q_pos
        self._slot_ids[:, start:end] = torch.arange(
            self._appended, self._appended + n_new, device=self.device
        )
        # A copy: eviction at commit compacts the stored positions in place.
        return Slots(q_pos=q_pos, k_pos=self._positions[:, :end].clone(), start=start)

    def commit(self, slots: Slots) -> None:
        """Count the slots of :meth:`begin` as stored (unless frozen); a windowed cache evicts."""
        if self.frozen:
            return
        old, n = self._next_position, slots.q_pos.shape[1]
        nxt = self.bound.advance(old, old + (slots.q_pos >= 0).sum(dim=1), n)
        self._length, self._appended, self._next_position = slots.end, self._appended + n, nxt  # one statement
        if self.window is not None:
            self._evict()
        if torch.is_grad_enabled() and self.layers[0].holds_graph:
            self._graph_calls += 1
            if self._graph_calls == 2 and not self.keep_graph:
                warn_graph_kept(self.nbytes)
