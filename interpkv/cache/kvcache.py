"""``KVCache``: the multi-layer key/value cache bound to one HookedTransformer.

Keys are stored **after** rotary rotation, at the absolute position of each
token. A stored key is therefore final: it is never re-rotated when later
tokens arrive (TransformerLens 3.x stores raw keys and rotates the whole
history again on every step), and its position is recorded alongside it in
:attr:`KVCache.positions`, which rotary, ALiBi, windows and capture all read.
"""

import contextlib
import copy
import os
import weakref
from typing import Iterator, List, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interpkv.core import tl as _tl
from interpkv._types import PAD_POSITION
from interpkv.errors import CacheMismatchError
from interpkv.cache.layer import LayerCache
from interpkv.cache.signature import model_signature
from interpkv.cache.state import check_state as _check_state
from interpkv.cache.window import compact_positions, compaction_index, kept_slots, required_positions

__all__ = ["KVCache", "CacheMismatchError", "model_signature"]

_INITIAL_CAPACITY = 64


def _describe(sig: dict) -> str:
    return (
        f"{sig['architecture']} ({sig['n_layers']} layers, {sig['kv_heads']} kv heads x "
        f"d_head {sig['d_head']}, {sig['positional']})"
    )


class KVCache:
    """Key/value cache for a TransformerLens ``HookedTransformer``.

    Each row of the batch has its own absolute positions (left padding and
    ragged rows are fine); the cache, not the caller, owns them. Storage is
    preallocated per layer at ``n_key_value_heads`` heads (grouped-query
    attention is expanded only at attention time) and grows geometrically.

    Keys are stored after rotary, so they are rotated exactly once.

    Lifecycle: :meth:`crop` (in place), :meth:`fork`, :meth:`select` and
    :meth:`repeat` (new caches), :meth:`freeze` (read-only forwards),
    :meth:`save` / :meth:`load` (safetensors, see :mod:`interpkv.cache.persist`). A
    windowed cache evicts, after each forward, the keys no future query can
    attend (see :mod:`interpkv.cache.window`), so its memory stays flat.

    Attributes:
        batch_size: rows in the cache.
        seq_len: stored key slots per row (padding slots included).
        positions: ``Int[Tensor, "batch kv_pos"]``, absolute position of each
            stored key, ``-1`` for padding.
        nbytes: bytes of stored keys and values plus the position index.
        next_positions: ``Int[Tensor, "batch"]``, position of each row's next token.
        window, sinks: a windowed cache keeps the first ``sinks`` and the last
            ``window`` positions of each row.

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
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive number of positions, got {window}")
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        if sinks and window is None:
            raise ValueError("sinks only make sense with a window: pass window=W as well")
        cfg = model.cfg
        self._model_ref = weakref.ref(model)
        self.signature = model_signature(model)
        self.dtype: torch.dtype = cfg.dtype
        self.device = torch.device(cfg.device) if cfg.device is not None else torch.device("cpu")
        self.window = window
        self.sinks = sinks
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
        self._next_position = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    @classmethod
    def for_model(
        cls,
        model: "_tl.HookedTransformer",
        batch_size: int = 1,
        *,
        window: Optional[int] = None,
        sinks: int = 0,
        capacity: int = _INITIAL_CAPACITY,
    ) -> "KVCache":
        """An empty cache for ``model``.

        Args:
            model: the HookedTransformer the cache will be used with (and only it).
            batch_size: rows; every forward through this cache must have this batch.
            window: keep only the last ``window`` positions of each row (plus sinks).
            sinks: with a window, also keep the first ``sinks`` positions forever.
            capacity: slots to preallocate (it grows on demand either way).

        Returns:
            An empty :class:`KVCache`.
        """
        return cls(model, batch_size, window=window, sinks=sinks, capacity=capacity)

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
    def next_positions(self) -> Int[Tensor, "batch"]:
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
            f"dtype={self.dtype}, {_describe(self.signature)}{window}, nbytes={self.nbytes})"
        )

    # ----------------------------------------------------------- lifecycle
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
        self._frozen += 1
        try:
            yield self
        finally:
            self._frozen -= 1

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
            self._check_holds_required(kept, next_positions, "crop({n})".format(n=n))
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

    def select(self, batch_indices: Union[Sequence[int], Int[Tensor, "n"]]) -> "KVCache":
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

        >>> second = cache.select([1])
        """
        return self._take_rows(self._validated_rows(batch_indices))

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
        rows = torch.arange(self.batch_size, device=self.device).repeat_interleave(n)
        return self._take_rows(rows)

    @classmethod
    def from_state(
        cls,
        model: "_tl.HookedTransformer",
        keys: Sequence[Float[Tensor, "batch kv_head kv_pos d_head"]],
        values: Sequence[Float[Tensor, "batch kv_head kv_pos d_head"]],
        positions: Int[Tensor, "batch kv_pos"],
        next_positions: Int[Tensor, "batch"],
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
        _check_state(model, keys, values, positions, next_positions)
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
        the positions, window, dtype, a fingerprint of the model (its
        architecture and a hash of the weights it computes with), a SHA-256 of
        every tensor, and ``metadata``. See :mod:`interpkv.cache.persist`.

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
    def _validated_rows(self, batch_indices) -> Tensor:
        if isinstance(batch_indices, Tensor):
            if batch_indices.dtype == torch.bool or batch_indices.is_floating_point():
                raise TypeError(
                    f"select() takes integer row indices, got a {batch_indices.dtype} tensor; "
                    "for a boolean row mask pass mask.nonzero().flatten()"
                )
            if batch_indices.ndim != 1:
                raise ValueError(
                    f"select() takes a 1-D list of row indices, got shape {tuple(batch_indices.shape)}"
                )
            rows = batch_indices.tolist()
        else:
            rows = list(batch_indices)
            bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, int)]
            if bad:
                raise TypeError(f"select() takes integer row indices, got {bad[:3]!r}")
        if not rows:
            raise ValueError("select() needs at least one row index; a cache has >= 1 row")
        outside = [r for r in rows if not 0 <= r < self.batch_size]
        if outside:
            raise ValueError(
                f"row indices {outside[:5]} are outside [0, {self.batch_size}) for a cache "
                f"with batch_size={self.batch_size}"
            )
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _take_rows(self, rows: Tensor) -> "KVCache":
        layers = [layer.take(rows, self._length) for layer in self.layers]
        return self._with_storage(
            layers, self.positions[rows], self._next_position[rows]
        )

    def _with_storage(self, layers, positions, next_positions) -> "KVCache":
        """A new cache sharing this one's binding and window, with the given storage."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._frozen = 0
        new.metadata = copy.deepcopy(self.metadata)
        new._install(layers, positions, next_positions)
        return new

    def _install(
        self,
        layers: List[LayerCache],
        positions: Int[Tensor, "batch kv_pos"],
        next_positions: Int[Tensor, "batch"],
    ) -> None:
        """Adopt storage whose capacity equals ``positions.shape[1]`` (all slots in use)."""
        self.layers = layers
        self._positions = positions.clone()
        self._next_position = next_positions.clone()
        self._length = positions.shape[1]

    def _check_holds_required(self, positions: Tensor, next_positions: Tensor, what: str) -> None:
        """Raise unless every row holds each position its next query may attend."""
        limit = int(next_positions.max()) if next_positions.numel() else 0
        required = required_positions(next_positions, self.window, self.sinks, limit)  # (B, L)
        present = torch.zeros_like(required)
        real = positions >= 0
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
        present[rows[real], positions[real]] = True
        missing = required & ~present
        if bool(missing.any()):
            row = int(missing.any(dim=1).nonzero()[0])
            lost = missing[row].nonzero().flatten().tolist()
            raise ValueError(
                f"{what} would leave row {row} continuing at position "
                f"{int(next_positions[row])} without positions {lost[:6]}, which the window "
                f"(window={self.window}, sinks={self.sinks}) already evicted; a windowed "
                "cache cannot be cropped back past its window. Keep a fork() from the point "
                "you want to return to."
            )

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
        self._positions[:, :kept] = compact_positions(positions, index, real)
        self._positions[:, kept:length] = PAD_POSITION
        self._length = kept

    # ------------------------------------------------------ forward protocol
    def check_compatible(self, model: "_tl.HookedTransformer", batch: int, device) -> None:
        """Raise :class:`CacheMismatchError` unless this cache fits ``model`` and ``batch``."""
        bound = self._model_ref()
        if bound is not model:
            theirs = model_signature(model)
            if theirs != self.signature:
                raise CacheMismatchError(
                    f"this KVCache was made for {_describe(self.signature)} but the model "
                    f"passed is {_describe(theirs)}; create a cache with "
                    "interpkv.KVCache.for_model(model)."
                )
            raise CacheMismatchError(
                "this KVCache was made for another HookedTransformer object (same "
                f"architecture, {_describe(theirs)}, possibly different weights); its keys "
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

    def reserve(self, n_new: int) -> int:
        """Make room for ``n_new`` slots; return the first new slot index."""
        needed = self._length + n_new
        if needed > self._positions.shape[1]:
            for layer in self.layers:
                layer.reserve(self._length, needed)
            grown = torch.full(
                (self.batch_size, self.layers[0].capacity),
                PAD_POSITION,
                dtype=torch.long,
                device=self.device,
            )
            grown[:, : self._length] = self._positions[:, : self._length]
            self._positions = grown
        return self._length

    def key_positions(self, new_positions: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch kv_pos"]:
        """Positions of stored keys followed by the new ones (not yet committed)."""
        start = self._length
        self._positions[:, start : start + new_positions.shape[1]] = new_positions
        return self._positions[:, : start + new_positions.shape[1]]

    def commit(self, new_positions: Int[Tensor, "batch pos"]) -> None:
        """Count the slots written by the last forward as stored (unless frozen)."""
        if self.frozen:
            return
        n_new = new_positions.shape[1]
        self._length += n_new
        real = (new_positions >= 0).sum(dim=1)
        self._next_position = self._next_position + real
        if self.window is not None:
            self._evict()
