"""Engine ``"hf"``: a ``transformers`` causal LM driven with its own cache, audited.

The run under test feeds the tokens chunk by chunk through the model's own
cache (a fresh ``DynamicCache(config=model.config)`` by default, which gives
sliding-window layers to Mistral / Gemma-2; pass ``cache=`` a factory for a
``StaticCache`` or any other)::

    model(input_ids=chunk, attention_mask=mask[:, :end], <cache>=cache,
          use_cache=True, position_ids=positions[:, start:end])

``attention_mask`` covers every token so far (HF's convention), and
``position_ids`` (absolute positions from the mask, the first real token of
a row being 0) are passed wherever the model's ``forward`` takes them: HF
GPT-2 and others otherwise number padding too (transformers #18104). The
reference is the same model run once on all tokens without a cache.

Precision: transformers' eager attention takes the softmax in float32 for
every zoo architecture but GPT-2 (GPT-J and GPT-Neo also cast query and key
to float32), so a float64 HF model agrees with itself cached vs uncached to
~1e-6, not 1e-14: audit those at 1e-5.

Sites get TransformerLens names, found generically by forward hooks on
modules (Llama / Qwen / Mistral / Gemma, GPT-2, GPT-NeoX, GPT-J, GPT-Neo,
Bloom, OPT layouts):

- ``hook_embed``: output of ``get_input_embeddings()``; ``hook_pos_embed``:
  output of a learned position table (``wpe``, ``embed_positions``) if any;
- ``blocks.{L}.hook_resid_pre`` / ``hook_resid_post``: input / output of
  decoder layer ``L``;
- ``blocks.{L}.hook_attn_out`` / ``hook_mlp_out``: output of the layer's
  attention / MLP module (Bloom's modules add the residual themselves: it is
  subtracted). These are the modules' outputs, so where a model norms them
  afterwards (Gemma-2's post-norms) they are taken before that norm.
- ``logits``.
"""

import inspect
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from interpkv.core import calls
from interpkv.diagnostics.capture import NamesFilter, Sink, names_filter
from interpkv.diagnostics.engines._common import chunk_bounds, layout
from interpkv.diagnostics.hfsites import ATTENTION_NAMES, MLP_NAMES, POSITION_TABLES, sites  # noqa: F401 (re-exported)

__all__ = ["run", "sites", "dynamic_cache", "static_cache", "CacheFactory"]

CacheFactory = Callable[[nn.Module, int, int], object]
"""``factory(model, batch_size, max_len) -> transformers Cache`` (a fresh, empty cache)."""

def dynamic_cache(model: nn.Module, batch_size: int, max_len: int):
    """``DynamicCache(config=model.config)`` (sliding-window layers where the config has them)."""
    import transformers  # deferred: transformers, only when an HF model runs

    return transformers.DynamicCache(config=model.config)


def static_cache(model: nn.Module, batch_size: int, max_len: int):
    """``StaticCache(config=model.config, max_cache_len=max_len)``."""
    import transformers  # deferred: transformers, only when an HF model runs

    return transformers.StaticCache(config=model.config, max_cache_len=max_len)


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _argument(module: nn.Module, args: tuple, kwargs: dict, name: str):
    if name in kwargs:
        return kwargs[name]
    params = [p for p in inspect.signature(module.forward).parameters if p not in ("self",)]
    index = params.index(name)
    return args[index] if index < len(args) else None


class _Hooks:
    """Forward hooks on the site modules, feeding the current chunk's positions to a sink."""

    def __init__(self, model: nn.Module, sink: Sink, wanted: Callable[[str], bool]):
        self.sink = sink
        self.q_pos: Tensor = torch.empty(0)
        self.nonfinite: Optional[Tuple[str, int, int]] = None
        self.handles = []
        for name, module, kind in sites(model):
            if not wanted(name):
                continue
            if kind == "input":
                self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                calls.track(self.handles[-1])
            else:
                self.handles.append(module.register_forward_hook(self._post(name, kind), with_kwargs=True))
                calls.track(self.handles[-1])

    def _feed(self, name: str, act: Tensor) -> None:
        act = act.detach()
        batch, n = self.q_pos.shape
        if act.ndim == 2 and act.shape[0] == batch * n:
            act = act.reshape(batch, n, act.shape[1])  # OPT runs its MLP on flattened tokens
        if act.ndim < 2 or act.shape[:2] != self.q_pos.shape:
            raise ValueError(
                f"cannot capture {name}: shape {tuple(act.shape)} does not start with "
                f"[batch, pos] = {tuple(self.q_pos.shape)}; leave it out with names=..."
            )
        if self.nonfinite is None and bool(torch.isnan(act[self.q_pos >= 0]).any()):
            row, col = torch.isnan(act.flatten(2).sum(-1)).logical_and(self.q_pos >= 0).nonzero()[0].tolist()
            self.nonfinite = (name, row, int(self.q_pos[row, col]))
        self.sink.activation(name, act, self.q_pos, None)

    def check_finite(self, model: nn.Module) -> None:
        """Raise when the model returned NaN at a real token (no comparison can tell it from the reference)."""
        if self.nonfinite is None:
            return
        name, row, pos = self.nonfinite
        raise ValueError(
            f"{type(model).__name__} returned NaN at a real token ({name}, batch row {row}, position "
            f"{pos}); NaN compares to nothing, so this run cannot be compared. Seen with "
            "transformers' eager attention in float64 under left padding: the float64 mask minimum becomes "
            "-inf in its float32 softmax, fully masked padding rows turn NaN, and NaN reaches real tokens "
            "through zero-weighted values. Run in float32, or without padding"
        )

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            self._feed(name, args[0] if args else kwargs["hidden_states"])

        return hook

    def _post(self, name: str, kind: str):
        def hook(module, args, kwargs, output):
            out = _first(output)
            if kind == "output-residual":
                out = out - _argument(module, args, kwargs, "residual")
            self._feed(name, out)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _cache_keyword(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def run(
    model: nn.Module,
    tokens: Tensor,
    sink_factory: Callable[[Tensor], Sink],
    *,
    steps: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
    names: NamesFilter = None,
    cache: Union[None, object, CacheFactory] = None,
) -> Sink:
    """Run an HF causal LM through its own cache (or uncached), feeding a sink.

    Args:
        model: a ``transformers`` causal LM (``PreTrainedModel``).
        tokens: ``[batch, pos]`` token ids.
        sink_factory: builds the sink from the ``[batch, pos]`` valid grid.
        steps: chunk lengths through the cache; None is one uncached call.
        attention_mask: ``[batch, pos]``, 1 = real, 0 = padding (left padding allowed).
        names: sites to record (as in :func:`interpkv.capture`, TransformerLens names).
        cache: an empty ``transformers`` Cache, or a :data:`CacheFactory`
            (default :func:`dynamic_cache`). Ignored when ``steps`` is None.

    Returns:
        The sink, after ``finish()``.
    """
    lay = layout(tokens, attention_mask)
    batch, n_tokens = lay.tokens.shape
    sink = sink_factory(lay.valid)
    positions = lay.true_pos.clamp(min=0)  # padding: any valid index, masked anyway
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    cached = steps is not None
    kwargs = {"use_cache": cached}
    if cached:
        made = dynamic_cache if cache is None else cache
        kwargs[_cache_keyword(model)] = made(model, batch, n_tokens) if callable(made) else made
    hooks = _Hooks(model, sink, names_filter(names))
    try:
        with torch.no_grad():
            for start, end in chunk_bounds(n_tokens, steps):
                hooks.q_pos = lay.true_pos[:, start:end]
                extra = {"position_ids": positions[:, start:end]} if takes_positions else {}
                try:
                    out = model(
                        input_ids=lay.tokens[:, start:end], attention_mask=lay.mask[:, :end], **kwargs, **extra
                    )
                except RuntimeError as error:
                    _refuse_static(model, kwargs.get(_cache_keyword(model)), error)
                    raise
                sink.logits(out.logits.detach(), hooks.q_pos)
    finally:
        hooks.remove()
    hooks.check_finite(model)
    sink.finish()
    return sink


def _refuse_static(model: nn.Module, cache, error: RuntimeError) -> None:
    """One line instead of a shape error deep in the model when it cannot run a ``StaticCache``.

    Bloom's attention (transformers 5) adds its ALiBi bias over the keys of
    the call, not over a static cache's whole length, and fails with a shape error.
    """
    import transformers  # deferred: transformers, only when an HF model runs

    if isinstance(cache, transformers.StaticCache):
        raise ValueError(
            f"engine='hf': {type(model).__name__} ({model.config.model_type}) does not run with a StaticCache in "
            f"transformers {transformers.__version__} (its forward failed: {str(error).splitlines()[0]}); "
            "compare with its DynamicCache instead (cache=None)"
        ) from error
