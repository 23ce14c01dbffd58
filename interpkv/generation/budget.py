"""What a generation may allocate, checked before it allocates anything.

:func:`check_reach` refuses a ``max_new_tokens`` that cannot fit (positions
past a learned embedding's ``n_ctx``, or an unwindowed cache larger than
this machine's RAM) with a one-line error naming ``max_new_tokens``; the
generation's own cache starts at :data:`FIRST_CAPACITY` new slots and grows
as it fills, so a large ``max_new_tokens`` that stops early costs nothing up front.
"""

from interpkv.core import tl as _tl
from interpkv.core.arguments import check_cache_memory, physical_memory
from interpkv.core.schemes import scheme_for

__all__ = ["check_reach", "FIRST_CAPACITY"]

FIRST_CAPACITY = 256
"""New-token slots a fresh generation cache reserves up front; it doubles as it fills."""


def check_reach(model, cache, mask, max_new_tokens: int) -> None:
    """Refuse, before allocating, a generation that cannot fit: past ``n_ctx`` or past this machine's RAM.

    Learned position embeddings have ``n_ctx`` rows: a later position would
    fail at that step anyway, after everything was allocated. Other schemes
    compute any position, but an unwindowed cache holds every one of them: one
    that would outgrow the machine's RAM is refused now (a windowed cache stays flat).
    """
    # An upper bound known on the host first (columns, slots ever appended): the exact
    # start is read back only when the bound does not fit, so a generation that fits syncs nothing.
    start = mask.shape[1] + (0 if cache is None else cache.appended)
    if not _fits(model, cache, mask, start + max_new_tokens - 1):
        start = int(mask.sum(1).max()) + (0 if cache is None else int(cache.next_positions.max()))
    last = start + max_new_tokens - 1  # the last position a step feeds is last - 1 (the final choice is held back)
    limit = scheme_for(model).max_positions()
    if limit is not None and last > limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} would feed positions up to {last - 1}, past this model's "
            f"n_ctx={limit} (learned position embeddings have {limit} rows); pass max_new_tokens <= "
            f"{max(0, limit - start + 1)}"
        )
    if cache is None or cache.window is None:
        check_cache_memory("max_new_tokens", max_new_tokens, model, mask.shape[0], last, "the cache it fills")


def _fits(model, cache, mask, last: int) -> bool:
    """Whether positions up to ``last`` pass both limits of :func:`check_reach` (no error, no read)."""
    limit = scheme_for(model).max_positions()
    if limit is not None and last > limit:
        return False
    if cache is not None and cache.window is not None:
        return True
    cfg, ram = model.cfg, physical_memory()
    per_slot = 2 * cfg.n_layers * _tl.kv_head_count(cfg) * cfg.d_head * cfg.dtype.itemsize + 16
    return ram is None or mask.shape[0] * last * per_slot <= ram
