"""Where a ``transformers`` causal LM's TransformerLens-named sites are: one module per hook name.

Used by the ``"hf"`` engine (:mod:`interpkv.diagnostics.engines.hf`, which
hooks them) and by hook selection (:mod:`interpkv.diagnostics.selection`,
which lists them); it imports nothing of interpkv, so selection needs no
engine.
"""

import inspect
from typing import List, Optional, Sequence, Tuple

from torch import nn

__all__ = ["sites", "layers", "ATTENTION_NAMES", "MLP_NAMES", "POSITION_TABLES"]

ATTENTION_NAMES = ("self_attn", "self_attention", "attention", "attn")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "moe", "ffn", "fc2")
POSITION_TABLES = ("wpe", "embed_positions")


def layers(model: nn.Module) -> nn.ModuleList:
    n_layers = model.config.get_text_config().num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and len(module) > 0:
            if all(any(name in ATTENTION_NAMES for name, _ in layer.named_children()) for layer in module):
                return module
    raise ValueError(
        f"{type(model).__name__}: found no list of {n_layers} decoder layers with an attention child "
        f"named one of {ATTENTION_NAMES}; this layout is not supported by engine='hf'"
    )


def child(layer: nn.Module, candidates: Sequence[str]) -> Optional[nn.Module]:
    children = dict(layer.named_children())
    return next((children[name] for name in candidates if name in children), None)


def sites(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """``(hook name, module, kind)`` for every site of an HF causal LM, in forward order.

    ``kind`` is ``"output"`` (the module's output), ``"input"`` (its
    ``hidden_states`` input) or ``"output-residual"`` (output minus its
    ``residual`` argument, Bloom).
    """
    found = [("hook_embed", model.get_input_embeddings(), "output")]
    table = next(
        (m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in POSITION_TABLES and isinstance(m, nn.Embedding)),
        None,
    )
    if table is not None:
        found.append(("hook_pos_embed", table, "output"))
    for index, layer in enumerate(layers(model)):
        found.append((f"blocks.{index}.hook_resid_pre", layer, "input"))
        for family, candidates in (("hook_attn_out", ATTENTION_NAMES), ("hook_mlp_out", MLP_NAMES)):
            module = child(layer, candidates)
            if module is None:
                continue
            residual = "residual" in inspect.signature(module.forward).parameters
            found.append((f"blocks.{index}.{family}", module, "output-residual" if residual else "output"))
        found.append((f"blocks.{index}.hook_resid_post", layer, "output"))
    return found
