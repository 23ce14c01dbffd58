"""Lifecycle operations of :class:`~interpkv.cache.kvcache.KVCache`: freeze, crop, fork, select, repeat.

A mixin: :class:`KVCache` inherits these; they work on its slots through
``_take_rows`` (new caches) or in place (``crop``).
"""

import contextlib
from typing import Iterator, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

from interpkv.cache.rows import validated_rows
from interpkv.cache.window import check_holds_required
from interpkv.core.axes import PAD_POSITION

__all__ = ["CacheLifecycle"]


class CacheLifecycle:
    """Mixin: the lifecycle methods of a KV cache (see each method)."""

    @contextlib.contextmanager
    def freeze(self) -> Iterator["CacheLifecycle"]:
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
            check_holds_required(kept, next_positions, self.window, self.sinks, f"crop({n})")
        self._positions[:, n : self._length] = PAD_POSITION
        self._length = n
        self._next_position = next_positions

    def fork(self) -> "CacheLifecycle":
        """An independent deep copy: appending to either never changes the other.

        Returns:
            A new :class:`KVCache` bound to the same model (not frozen), holding
            the same slots in the same layout.

        >>> branch = cache.fork()
        >>> _ = interpkv.forward(model, torch.tensor([[9]]), cache=branch)  # cache is unchanged
        """
        return self._take_rows(torch.arange(self.batch_size, device=self.device))

    def select(self, batch_indices: Union[Sequence[int], Int[Tensor, " n"]]) -> "CacheLifecycle":
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
        return self._take_rows(validated_rows(batch_indices, self.batch_size, self.device))

    def repeat(self, n: int) -> "CacheLifecycle":
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
