"""Cache corruption injected into any engine's own cache update.

:mod:`interpkv.faults` re-creates known bugs inside interpkv's cached path.
The faults here are engine-level: each patches the *cache update* of one
engine, so the same corruption can be planted in interpkv's
``KVCache``, in TransformerLens's ``TransformerLensKeyValueCache`` and in a
``transformers`` ``Cache``, and :func:`interpkv.compare` must point at the
layer and position where it was planted::

    with engines.faults.inject(model, "corrupt_stored_key", engine="hf", layer=1) as fault:
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
from dataclasses import dataclass
from typing import Iterator, List, Tuple

from interpkv.cache.kvcache import KVCache
from interpkv.diagnostics.engines import hf as _hf
from interpkv.diagnostics.engines import transformer_lens as _tle

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
        model: the model the engine runs (a HookedTransformer, or an HF causal LM for ``"hf"``).
        name: one of :func:`names`.
        engine: ``"interpkv"``, ``"transformer_lens"`` or ``"hf"`` (default: the model's default engine).
        layer: the layer whose stored key is corrupted.
        delta: added to every coordinate of that key.

    Yields:
        An :class:`EngineFault` (``expected_site(first_cached_pos)``).

    >>> import interpkv, torch
    >>> from interpkv.diagnostics.engines import faults
    >>> model = interpkv.zoo.load("gpt2", dtype=torch.float64)
    >>> with faults.inject(model, engine="transformer_lens", layer=1) as fault:
    ...     report = interpkv.compare(model, torch.arange(12)[None], steps=[8, 4], engine="transformer_lens")
    >>> site = report.first_divergence(atol=1e-10, rtol=1e-10)
    >>> (site.hook, site.layer, site.pos) == fault.expected_site(8)
    True
    """
    from interpkv.diagnostics.engines import resolve

    if name not in names():
        raise ValueError(f"unknown engine fault {name!r}; known: {', '.join(names())}")
    engine = resolve(model, engine)
    n_layers = _n_layers(model, engine)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers}) for this model, got {layer}")
    if engine == "hf":
        patch, hook = _hf.corrupt_stored_key(layer, delta), _hf.expected_corruption_hook(model, layer)
    elif engine == "transformer_lens":
        patch, hook = _tle.corrupt_stored_key(layer, delta), _tle.expected_corruption_hook(model, layer)
    else:
        patch, hook = _corrupt_interpkv(layer, delta), f"blocks.{layer}.attn.hook_attn_scores"
    with patch:
        yield EngineFault(name, engine, layer, hook)


def _n_layers(model, engine: str) -> int:
    if engine == "hf":
        return model.config.get_text_config().num_hidden_layers
    return model.cfg.n_layers
