"""``KVCache``: the multi-layer key/value cache bound to one HookedTransformer.

Keys are stored **after** rotary rotation, at the absolute position of each
token. A stored key is therefore final: it is never re-rotated when later
tokens arrive (TransformerLens 3.x stores raw keys and rotates the whole
history again on every step), and its position is recorded alongside it in
:attr:`KVCache.positions`, which rotary, ALiBi, windows and capture all read.
"""

import contextlib
import weakref
from typing import Iterator, List, Optional, Tuple

import torch
from jaxtyping import Int
from torch import Tensor

from . import _tl
from ._types import PAD_POSITION
from .layer_cache import LayerCache
from .schemes import scheme_for

__all__ = ["KVCache", "CacheMismatchError", "model_signature"]

_INITIAL_CAPACITY = 64


class CacheMismatchError(ValueError):
    """A cache was used with a model, batch, dtype or device it was not made for."""


def model_signature(model: "_tl.HookedTransformer") -> dict:
    """The architecture fields that decide a cache's layout and meaning."""
    cfg = model.cfg
    return {
        "architecture": str(cfg.original_architecture),
        "n_layers": int(cfg.n_layers),
        "n_heads": int(cfg.n_heads),
        "kv_heads": _tl.kv_head_count(cfg),
        "d_head": int(cfg.d_head),
        "d_model": int(cfg.d_model),
        "n_ctx": int(cfg.n_ctx),
        "positional": scheme_for(model).describe(),
    }


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

    Attributes:
        batch_size: rows in the cache.
        seq_len: stored key slots per row (padding slots included).
        positions: ``Int[Tensor, "batch kv_pos"]``, absolute position of each
            stored key, ``-1`` for padding.
        nbytes: bytes of stored keys and values plus the position index.
        window, sinks: a windowed cache keeps the first ``sinks`` and the last
            ``window`` positions of each row.

    >>> import interpkv
    >>> model = interpkv.zoo.load("gpt2")
    >>> cache = interpkv.KVCache.for_model(model)
    >>> logits = interpkv.forward(model, torch.tensor([[1, 2, 3]]), cache=cache)
    >>> cache.seq_len
    3
    """

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

        Returns:
            The same cache (for ``with cache.freeze() as c:``).
        """
        self._frozen += 1
        try:
            yield self
        finally:
            self._frozen -= 1

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

    def layer_view(self, layer: int, end: int) -> Tuple[Tensor, Tensor]:
        return self.layers[layer].view(end)
