"""Cache corruption injected into any engine's own cache update (monkeypatching TransformerLens and HF).

Every piece of interpkv that patches another library's cache class lives here,
next to the findings (:mod:`interpkv.verify.findings`) that demonstrate
TransformerLens's own cache bugs, and away from the diagnostics, whose calls
never change a model.

:mod:`interpkv.faults` re-creates known bugs inside interpkv's cached path.
The faults here are engine-level: each patches the *cache update* of one
engine, so the same corruption can be planted in interpkv's
``KVCache``, in TransformerLens's ``TransformerLensKeyValueCache`` and in a
``transformers`` ``Cache``, and :func:`interpkv.compare` must point at the
layer and position where it was planted::

    with engine_faults.inject(model, "corrupt_stored_key", engine="hf", layer=1) as fault:
        report = interpkv.compare(model, tokens, steps=[8, 1, 1, 4], engine="hf")
    report.first_divergence()   # layer 1, pos 8: fault.expected_site(model, 8)

``corrupt_stored_key``: the first key a cache layer stores once it already
holds history (the first cached position: 8 with ``steps=[8, 1, 1, 4]``;
under left padding, that slot's absolute position in each row) gets
``delta`` added to every coordinate, and that corrupted key is what every
later query reads. Only cached runs are touched; the uncached reference
never has history. The patch lives only inside the ``with`` block.
"""

import contextlib
import weakref
from dataclasses import dataclass
from typing import Iterator, List, Tuple

from interpkv.cache.kvcache import KVCache
from interpkv.core import tl as _tl
from interpkv.core.schemes import Rotary, scheme_for
from interpkv.diagnostics.engines import resolve

__all__ = ["names", "inject", "EngineFault"]

CORRUPT_STORED_KEY = "corrupt_stored_key"


def names() -> List[str]:
    """The engine-level faults :func:`inject` knows."""
    return [CORRUPT_STORED_KEY]


@dataclass(frozen=True)
class EngineFault:
    """A planted corruption: which engine, which layer, and the hook it first shows at."""

    name: str
    engine: str
    layer: int
    hook: str

    def expected_site(self, first_cached_pos: int) -> Tuple[str, int, int]:
        """``(hook, layer, pos)`` where ``first_divergence()`` must land (row with no padding)."""
        return self.hook, self.layer, first_cached_pos


@contextlib.contextmanager
def _corrupt_interpkv(layer: int, delta: float) -> Iterator[None]:
    """Caches from ``KVCache.for_model`` corrupt the first key layer ``layer`` writes after history."""
    original = KVCache.__dict__["for_model"]

    def for_model(klass, *args, **kwargs):
        cache = original.__func__(klass, *args, **kwargs)
        target = cache.layers[layer]
        write, done = target.write, []

        def corrupting_write(start, keys, values):
            if start > 0 and not done:
                keys = keys.clone()
                keys[:, 0] += delta  # (B, kv_head, d_head) of the first new slot, after rotary
                done.append(True)
            return write(start, keys, values)

        target.write = corrupting_write
        return cache

    KVCache.for_model = classmethod(for_model)
    try:
        yield
    finally:
        KVCache.for_model = original


@contextlib.contextmanager
def inject(
    model, name: str = CORRUPT_STORED_KEY, *, engine: str = None, layer: int = 0, delta: float = 1.0
) -> Iterator[EngineFault]:
    """Plant fault ``name`` in ``engine``'s cache update for the duration of the block.

    Args:
        model: the model the engine runs (a HookedTransformer, an HF causal LM for ``"hf"``, a
            TransformerBridge for ``"transformer_bridge"``).
        name: one of :func:`names`.
        engine: ``"interpkv"``, ``"transformer_lens"``, ``"hf"`` or ``"transformer_bridge"`` (default: the
            model's default engine).
        layer: the layer whose stored key is corrupted.
        delta: added to every coordinate of that key.

    Yields:
        An :class:`EngineFault` (``expected_site(first_cached_pos)``).

    >>> import interpkv, torch
    >>> from interpkv.verify import engine_faults as faults
    >>> model = interpkv.zoo.load("gpt2", dtype=torch.float64)
    >>> with faults.inject(model, engine="transformer_lens", layer=1) as fault:
    ...     report = interpkv.compare(model, torch.arange(12)[None], steps=[8, 4], engine="transformer_lens")
    >>> site = report.first_divergence(atol=1e-10, rtol=1e-10)
    >>> (site.hook, site.layer, site.pos) == fault.expected_site(8)
    True
    """
    if name not in names():
        raise ValueError(f"unknown engine fault {name!r}; known: {', '.join(names())}")
    engine = resolve(model, engine)
    n_layers = _n_layers(model, engine)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers}) for this model, got {layer}")
    if engine == "hf":
        patch, hook = _corrupt_hf(layer, delta), _expected_hf(model, layer)
    elif engine == "transformer_bridge":  # the bridge stores keys through HF's Cache.update too
        patch, hook = _corrupt_hf(layer, delta), f"blocks.{layer}.attn.hook_attn_scores"
    elif engine == "transformer_lens":
        patch, hook = _corrupt_transformer_lens(layer, delta), _expected_transformer_lens(model, layer)
    else:
        patch, hook = _corrupt_interpkv(layer, delta), f"blocks.{layer}.attn.hook_attn_scores"
    with patch:
        yield EngineFault(name, engine, layer, hook)


def _n_layers(model, engine: str) -> int:
    if engine == "hf":
        return model.config.get_text_config().num_hidden_layers
    return model.cfg.n_layers


@contextlib.contextmanager
def _corrupt_transformer_lens(layer: int, delta: float = 1.0) -> Iterator[None]:
    """Caches created inside the block corrupt one stored key (a fault of TransformerLens's cache update).

    ``TransformerLensKeyValueCache.init_cache`` is wrapped so that the cache
    entry of ``layer`` adds ``delta`` to every coordinate of the first key it
    appends once it already holds history (the first cached position), and
    stores that. TransformerLens caches keys before rotary, so the corrupted
    key is rotated at its own position.

    First divergence: ``blocks.{layer}.attn.hook_rot_k`` (rotary models) or
    ``blocks.{layer}.attn.hook_attn_scores`` at the first cached position.
    """
    cls = _tl.TransformerLensKeyValueCache
    original = cls.__dict__["init_cache"]

    def init_cache(klass, *args, **kwargs):
        cache = original.__func__(klass, *args, **kwargs)
        entry = cache.entries[layer]
        append, done = entry.append, []

        def corrupting_append(new_keys, new_values):
            if entry.past_keys.shape[1] > 0 and not done:
                new_keys = new_keys.clone()
                new_keys[:, 0] += delta  # (B, H_kv, d_head) of the first new slot
                done.append(True)
            return append(new_keys, new_values)

        entry.append = corrupting_append
        return cache

    cls.init_cache = classmethod(init_cache)
    try:
        yield
    finally:
        cls.init_cache = original


def _expected_transformer_lens(model, layer: int) -> str:
    """The hook where :func:`_corrupt_transformer_lens` first shows on ``model``."""
    if isinstance(scheme_for(model), Rotary):  # TransformerLens caches keys before rotary
        return f"blocks.{layer}.attn.hook_rot_k"
    return f"blocks.{layer}.attn.hook_attn_scores"


@contextlib.contextmanager
def _corrupt_hf(layer: int, delta: float = 1.0) -> Iterator[None]:
    """Every ``transformers`` cache corrupts one stored key inside the block (a fault of its update).

    ``Cache.update`` (which ``DynamicCache``, ``StaticCache`` and the
    sliding-window caches inherit) is wrapped: the first time layer ``layer``
    of a cache is updated while it already holds history, ``delta`` is added
    to every coordinate of the first new key (HF caches keys after rotary),
    and that is what is stored and attended.

    First divergence: ``blocks.{layer}.hook_attn_out`` at the first cached position.
    """
    from transformers import cache_utils  # deferred: transformers is only needed for the hf engine

    cls = cache_utils.Cache
    original = cls.__dict__["update"]
    done: weakref.WeakSet = weakref.WeakSet()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == layer and self not in done and self.get_seq_length(layer_idx) > 0:
            key_states = key_states.clone()
            key_states[:, :, 0] += delta  # (B, H_kv, d_head) of the first new slot
            done.add(self)
        return original(self, key_states, value_states, layer_idx, *args, **kwargs)

    cls.update = update
    try:
        yield
    finally:
        cls.update = original


def _expected_hf(model, layer: int) -> str:
    """The site where :func:`_corrupt_hf` first shows."""
    return f"blocks.{layer}.hook_attn_out"
