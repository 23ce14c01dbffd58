"""What a forward must know about SAELens's ``HookedSAETransformer`` (sae-lens 6.x).

``model.add_sae(sae)`` puts a wrapper module where a hook point was
(``model._acts_to_saes``: input hook name -> wrapper; a transcoder writes at
``model._transcoder_output_hooks[name]``). Two things in that wrapper touch
state shared by every call, so a call routes each wrapper through its view of
the model (:mod:`interpkv.core.overlay`) with :func:`wrapper_routes`:

- With ``use_error_term=True`` the wrapper recomputes the reconstruction with
  the SAE's hook points swapped for ``nn.Identity`` (``_disable_hooks``), on
  the shared SAE: another thread's call running meanwhile would lose its hooks
  there. The routed forward runs the wrapper on a per-call copy whose SAE has
  its own module table, so the swap is private to the call.
- ``exclude_special_tokens`` masks come from the model's *input*, which for
  interpkv (it calls the model with the residual stream) is not token ids. The
  routed forward carries a mask computed from this call's ids instead.

Nothing here imports sae_lens: a model that is not a HookedSAETransformer has
no ``_acts_to_saes`` and gets no routes.
"""

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["wrapper_routes"]


def _private(module: torch.nn.Module, **state) -> torch.nn.Module:
    copy = object.__new__(type(module))
    copy.__dict__.update(module.__dict__)
    copy.__dict__["_modules"] = dict(module._modules)  # setattr of a submodule stays in the copy
    copy.__dict__.update(state)
    return copy


def _routed(wrapper: torch.nn.Module, mask: Optional[Tensor]) -> Callable[[Tensor], Tensor]:
    forward = type(wrapper).forward

    def routed(original_output: Tensor) -> Tensor:
        # Read the wrapper now: a transcoder's input hook has just captured its input on it.
        sae = wrapper.__dict__["_sae"]
        try:
            return forward(_private(wrapper, _sae=_private(sae), _token_mask=mask), original_output)
        finally:
            wrapper.__dict__["_captured_input"] = None  # as the wrapper's own forward leaves it

    return routed


def wrapper_routes(model: torch.nn.Module, ids: Optional[Tensor]) -> List[Tuple[Tuple[str, ...], Callable]]:
    """``(path, forward)`` for each SAE wrapper of ``model`` (none for other models).

    Args:
        model: a HookedTransformer, possibly a HookedSAETransformer with SAEs attached.
        ids: this call's new token ids ``[batch, pos]``, or None for embedding inputs.

    Raises:
        ValueError: an SAE excludes special tokens but the call has no token ids.
    """
    wrappers = getattr(model, "_acts_to_saes", None)
    if not wrappers:
        return []
    outputs = getattr(model, "_transcoder_output_hooks", {})
    routes = []
    for input_hook, wrapper in wrappers.items():
        if "_sae" not in wrapper.__dict__:  # not the wrapper this module knows: run as it is
            continue
        exclude = getattr(wrapper, "exclude_special_tokens", False)
        mask = None
        if exclude is not False:
            if ids is None:
                raise ValueError(
                    f"the SAE at {input_hook} excludes special tokens, which needs token ids; this call "
                    "was given embeddings: pass token ids, or add_sae(..., exclude_special_tokens=False)"
                )
            mask = model._compute_exclusion_mask(ids, exclude)
        routes.append((tuple(outputs.get(input_hook, input_hook).split(".")), _routed(wrapper, mask)))
    return routes
