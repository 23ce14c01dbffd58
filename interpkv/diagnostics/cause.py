"""Blaming ``fwd_hooks`` when cached and uncached differ only with them.

A hook written against the uncached shape (``act[:, -1] += v``, ``act[:, 1:]``,
``act[:, p] = x``, a mask built from the sequence length) sees something else
in a cached step, where the activation holds only the new positions. No cache
can make such a hook mean the same: it is the hook's meaning that depends on
the cache. :func:`blame` names the hooks when the run diverges with them and
agrees without them; ``compare`` and ``compare_generation`` put its string in
``.cause``.
"""

from typing import Callable, Optional, Sequence

__all__ = ["blame", "describe_hooks"]


def describe_hooks(fwd_hooks: Sequence) -> str:
    """``"blocks.0.hook_resid_post (steer_last)"``-style names of ``(name or filter, hook)`` pairs."""
    parts = []
    for name, hook in fwd_hooks:
        point = name if isinstance(name, str) else f"hook points matching {getattr(name, '__name__', 'a filter')}"
        fn = getattr(hook, "__name__", type(hook).__name__)
        parts.append(f"{point} ({fn})")
    return ", ".join(parts)


def blame(fwd_hooks: Sequence, diverges: bool, rerun_without: Callable[[], bool]) -> Optional[str]:
    """The cause string, or None.

    Args:
        fwd_hooks: the hooks the run was given.
        diverges: whether the run with them diverged.
        rerun_without: runs the same comparison without the hooks; returns
            whether *that* run diverges (called only when it can matter).
    """
    if not fwd_hooks or not diverges or rerun_without():
        return None
    return (
        f"fwd_hooks {describe_hooks(fwd_hooks)} make cached and uncached differ (the same run without "
        "them agrees): in a cached step a hook sees only the new positions, so indexing act's pos axis "
        "(act[:, -1], act[:, 1:], act[:, p]) means something else there, and no cache can change that; "
        "select positions with interpkv.hook_positions(hook) or interpkv.steering"
    )
