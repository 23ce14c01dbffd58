"""Build zoo models: HF construction and HF -> TransformerLens conversion.

The expensive work (HF init, conversion, weight processing) is memoized per
``(name, seed)`` (HF weights) and ``(name, seed, dtype)`` (processed TL state
dict and config). Public loaders then build a *fresh* model per call from the
memoized tensors, so users can mutate what they get back.

TransformerLens is reached through the :mod:`interpkv.core.tl` seam, like
everywhere else in the package.
"""

from __future__ import annotations

import copy
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers

from interpkv.core.tl import (
    HookedTransformer,
    HookedTransformerConfig,
    ProcessWeights,
    get_pretrained_model_config,
    get_pretrained_state_dict,
)
from interpkv.zoo import _fidelity, _handbuilt
from interpkv.zoo._specs import SPECS, ModelSpec

_EXACT = (torch.float32, torch.float64)


def hf_config(spec: ModelSpec) -> transformers.PretrainedConfig:
    """Instantiate the HF config of a spec (eager attention, no dropout).

    Args:
        spec: A spec with an HF config class.

    Returns:
        The HF config object.
    """
    cls = getattr(transformers, spec.hf_config_class)
    cfg = cls(**spec.hf_kwargs)
    cfg._attn_implementation = "eager"
    cfg.architectures = [spec.architecture]
    return cfg


@functools.cache
def _hf_float32(name: str, seed: int) -> transformers.PreTrainedModel:
    """Randomly initialise the float32 HF model of ``name`` (memoized).

    The global RNG state is left untouched (``fork_rng``).
    """
    spec = SPECS[name]
    config = hf_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch.float32, experts_implementation="eager"
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.perturb:
        _perturb(model, spec.perturb, seed)
    return model


def _perturb(model: transformers.PreTrainedModel, std: float, seed: int) -> None:
    """Add ``N(0, std)`` noise to every 1-D parameter (norm weights, biases), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.ndim == 1:
                param.add_(std * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def hf_model(name: str, seed: int, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """A fresh HF model of ``name``: the float32 weights cast to ``dtype``.

    Args:
        name: Zoo name with an HF pair.
        seed: Initialisation seed.
        dtype: Target dtype.

    Returns:
        The HF model in eval mode.
    """
    model = copy.deepcopy(_hf_float32(name, seed)).to(dtype)
    return model.eval()


def _fix_tl_config(name: str, cfg: HookedTransformerConfig, config: Any) -> None:
    """Patch fields TL's converter gets wrong or drops for tiny local configs."""
    cfg.model_name = f"interpkv-zoo-{name}"
    cfg.tokenizer_name = None
    cfg.default_prepend_bos = False
    cfg.device = "cpu"
    _fidelity.fix_config(cfg, config)


def _tl_from_hf(name: str, seed: int, dtype: torch.dtype) -> tuple[Any, dict]:
    """Convert the HF model of ``name`` to a processed TL (cfg, state dict)."""
    processing = SPECS[name].processing
    return convert_hf(hf_model(name, seed, dtype), label=name, dtype=dtype, processing=processing)


def convert_hf(
    hf: Any, *, label: str, dtype: torch.dtype, processing: str = "interpkv"
) -> tuple[Any, dict]:
    """Convert an in-memory HF causal LM to a processed TL (cfg, state dict).

    Args:
        hf: a ``transformers`` causal LM (any class TL 3.9 converts, or Gemma 2/3).
        label: a name for the model (used in its TL ``model_name``).
        dtype: float32 or float64 (processing runs in this dtype).
        processing: ``"interpkv"`` (:func:`_process_weights`) or
            ``"transformer_lens"`` (TL's ``load_and_process_state_dict`` with
            ``from_pretrained``'s defaults, ``center_unembed`` included).

    Returns:
        ``(cfg, state_dict)`` of a HookedTransformer computing the same function.
    """
    config = hf.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf).__name__]  # TL reads the class from here
    if not hasattr(config, "n_ctx") and hasattr(config, "n_positions"):
        # TL 3.9's GPT-2 converter reads hf_config.n_ctx, which transformers 5's GPT2Config() no
        # longer stores (only n_positions, the same number): give it the attribute it reads.
        config.n_ctx = config.n_positions
    tmp = tempfile.mkdtemp(prefix="ikv_")  # no "llama"/"gemma": TL sniffs paths
    try:
        config.save_pretrained(tmp)  # TL only reads config.json; weights come from `hf`
        if config.model_type in _handbuilt.MODEL_TYPES:
            cfg = _handbuilt.tl_config(config, dtype)
        else:
            cfg = get_pretrained_model_config(
                tmp,
                hf_cfg=config.to_dict(),
                fold_ln=True,
                device="cpu",
                default_prepend_bos=False,
                dtype=dtype,
            )
        _fix_tl_config(label, cfg, config)
        state_dict = get_pretrained_state_dict(tmp, cfg, hf_model=hf, dtype=dtype)
        state_dict = _fidelity.fix_state_dict(state_dict, hf, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    model = _new_model(cfg)
    # Unused tables (e.g. W_pos of rotary/ALiBi models) are absent from the HF
    # checkpoint; TL fills them with uninitialised memory, make them zeros.
    for key, value in model.state_dict().items():
        if key not in state_dict and "W_" in key:
            state_dict[key] = torch.zeros_like(value)
    if processing == "transformer_lens":
        model.load_and_process_state_dict(
            state_dict,
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
            refactor_factored_attn_matrices=False,
        )
        return model.cfg, model.state_dict()
    state_dict = _process_weights(model.fill_missing_keys(state_dict), cfg)
    # Folded norm weights (now all ones / zeros) have no parameter in *Pre norms.
    result = model.load_state_dict(state_dict, strict=False)
    leftover = [k for k in result.unexpected_keys if k.rsplit(".", 2)[-2][:2] != "ln"]
    if result.missing_keys or leftover:
        raise RuntimeError(f"zoo/{label}: bad conversion {result.missing_keys} {leftover}")
    return model.cfg, model.state_dict()


def model_from_hf(hf: Any, *, label: str = "hf") -> HookedTransformer:
    """A HookedTransformer computing the same function as an HF causal LM.

    Args:
        hf: the HF model (float32 or float64; its dtype is kept).
        label: a name for the model.

    Returns:
        The converted model, eval mode, CPU, no tokenizer.

    Raises:
        UnsupportedModelError: the converted model's logits differ from the HF
            model's on a short left-padded batch (see :mod:`interpkv.zoo._fidelity`).
    """
    dtype = next(hf.parameters()).dtype
    if dtype not in _EXACT:
        raise ValueError(f"convert a float32 or float64 HF model (got {dtype}); cast afterwards")
    cfg, sd = convert_hf(hf.eval(), label=label, dtype=dtype)
    model = _new_model(cfg)
    model.load_state_dict(sd, strict=True)
    model.eval()
    _fidelity.verify(model, hf, label=label)
    return model


def _new_model(cfg: Any) -> HookedTransformer:
    """An empty HookedTransformer whose every parameter has ``cfg.dtype``.

    TL 3.9's MoE router (``W_gate``, an ``nn.Linear``) ignores ``cfg.dtype``:
    a float64 state dict loaded into it would be rounded to float32, and the
    float64 forward would fail on the dtype mismatch.
    """
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != cfg.dtype:
            param.data = param.data.to(cfg.dtype)
    return model


def _process_weights(state_dict: dict, cfg: Any) -> dict:
    """``load_and_process_state_dict``'s processing, without its float32 round trip.

    Equivalent to ``fold_ln=True, center_writing_weights=True,
    center_unembed=False, fold_value_biases=True``. TL 3.9's
    ``ProcessWeights.process_weights`` casts every non-float32 tensor to float32
    and back, which silently rounds float64 weights to float32 precision; the
    steps below are the same calls in the same order, in the tensors' own dtype.
    ``cfg.normalization_type`` must already be the folded ``LNPre``/``RMSPre``.

    Args:
        state_dict: Converted TL state dict (all keys present).
        cfg: The model's TL config.

    Returns:
        The processed state dict.
    """
    is_ln = cfg.normalization_type in ("LN", "LNPre")
    if cfg.normalization_type in ("LN", "LNPre", "RMS", "RMSPre"):
        state_dict = ProcessWeights.fold_layer_norm(
            state_dict, cfg, fold_biases=is_ln, center_weights=is_ln
        )
    center = is_ln and not cfg.final_rms
    if center:
        state_dict = ProcessWeights.center_writing_weights(state_dict, cfg)
    state_dict = ProcessWeights.fold_value_biases(state_dict, cfg)
    if center:
        for layer in range(cfg.n_layers):
            key = f"blocks.{layer}.attn.b_O"
            state_dict[key] = state_dict[key] - state_dict[key].mean()
    return state_dict


def _tl_only(name: str, seed: int) -> tuple[Any, dict]:
    """Randomly initialise a TL-only model (float32)."""
    spec = SPECS[name]
    cfg = HookedTransformerConfig(
        **spec.tl_kwargs,
        dtype=torch.float32,
        device="cpu",
        default_prepend_bos=False,
        model_name=f"interpkv-zoo-{name}",
        original_architecture=spec.architecture,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _new_model(cfg)
    return model.cfg, model.state_dict()


@functools.cache
def processed(name: str, seed: int, dtype: torch.dtype) -> tuple[Any, dict]:
    """Memoized processed TL (cfg, state dict) of ``name`` in ``dtype``.

    Float32/float64 HF models are converted and weight-processed in their own
    dtype (so folding is exact to that precision); other dtypes are the
    float32 result cast down.

    Args:
        name: Zoo name.
        seed: Initialisation seed.
        dtype: Target dtype.

    Returns:
        ``(cfg, state_dict)``; treat both as read-only.
    """
    spec = SPECS[name]
    if spec.hf_config_class is not None and dtype in _EXACT:
        return _tl_from_hf(name, seed, dtype)
    cfg, sd = _tl_only(name, seed) if spec.hf_config_class is None else processed(
        name, seed, torch.float32
    )
    if dtype == torch.float32:
        return cfg, sd
    cfg = copy.deepcopy(cfg)
    cfg.dtype = dtype
    return cfg, {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def tl_model(name: str, seed: int, dtype: torch.dtype) -> HookedTransformer:
    """A fresh HookedTransformer of ``name`` built from the memoized weights.

    Args:
        name: Zoo name.
        seed: Initialisation seed.
        dtype: Target dtype.

    Returns:
        The model in eval mode, on CPU, without a tokenizer.
    """
    cfg, sd = processed(name, seed, dtype)
    cfg = copy.deepcopy(cfg)
    cfg.init_weights = False
    model = _new_model(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


# --- trained weights (loaded by interpkv.zoo._trained) -------------------------

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""Where trained weights live: ``<name>.safetensors`` plus ``<name>.json``."""


def trained_names() -> list[str]:
    """Zoo names that ship trained weights (both files present).

    Returns:
        Sorted names; empty until trained weights are added.
    """
    return sorted(
        n
        for n in SPECS
        if (WEIGHTS_DIR / f"{n}.safetensors").is_file() and (WEIGHTS_DIR / f"{n}.json").is_file()
    )
