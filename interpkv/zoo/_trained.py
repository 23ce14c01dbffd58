"""Trained zoo models: small character-level models that produce readable text.

Each shipped model is a HuggingFace model trained by ``scripts/train_zoo.py``
on Python standard-library docstrings, stored in ``weights/`` as

- ``<name>.safetensors``: the HF state dict in bfloat16 (tied weights once),
- ``<name>.json``: ``hf_config_class`` + ``hf_config`` (to rebuild the HF
  model) and training metadata (seed, steps, losses, corpus, greedy samples).

Loading rebuilds the HF model from the json, loads the weights (upcast exactly
to float32, or float64), and converts it with the zoo's own HF -> TL path
(:func:`interpkv.zoo._build.convert_hf`), so a trained model is processed
exactly like the random ones (``fold_ln``, ``center_writing_weights``,
``fold_value_biases``; logits equal HF's).
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import torch
import transformers
from safetensors.torch import load_file

from interpkv.zoo import _build, charvocab
from interpkv.zoo._build import WEIGHTS_DIR, HookedTransformer

__all__ = ["metadata", "hf_model", "load"]

_EXACT = (torch.float32, torch.float64)


@functools.cache
def _metadata(name: str) -> str:
    return (WEIGHTS_DIR / f"{name}.json").read_text()


def metadata(name: str) -> dict[str, Any]:
    """The json metadata of a trained model (a fresh dict each call).

    Args:
        name: A name from :func:`interpkv.zoo.trained_names`.

    Returns:
        The parsed ``<name>.json``: ``hf_config``, ``training``, ``val_loss``,
        ``corpus``, ``samples``, ...
    """
    return json.loads(_metadata(name))


def hf_model(name: str, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """The trained HF model of ``name`` (eager attention, eval mode).

    Args:
        name: A name from :func:`interpkv.zoo.trained_names`.
        dtype: dtype of the returned model. The stored bfloat16 weights are
            exact in float32 and float64.

    Returns:
        A fresh ``transformers`` causal-LM model.
    """
    meta = metadata(name)
    config = getattr(transformers, meta["hf_config_class"]).from_dict(meta["hf_config"])
    config._attn_implementation = "eager"
    config.architectures = [meta["architecture"]]  # TL's converter dispatches on it
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch.float32
        )
    state = load_file(str(WEIGHTS_DIR / f"{name}.safetensors"), device="cpu")
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.tie_weights()
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(
            f"zoo/{name}: trained weights do not fit the config: missing "
            f"{sorted(set(result.missing_keys) - tied)}, unexpected {result.unexpected_keys}"
        )
    if tied and not config.tie_word_embeddings:
        raise RuntimeError(f"zoo/{name}: lm_head.weight missing but embeddings are not tied")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(dtype).eval()


@functools.cache
def _processed(name: str, dtype: torch.dtype) -> tuple[Any, dict]:
    """Memoized processed TL (cfg, state dict); float32/64 converted in their own dtype."""
    if dtype not in _EXACT:
        cfg, sd = _processed(name, torch.float32)
        cfg = copy.deepcopy(cfg)
        cfg.dtype = dtype
        return cfg, {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    cfg, sd = _build.convert_hf(hf_model(name, dtype), label=name, dtype=dtype)
    cfg = copy.deepcopy(cfg)
    cfg.model_name = f"interpkv-zoo-{name}-trained"
    return cfg, sd


def load(name: str, dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """A fresh HookedTransformer holding the trained weights of ``name``.

    Args:
        name: A name from :func:`interpkv.zoo.trained_names`.
        dtype: Parameter dtype (float32/float64 converted in their own
            precision; lower precisions are the float32 result cast down).

    Returns:
        The model in eval mode on CPU, carrying the character vocabulary as a
        HuggingFace tokenizer (:func:`interpkv.zoo.charvocab.hf_tokenizer`,
        left padding, no BOS: ``cfg.default_prepend_bos`` is False as in
        training); ``model.zoo_metadata`` holds the json.
    """
    cfg, sd = _processed(name, dtype)
    cfg = copy.deepcopy(cfg)
    cfg.init_weights = False
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_state_dict(sd, strict=True)
    model.zoo_metadata = metadata(name)
    model.set_tokenizer(charvocab.hf_tokenizer(), default_padding_side="left")
    model.cfg.default_prepend_bos = False  # trained on random windows, never after a BOS
    return model.eval()
