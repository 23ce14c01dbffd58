"""Known KV-cache bugs, reproducible on demand in interpkv's own cached path.

Each fault re-creates one public bug report (see ``KNOWN_BUGS.md`` and
``docs/capture.md``) inside interpkv, so a diagnostic can be shown to catch it
and to point at the right place::

    with interpkv.faults.inject(model, "stale_position_offset"):
        report = interpkv.compare(model, tokens, steps=[8, 1, 1, 4])
    report.first_divergence()   # Site(hook='hook_pos_embed', pos=8, ...) on GPT-2

A fault changes only forward calls that were given a cache
(``interpkv.forward(..., cache=c)``, every chunk of ``capture(steps=...)``).
An uncached call (``cache=None``), the reference of :func:`interpkv.compare`,
is never affected. Outside the ``with`` block the model is untouched; a cache
filled while a fault was active keeps what the fault wrote into it.

In what follows, "the first cached position" is the absolute position of the
first token fed through a cache that already holds history: with
``steps=[8, 1, 1, 4]`` it is 8. :meth:`Fault.expected_site` returns the site
for a given model and that position.
"""

import contextlib
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from interpkv.core import stephooks
from interpkv.core import tl as _tl
from interpkv.core.axes import PAD_POSITION
from interpkv.core.schemes import ALiBi, LearnedPositions, scheme_for

ZERO_PAD_BLOCK = 16
"""``zero_padded_resume`` pads the stored history up to the next multiple of
this many slots (mlx-examples allocated in steps of 256; 16 keeps the zeros a
large share of a short test prompt, which is when the real bug hurt most)."""

__all__ = ["Fault", "names", "get", "inject", "applies"]


class Fault(stephooks.StepHooks):
    """A known cache bug: step hooks (:mod:`interpkv.core.stephooks`) that reproduce it.

    Each subclass overrides the points it changes, documents what it does and
    where it shows.
    """

    name: str = ""
    report: str = ""

    def skip_reason(self, model: "_tl.HookedTransformer") -> Optional[str]:
        """Why this fault cannot be injected on ``model`` (None when it can)."""
        return None

    def expected_site(
        self, model: "_tl.HookedTransformer", first_cached_pos: int
    ) -> Tuple[str, int]:
        """``(hook name, position)`` where ``first_divergence()`` must land."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<fault {self.name}: {self.report}>"


class NoCacheHistory(Fault):
    """A cached step attends only to its own new tokens, never to the history.

    Reproduces mistral.rs #765: a path believed equivalent to the cached one
    ran with a broken history. Stored keys are masked out of every call that
    has history; the first call (empty cache) is unaffected.

    First divergence: ``blocks.0.attn.hook_attn_scores`` at the first cached
    position (scores of stored keys become ``-inf`` where the reference has
    finite ones; q, k and v are still right).
    """

    name = "no_cache_history"
    report = "mistral.rs #765 (the cache history never reached attention)"

    def allowed(self, cache, slots, mask):
        if slots.start == 0:
            return mask
        mask = mask.clone()
        mask[..., : slots.start] = False  # the stored history is never read
        return mask

    def expected_site(self, model, first_cached_pos):
        return "blocks.0.attn.hook_attn_scores", first_cached_pos


class StalePositionOffset(Fault):
    """The position offset is never advanced: every call restarts at position 0.

    Reproduces the x-transformers "feed only the last token" reports: new
    tokens are placed as if the cache were empty, so the token at absolute
    position 8 is embedded / rotated / biased as position 0 (and its key is
    stored under that position).

    First divergence, at the first cached position, is the first hook that
    reads positions: ``hook_pos_embed`` for learned absolute positions (GPT-2,
    OPT, Shortformer), ``blocks.0.attn.hook_rot_q`` for rotary models,
    ``blocks.0.attn.hook_attn_scores`` for ALiBi.
    """

    name = "stale_position_offset"
    report = "x-transformers usage reports (last token fed without its offset)"

    def query_offsets(self, cache, offsets):
        # Never advanced: every call places its tokens as if the cache were empty.
        return torch.zeros_like(offsets)

    def expected_site(self, model, first_cached_pos):
        scheme = scheme_for(model)
        if isinstance(scheme, LearnedPositions):
            return "hook_pos_embed", first_cached_pos
        if scheme.rotates:
            return "blocks.0.attn.hook_rot_q", first_cached_pos
        return "blocks.0.attn.hook_attn_scores", first_cached_pos


class AlibiUnsliced(Fault):
    """Cached queries get the ALiBi bias rows of the first positions.

    Reproduces TransformerLens #776 (fixed by #777): the bias matrix was
    sliced ``[:query_ctx]`` instead of ``[-query_ctx:]``, so a query at
    absolute position 8 fed after 8 cached tokens gets position 0's bias row.
    ALiBi models only; injecting it on another scheme raises ``ValueError``.

    First divergence: ``blocks.0.attn.hook_attn_scores`` at the first cached
    position.
    """

    name = "alibi_unsliced"
    report = "TransformerLens #776 (Bloom differed from HF with the cache on)"

    def bias_positions(self, cache, q_pos):
        # Rows [:query_ctx] of the bias matrix: the first positions, as if the
        # cached keys were not there.
        offsets = cache.next_positions[:, None]  # (B, 1), not yet committed
        return torch.where(q_pos >= 0, q_pos - offsets, q_pos)

    def skip_reason(self, model):
        scheme = scheme_for(model)
        if not isinstance(scheme, ALiBi):
            return (
                f"alibi_unsliced only applies to ALiBi models; this model uses {scheme.describe()} "
                "(try interpkv.zoo.load('bloom'))"
            )
        return None

    def expected_site(self, model, first_cached_pos):
        return "blocks.0.attn.hook_attn_scores", first_cached_pos


class ZeroPaddedResume(Fault):
    """A resumed cache carries zero-filled key/value slots that get attended.

    Reproduces mlx-examples #977 (fixed by #979): a saved prompt cache kept its
    allocation padding. The first call through a cache that already holds
    history finds the history padded with zero keys and values up to the next
    multiple of ``ZERO_PAD_BLOCK`` (16) slots, attended like real tokens. Real
    tokens keep their positions (interpkv owns them), so only the attention
    mass moves.

    First divergence: ``blocks.0.attn.hook_pattern`` at the first cached
    position. The scores of real keys are unchanged, and the zero slots have no
    absolute position so a Record has no column for them; the softmax gives
    them weight, which lowers every real key's probability.
    """

    name = "zero_padded_resume"
    report = "mlx-examples #977 (saved prompt cache kept its zero padding)"

    def __init__(self):
        # Per cache: the (first, end) slots of the zero padding appended to it.
        self._zero_slots: weakref.WeakKeyDictionary[object, Tuple[int, int]] = (
            weakref.WeakKeyDictionary()
        )

    def before_step(self, model, cache):
        if cache.seq_len == 0 or cache in self._zero_slots:
            return
        n_zero = ZERO_PAD_BLOCK - cache.seq_len % ZERO_PAD_BLOCK  # 1..ZERO_PAD_BLOCK
        pad = torch.full((cache.batch_size, n_zero), PAD_POSITION, dtype=torch.long, device=cache.device)
        slots = cache.begin(pad)
        for layer in cache.layers:
            zeros = layer.keys.new_zeros((cache.batch_size, n_zero, layer.keys.shape[1], layer.keys.shape[3]))
            layer.write(slots.start, zeros, zeros)
        cache.commit(slots)
        self._zero_slots[cache] = (slots.start, slots.end)

    def allowed(self, cache, slots, mask):
        zero = self._zero_slots.get(cache)
        if zero is None:
            return mask
        mask = mask.clone()
        mask[..., zero[0] : zero[1]] = True  # the zero slots count as real history
        return mask

    def expected_site(self, model, first_cached_pos):
        return "blocks.0.attn.hook_pattern", first_cached_pos


class KVHeadsRepeatedBeforeCache(Fault):
    """The cache stores keys/values after repeating GQA heads to ``n_heads``.

    Reproduces facebookresearch/lingua #44 (fixed by #47). Storage is widened
    to ``n_heads`` heads, so ``cache.nbytes`` grows by ``n_heads /
    n_key_value_heads``. Chosen layout: the heads are tiled (``x.repeat``:
    query head ``h`` reads kv head ``h % n_kv``) where the model shares kv head
    ``h // group`` among consecutive query heads (``repeat_interleave``). A
    correct repetition would only waste memory; the layout mistake makes it
    visible in the numbers too. GQA models only; injecting it on another model
    raises ``ValueError``.

    First divergence: ``blocks.0.attn.hook_attn_scores`` at position 0, since
    interpkv attends to a call's own keys through the cache too (the prefill
    already reads them back); q, k and v are still right.
    """

    name = "kv_heads_repeated_before_cache"
    report = "facebookresearch/lingua #44 (cache written after repeat_kv)"

    def before_step(self, model, cache):
        n_heads = int(model.cfg.n_heads)
        for layer in cache.layers:
            kv_heads = layer.keys.shape[1]
            if kv_heads == n_heads:
                continue
            # Tiled (head h holds kv head h % kv_heads), the layout mistake: the
            # model shares kv head h // group among consecutive query heads.
            layer.keys = layer.keys.repeat(1, n_heads // kv_heads, 1, 1)
            layer.values = layer.values.repeat(1, n_heads // kv_heads, 1, 1)
        # The storage really holds n_heads heads now; nbytes reads this field.
        cache.signature = dict(cache.signature, kv_heads=n_heads)

    def stored_kv(self, layer_cache, k, v):
        repeat = layer_cache.keys.shape[1] // k.shape[2]
        return k.repeat(1, 1, repeat, 1), v.repeat(1, 1, repeat, 1)  # tiled heads

    def skip_reason(self, model):
        kv_heads = _tl.kv_head_count(model.cfg)
        if kv_heads == model.cfg.n_heads:
            return (
                "kv_heads_repeated_before_cache only applies to grouped-query attention; this "
                f"model has n_heads = n_key_value_heads = {kv_heads} (try interpkv.zoo.load('llama'))"
            )
        return None

    def expected_site(self, model, first_cached_pos):
        return "blocks.0.attn.hook_attn_scores", 0


_FAULTS: Dict[str, Fault] = {
    f.name: f
    for f in (
        NoCacheHistory(),
        StalePositionOffset(),
        AlibiUnsliced(),
        ZeroPaddedResume(),
        KVHeadsRepeatedBeforeCache(),
    )
}


def names() -> List[str]:
    """Every fault :func:`inject` knows.

    Examples:
        >>> names()[:2]
        ['no_cache_history', 'stale_position_offset']
    """
    return list(_FAULTS)


def get(name: str) -> Fault:
    """The :class:`Fault` called ``name`` (its docstring says where it shows)."""
    if name not in _FAULTS:
        raise ValueError(f"unknown fault {name!r}; known faults: {', '.join(_FAULTS)}")
    return _FAULTS[name]


def applies(model: "_tl.HookedTransformer", name: str) -> bool:
    """Whether fault ``name`` can be injected on ``model``."""
    return get(name).skip_reason(model) is None


@contextlib.contextmanager
def inject(model: "_tl.HookedTransformer", name: str) -> Iterator[Fault]:
    """Make ``model``'s cached forward calls reproduce the bug ``name``.

    Args:
        model: a HookedTransformer.
        name: one of :func:`names`.

    Yields:
        The :class:`Fault` (``fault.expected_site(model, pos)`` says where
        ``first_divergence()`` lands).

    Raises:
        ValueError: unknown name, or a fault that does not apply to this model
            (``alibi_unsliced`` on a non-ALiBi model, ``kv_heads_repeated_before_cache``
            without grouped-query attention).

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load("gpt2", dtype=torch.float64)
    >>> tokens = torch.arange(12)[None]
    >>> with interpkv.faults.inject(model, "no_cache_history"):
    ...     report = interpkv.compare(model, tokens, steps=[8, 4])
    >>> site = report.first_divergence()
    >>> site.hook, site.pos
    ('blocks.0.attn.hook_attn_scores', 8)
    """
    _tl.require_hooked(model, "interpkv.faults.inject")
    fault = get(name)
    reason = fault.skip_reason(model)
    if reason is not None:
        raise ValueError(f"cannot inject {name!r}: {reason}")
    stephooks.install(model, fault)
    try:
        yield fault
    finally:
        stephooks.uninstall(model, fault)
