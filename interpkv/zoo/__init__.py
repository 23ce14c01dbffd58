"""A zoo of tiny, deterministic TransformerLens models, one per positional scheme.

Every model is built offline from a config (no hub access), is small enough
for fast CPU tests, and — where an HF class exists — has an HF twin with the
same weights, so TransformerLens behaviour can be checked against HF::

    from interpkv import zoo
    model = zoo.load("llama", dtype=torch.float64)
    tl, hf = zoo.load_pair("mistral")
    hf = zoo.load_hf("bloom")  # the HF twin alone: no TransformerLens needed
    bridge = zoo.load_bridge("bloom")  # a TransformerLens TransformerBridge around it
    sae_model = zoo.load_sae("gpt2", "blocks.0.hook_resid_post")  # needs sae-lens
"""

from __future__ import annotations

from typing import Any

import torch

from interpkv.core import tl as _tl
from interpkv.core.tl import HookedTransformer
from interpkv.zoo import _build, _trained, charvocab
from interpkv.zoo._sae import as_sae_transformer, load_sae, random_sae
from interpkv.zoo._specs import SPECS
from interpkv.zoo._twins import _check_dtype, _check_name, _check_pair, _check_trained, bridge_from_hf, load_bridge, load_hf

__all__ = [
    "names",
    "pairs",
    "trained_names",
    "tokenizer",
    "charvocab",
    "info",
    "load",
    "load_pair",
    "load_hf",
    "load_bridge",
    "bridge_from_hf",
    "load_hf_dir",
    "from_hf",
    "load_sae",
    "as_sae_transformer",
    "random_sae",
]


def names() -> list[str]:
    """Every built-in zoo model.

    Returns:
        Model names, in a stable order.
    """
    return list(SPECS)


def pairs() -> list[str]:
    """Zoo models that have an HF twin (usable with :func:`load_pair`).

    Returns:
        Model names, in a stable order.
    """
    return [n for n, s in SPECS.items() if s.hf_config_class is not None]


# --- trained models (interpkv.zoo._trained) -----------------------------------


def trained_names() -> list[str]:
    """Zoo models that ship trained character-level weights (same as :func:`trained`).

    Returns:
        Sorted names, one per positional family: ``gpt2`` (learned absolute),
        ``llama`` (rotary + GQA), ``bloom`` (ALiBi).

    >>> from interpkv import zoo
    >>> zoo.trained_names()
    ['bloom', 'gpt2', 'llama']
    """
    return _build.trained_names()


def tokenizer(name: str) -> charvocab.CharTokenizer:
    """The character tokenizer of a trained zoo model.

    Args:
        name: A name from :func:`trained_names` (all share one vocabulary).

    Returns:
        An object with ``encode(str) -> Tensor`` (1-D ids), ``decode(ids) -> str``
        and ``vocab_size`` (97); see :mod:`interpkv.zoo.charvocab`.

    Raises:
        ValueError: If ``name`` has no trained weights.

    >>> from interpkv import zoo
    >>> tok = zoo.tokenizer("llama")
    >>> tok.decode(tok.encode("Return the"))
    'Return the'
    """
    _check_trained(name)
    return charvocab.TOKENIZER


def info(name: str) -> dict[str, Any]:
    """Describe a zoo model (for tables and docs).

    Args:
        name: Zoo model name.

    Returns:
        A dict with ``name``, ``architecture``, ``positional`` (scheme
        description), ``attention`` (heads / GQA / windows), the key sizes
        ``n_layers``, ``d_model``, ``n_heads``, ``n_kv_heads``, ``d_head``,
        ``rotary_dim``, ``window`` (``None`` if no layer is windowed),
        ``attn_types``, ``n_ctx``, ``d_vocab``, and the flags ``has_pair``,
        ``trained`` and ``tl_pair_note`` (known TL-vs-HF mismatch, if any).

    Raises:
        ValueError: If ``name`` is not a zoo model.
    """
    _check_name(name)
    spec = SPECS[name]
    cfg, _ = _build.processed(name, 0, torch.float32)
    rotary = cfg.positional_embedding_type == "rotary"
    return {
        "name": name,
        "architecture": spec.architecture,
        "positional": spec.positional,
        "attention": spec.attention,
        "positional_embedding_type": cfg.positional_embedding_type,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_key_value_heads or cfg.n_heads,
        "d_head": cfg.d_head,
        "rotary_dim": cfg.rotary_dim if rotary else None,
        "window": cfg.window_size if cfg.use_local_attn else None,
        "attn_types": list(cfg.attn_types) if cfg.attn_types else None,
        "n_ctx": cfg.n_ctx,
        "d_vocab": cfg.d_vocab,
        "has_pair": spec.hf_config_class is not None,
        "trained": name in trained_names(),
        "tl_pair_note": spec.tl_pair_note,
    }


def load(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    trained: bool = False,
) -> HookedTransformer:
    """Load a fresh tiny HookedTransformer.

    The model is on CPU, in eval mode and has ``cfg.default_prepend_bos =
    False`` (interpkv works on token ids). Random models have no tokenizer;
    trained ones carry a HuggingFace tokenizer of the character vocabulary
    (:func:`interpkv.zoo.charvocab.hf_tokenizer`), so ``model.to_tokens``,
    ``model.to_string`` and text prompts to interpkv's entry points work. Weights
    are deterministic in ``seed``; for HF-backed models they are the HF init
    converted with ``fold_ln``, ``center_writing_weights`` and
    ``fold_value_biases`` (but not ``center_unembed``, so logits equal HF's).
    The first call per ``(name, seed, dtype)`` builds and converts; later calls
    reuse memoized tensors and return an independent copy.

    Args:
        name: Zoo model name (see :func:`names`).
        dtype: Parameter dtype. float32 and float64 are converted in their
            own precision; float16/bfloat16 are the float32 weights cast down.
        seed: Initialisation seed.
        trained: Load the shipped trained character-level model instead
            (see :func:`trained_names`). Its sizes differ from the random
            model's (3 layers, d_model 128, 97-char vocabulary, see
            :func:`tokenizer`); ``seed`` is ignored and ``model.zoo_metadata``
            holds the training record.

    Returns:
        A ``transformer_lens.HookedTransformer``.

    Raises:
        ValueError: Unknown name, bad dtype, or ``trained=True`` for a model
            without trained weights.
    """
    _check_name(name)
    _check_dtype(dtype)
    _tl.require("interpkv.zoo.load (a HookedTransformer)")
    if trained:
        _check_trained(name)
        return _trained.load(name, dtype)
    return _build.tl_model(name, int(seed), dtype)


def load_pair(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    trained: bool = False,
) -> tuple[HookedTransformer, Any]:
    """Load a zoo model together with its HF twin holding the same weights.

    Args:
        name: Zoo model name with an HF class (see :func:`pairs`).
        dtype: dtype of both models.
        seed: Initialisation seed (ignored with ``trained=True``).
        trained: The shipped trained character-level weights (see
            :func:`trained_names`) instead of random ones; the
            HookedTransformer then carries the tokenizer, as with
            ``load(name, trained=True)``.

    Returns:
        ``(hooked_transformer, hf_model)``; the HF model (eager attention) is
        in eval mode with the same dtype. Both are fresh copies.

    Raises:
        ValueError: Unknown name, bad dtype, a model without an HF class, or
            ``trained=True`` for a model without trained weights.

    >>> from interpkv import zoo
    >>> tl, hf = zoo.load_pair("llama", trained=True)
    >>> ids = tl.to_tokens("def ")
    >>> bool((tl(ids) - hf(ids).logits).abs().max() < 1e-4)
    True
    """
    _check_pair(name, dtype)
    _tl.require("interpkv.zoo.load_pair (a HookedTransformer and its HF twin; zoo.load_hf gives the HF model alone)")
    if trained:
        _check_trained(name)
        return _trained.load(name, dtype), _trained.hf_model(name, dtype)
    tl = _build.tl_model(name, int(seed), dtype)
    hf = _build.hf_model(name, int(seed), dtype)
    return tl, hf


def load_hf_dir(
    path: Any,
    *,
    dtype: torch.dtype = torch.float32,
    return_hf: bool = False,
) -> Any:
    """Load a local HuggingFace model directory as a HookedTransformer (no network).

    The directory is what ``model.save_pretrained(dir)`` writes (``config.json``
    and weights), optionally with ``tokenizer.save_pretrained(dir)``'s files.
    The model is loaded with ``local_files_only=True`` and eager attention and
    converted like the zoo's own models (:func:`from_hf`), so it computes the
    same function as the HF model. When the directory has a tokenizer, the
    model carries it, and ``cfg.default_prepend_bos`` follows the tokenizer:
    True exactly when the HF tokenizer itself prepends BOS, so
    ``model.to_tokens(text)`` gives the ids ``tokenizer(text)`` gives.

    Args:
        path: the directory.
        dtype: float32 or float64 (the conversion is exact in both).
        return_hf: also return the HF model (as ``from_pretrained`` returns
            loading info with ``output_loading_info=True``).

    Returns:
        A HookedTransformer in eval mode on CPU, or ``(hooked_transformer,
        hf_model)`` with ``return_hf=True``.

    Raises:
        ValueError: ``path`` is not a directory with a ``config.json``.

    >>> import tempfile, torch
    >>> from interpkv import zoo
    >>> _, hf = zoo.load_pair("gpt2", trained=True)
    >>> folder = tempfile.mkdtemp()
    >>> hf.save_pretrained(folder)
    >>> _ = zoo.charvocab.hf_tokenizer().save_pretrained(folder)
    >>> model = zoo.load_hf_dir(folder)
    >>> model.to_string(model.to_tokens("def f():"))
    ['def f():']
    """
    import os

    import transformers

    _tl.require("interpkv.zoo.load_hf_dir (a HookedTransformer)")
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"{path!r} is not a HuggingFace model directory (no config.json); pass a directory "
            "written by model.save_pretrained(dir) (or a zoo name to interpkv.zoo.load)"
        )
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, attn_implementation="eager", dtype=dtype
    ).eval()
    model = from_hf(hf, label=os.path.basename(os.path.normpath(path)))
    if _has_tokenizer(path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        prepends_bos = len(tokenizer.encode("")) > 0
        model.set_tokenizer(tokenizer)
        model.cfg.default_prepend_bos = prepends_bos
    return (model, hf) if return_hf else model


def _has_tokenizer(path: str) -> bool:
    import os

    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return any(os.path.isfile(os.path.join(path, f)) for f in files)


def from_hf(hf: Any, *, label: str = "hf") -> HookedTransformer:
    """Convert any in-memory HF causal LM (float32/float64) into a HookedTransformer.

    Uses the zoo's own conversion path (TransformerLens's converters, with the
    float64-exact weight processing and the config fixes the zoo needs), so the
    result computes the same function as ``hf``.

    Args:
        hf: a ``transformers`` causal LM of a class TransformerLens converts.
        label: a name recorded in ``cfg.model_name``.

    Returns:
        A HookedTransformer in eval mode on CPU, without a tokenizer.
    """
    _tl.require("interpkv.zoo.from_hf (a HookedTransformer)")
    return _build.model_from_hf(hf, label=label)
