"""Zoo models as SAELens ``HookedSAETransformer`` s, with random-weight SAEs attached.

SAELens's ``HookedSAETransformer`` (sae-lens 6.x) is the HookedTransformer
subclass most steering work runs on. ``model.add_sae(sae)`` replaces the hook
point at ``sae.cfg.metadata.hook_name`` by a wrapper module whose own hook
points fire as ``<hook>.hook_sae_input``, ``<hook>.hook_sae_acts_pre``,
``<hook>.hook_sae_acts_post``, ``<hook>.hook_sae_recons``, ``<hook>.hook_sae_error``
(with ``use_error_term=True``) and ``<hook>.hook_sae_output``. This module builds
such models offline:

- :func:`as_sae_transformer`: any HookedTransformer's weights (and tokenizer)
  in a ``HookedSAETransformer``, checked to compute the same logits;
- :func:`random_sae`: a ``sae_lens.SAE`` with random weights for one hook of a
  model, ``d_in`` read from the activation the hook sees;
- :func:`load_sae`: a zoo model converted, with one random SAE per hook attached.

SAELens is optional: it is imported only when one of these is called, and a
missing install raises an ImportError naming ``pip install sae-lens``.
"""

import copy
from typing import Any, Sequence, Union

import torch

from interpkv import tolerances
from interpkv.core.tl import HookedTransformer

__all__ = ["as_sae_transformer", "random_sae", "load_sae"]

_INSTALL = 'pip install "sae-lens>=6,<7"'


def _sae_lens():
    """The ``sae_lens`` module, or an ImportError saying how to install it."""
    try:
        import sae_lens
    except ImportError as exc:
        raise ImportError(
            f"this needs SAELens (sae_lens.HookedSAETransformer), which is not installed: {_INSTALL} "
            "(or pip install 'interpkv[dev]')"
        ) from exc
    return sae_lens


def as_sae_transformer(model: HookedTransformer) -> Any:
    """The same model as a ``sae_lens.HookedSAETransformer``, without SAEs.

    Copies the config (``cfg.default_prepend_bos`` included), the weights, the
    tokenizer (if any) and ``zoo_metadata``; the result is in
    eval mode, and its logits on a short sequence are checked to equal
    ``model``'s up to the dtype's rounding (:func:`interpkv.tolerances.site_tolerance`).

    Args:
        model: a HookedTransformer (e.g. from :func:`interpkv.zoo.load`).

    Returns:
        A ``HookedSAETransformer`` computing the same function.

    Raises:
        ImportError: SAELens is not installed.
        RuntimeError: the converted model's logits differ from ``model``'s.
    """
    sae_lens = _sae_lens()
    cfg = copy.deepcopy(model.cfg)
    cfg.init_weights = False
    with torch.random.fork_rng(devices=[]):  # its init is overwritten: keep the caller's RNG
        converted = sae_lens.HookedSAETransformer(cfg, tokenizer=None, move_to_device=False)
    for param in converted.parameters():  # every parameter in cfg.dtype, as the zoo builds them
        if param.is_floating_point() and param.dtype != cfg.dtype:
            param.data = param.data.to(cfg.dtype)
    converted.load_state_dict(model.state_dict(), strict=True)
    for mine, theirs in zip(converted.parameters(), model.parameters()):
        mine.requires_grad_(theirs.requires_grad)
    if model.tokenizer is not None:
        # Already set up by set_tokenizer (whose BOS rewrap cannot run twice); cfg is a copy of its result.
        converted.tokenizer = copy.deepcopy(model.tokenizer)
    if hasattr(model, "zoo_metadata"):
        converted.zoo_metadata = copy.deepcopy(model.zoo_metadata)
    converted.eval()
    probe = (torch.arange(min(8, cfg.n_ctx)) % cfg.d_vocab)[None].to(cfg.device)
    with torch.no_grad():
        expected, got = model(probe), converted(probe)
    # Equal up to rounding: TransformerLens memoizes each layer's ALiBi matrix and slices a later,
    # shorter call out of it, so a Bloom that ran a longer forward before differs in the last
    # bits (2.9e-6 in float32) from a fresh copy. A real conversion fault is O(1).
    tol = tolerances.site_tolerance(cfg.dtype)
    if not torch.allclose(expected, got, atol=tol, rtol=tol):
        raise RuntimeError(
            f"the HookedSAETransformer built from {cfg.model_name} computes other logits "
            f"(max abs difference {(expected - got).abs().max().item():.3g}); the conversion "
            "copies weights only, so the model's state lives elsewhere (report this)"
        )
    return converted


def _sae_input(model: Any, hook: str):
    """``(d_in, reshape_activations)`` for an SAE reading ``hook`` of ``model``."""
    attached = getattr(model, "acts_to_saes", {})
    if hook in attached:  # replacing an attached SAE: same input
        cfg = attached[hook].cfg
        return cfg.d_in, cfg.reshape_activations
    if hook not in model.hook_dict:
        close = [n for n in model.hook_dict if hook.split(".")[-1] in n][:5]
        raise ValueError(
            f"{hook!r} is not a hook point of this model"
            + (f" (similar: {', '.join(close)})" if close else "")
            + "; see model.hook_dict for the names"
        )
    probe = torch.zeros((1, 1), dtype=torch.long, device=model.cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(probe, names_filter=hook)
    act = cache[hook]
    if act.ndim == 4 and hook.endswith("hook_z"):
        return act.shape[-2] * act.shape[-1], "hook_z"  # SAELens flattens heads at hook_z only
    if act.ndim != 3:
        raise ValueError(
            f"{hook} fires with shape {tuple(act.shape)}; an SAE reads [batch, pos, d_in] "
            "(or hook_z's [batch, pos, head_index, d_head], which SAELens flattens)"
        )
    return act.shape[-1], "none"


def random_sae(
    model: Any,
    hook: str,
    *,
    d_sae: int = 64,
    seed: int = 0,
    architecture: str = "standard",
    **config: Any,
) -> Any:
    """A ``sae_lens.SAE`` with random weights for ``hook`` of ``model`` (not attached).

    Built from a config dict with ``sae_lens.SAE.from_dict`` (SAELens 6's
    constructor), in ``model.cfg.dtype`` on its device, so that
    ``model.add_sae(sae)`` works. ``d_in`` is the width of the activation at
    ``hook`` (``n_heads * d_head`` at ``attn.hook_z``, which SAELens flattens).
    Weights follow SAELens's own init (decoder rows Kaiming-uniform, encoder
    its transpose, zero biases), drawn from ``seed`` without touching the
    caller's RNG; no parameter requires grad.

    Args:
        model: a HookedTransformer / HookedSAETransformer.
        hook: hook point name, e.g. ``"blocks.0.hook_resid_post"``.
        d_sae: number of features.
        seed: RNG seed of the weights.
        architecture: SAELens architecture name (``"standard"``, ``"topk"``,
            ``"jumprelu"``, ...).
        **config: further SAELens config fields (e.g. ``k=8`` for ``"topk"``).

    Returns:
        The SAE, in eval mode.

    Raises:
        ImportError: SAELens is not installed.
        ValueError: ``hook`` is not a hook point of ``model``, or fires with an
            activation an SAE cannot read.
    """
    sae_lens = _sae_lens()
    d_in, reshape = _sae_input(model, hook)
    cfg = {
        "architecture": architecture,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": str(model.cfg.dtype).removeprefix("torch."),
        "device": str(model.cfg.device),
        "reshape_activations": reshape,
        "metadata": {"hook_name": hook, "model_name": model.cfg.model_name},
        **config,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = sae_lens.SAE.from_dict(cfg)
    for param in sae.parameters():
        param.requires_grad_(False)
    return sae.eval()


def load_sae(
    name: str,
    hooks: Union[str, Sequence[str]] = "blocks.0.hook_resid_post",
    *,
    d_sae: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    trained: bool = False,
    use_error_term: bool = False,
    architecture: str = "standard",
    **config: Any,
) -> Any:
    """A zoo model as a ``sae_lens.HookedSAETransformer`` with a random SAE on each hook.

    The model is :func:`interpkv.zoo.load` ``(name, dtype=dtype, seed=seed,
    trained=trained)`` converted by :func:`as_sae_transformer`; the SAE of the
    ``i``-th hook is :func:`random_sae` ``(model, hook, seed=seed + i, ...)``,
    attached with ``model.add_sae(sae, use_error_term=use_error_term)``. The
    SAEs are ``model.acts_to_saes[hook]``. No network is used.

    Args:
        name: zoo model name (see :func:`interpkv.zoo.names`).
        hooks: one hook point name, or several.
        d_sae: features per SAE.
        dtype: dtype of the model and SAEs.
        seed: seed of the model's and the SAEs' weights.
        trained: the shipped trained character-level weights (and tokenizer).
        use_error_term: SAELens's error term: the SAE's reconstruction error is
            added back, so the model computes what it computes without SAEs
            (``hook_sae_error`` fires).
        architecture, config: passed to :func:`random_sae`.

    Returns:
        The ``HookedSAETransformer``.

    Raises:
        ImportError: SAELens is not installed.
        ValueError: an unknown model, or a name that is not a hook point.

    >>> import interpkv, torch
    >>> model = interpkv.zoo.load_sae("llama", "blocks.0.hook_resid_post", d_sae=32)
    >>> model.acts_to_saes["blocks.0.hook_resid_post"].cfg.d_sae
    32
    >>> tokens = torch.arange(6)[None]
    >>> bool(torch.allclose(interpkv.forward(model, tokens), model(tokens), atol=1e-4))
    True
    """
    from interpkv import zoo

    _sae_lens()  # fail before building the model
    model = as_sae_transformer(zoo.load(name, dtype=dtype, seed=seed, trained=trained))
    for i, hook in enumerate([hooks] if isinstance(hooks, str) else list(hooks)):
        sae = random_sae(model, hook, d_sae=d_sae, seed=seed + i, architecture=architecture, **config)
        model.add_sae(sae, use_error_term=use_error_term)
    return model
