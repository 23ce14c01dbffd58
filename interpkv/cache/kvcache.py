"""``KVCache``: the multi-layer key/value cache bound to one HookedTransformer.

Keys are stored **after** rotary rotation, at the absolute position of each
token. A stored key is therefore final: it is never re-rotated when later
tokens arrive (TransformerLens 3.x stores raw keys and rotates the whole
history again on every step), and its position is recorded alongside it in
:attr:`KVCache.positions`, which rotary, ALiBi, windows and capture all read.
"""

import copy
import os
import weakref
from typing import List, Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from interpkv.cache.layer import LayerCache
from interpkv.cache.lifecycle import CacheLifecycle
from interpkv.cache.signature import check_compatible, describe, model_signature
from interpkv.cache.slots import Slots, grown
from interpkv.cache.state import build_from_state
from interpkv.cache.window import check_window_args, compact_positions, compaction_index, kept_slots
from interpkv.core import tl as _tl
from interpkv.core.axes import PAD_POSITION
from interpkv.errors import warn_graph_kept

__all__ = ["KVCache", "Slots", "model_signature"]

_INITIAL_CAPACITY = 64


class KVCache(CacheLifecycle):
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
        next_tokens, next_tokens_at: ``Int[Tensor, " batch"]`` or None: the
            token :func:`interpkv.generate` chose last and held back (-1: none)
            and the ``next_positions`` it was held back at; ``generate(model,
            cache=cache, max_new_tokens=n)`` continues from it. Written only by
            ``generate``; forks, selections and saves carry it.

    >>> import interpkv
    >>> model = interpkv.zoo.load("gpt2")
    >>> cache = interpkv.KVCache.for_model(model)
    >>> logits = interpkv.forward(model, torch.tensor([[1, 2, 3]]), cache=cache)
    >>> cache.seq_len
    3
    """

    #: The caller's metadata of a loaded cache (:meth:`save`'s ``metadata``), else None.
    metadata: Optional[dict] = None

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
        check_window_args(batch_size, window, sinks)
        cfg = model.cfg
        self._model_ref = weakref.ref(model)
        self.signature = model_signature(model)
        self.dtype: torch.dtype = cfg.dtype
        self.device = torch.device(cfg.device) if cfg.device is not None else torch.device("cpu")
        self.window = window
        self.sinks = sinks
        self.keep_graph = keep_graph
        self._graph_calls = 0  # commits that left an autograd graph in the cache
        self._frozen = 0
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
        self.next_tokens: Optional[Tensor] = None  # see the class docstring
        self.next_tokens_at: Optional[Tensor] = None

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
        return self._frozen > 0

    @property
    def model(self) -> Optional["_tl.HookedTransformer"]:
        """The model this cache is bound to (None if it was garbage-collected)."""
        return self._model_ref()

    def __repr__(self) -> str:
        window = "" if self.window is None else f", window={self.window}, sinks={self.sinks}"
        return (
            f"KVCache(batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"dtype={self.dtype}, {describe(self.signature)}{window}, nbytes={self.nbytes})"
        )

    def _repr_html_(self) -> str:
        from interpkv._repr import kvcache_html

        return kvcache_html(self)

    from_state = classmethod(build_from_state)

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
        from interpkv.cache import persist

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
        from interpkv.cache import persist

        return persist.load_cache(path, model)

    # ------------------------------------------------------------ internals
    def _take_rows(self, rows: Tensor) -> "KVCache":
        layers = [layer.take(rows, self._length) for layer in self.layers]
        new = self._with_storage(
            layers, self.positions[rows], self._next_position[rows], self.slot_ids[rows]
        )
        if self.next_tokens is not None:
            new.next_tokens, new.next_tokens_at = self.next_tokens[rows], self.next_tokens_at[rows]
        return new

    def _with_storage(self, layers, positions, next_positions, slot_ids=None) -> "KVCache":
        """A new cache sharing this one's binding and window, with the given storage."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._frozen = 0
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
        keep = kept_slots(positions, self._next_position, self.window, self.sinks)
        if bool(keep.all()):
            return
        index, real = compaction_index(keep)  # (B, kept)
        kept = index.shape[1]
        for layer in self.layers:
            layer.gather_slots_(index, length)
        self._slot_ids[:, :kept] = compact_positions(self._slot_ids[:, :length], index, real)
        self._slot_ids[:, kept:length] = PAD_POSITION
        self._positions[:, :kept] = compact_positions(positions, index, real)
        self._positions[:, kept:length] = PAD_POSITION
        self._length = kept

    # ------------------------------------------------------ forward protocol
    def check_compatible(self, model: "_tl.HookedTransformer", batch: int, device) -> None:
        """Raise :class:`CacheMismatchError` unless this cache fits ``model`` and ``batch``."""
        check_compatible(self, model, batch, device)

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
        self._length = slots.end
        self._appended += slots.q_pos.shape[1]
        self._next_position = self._next_position + (slots.q_pos >= 0).sum(dim=1)
        if self.window is not None:
            self._evict()
        if torch.is_grad_enabled() and self.layers[0].holds_graph:
            self._graph_calls += 1
            if self._graph_calls == 2 and not self.keep_graph:
                warn_graph_kept(self.nbytes)
