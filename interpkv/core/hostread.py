"""Host reads: where interpkv may look at tensor values from Python, and where it must not.

Every ``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``, ``nonzero`` or
boolean-mask index on a tensor that lives on an accelerator makes the host
wait until the device has computed it (a device-to-host sync), which drains
the launch queue. A cached decode step through :func:`interpkv.forward`
makes none (``benchmarks/opcount.py`` counts them; ``tests/integration/
test_syncs.py`` holds the count at zero and runs the step on the ``meta``
device, where any such read fails). The rules:

- Bookkeeping the host needs (``n_ctx`` limits, capacity, window lengths) is
  kept in the cache's own Python ints (:mod:`interpkv.cache.bound`),
  never read back from position tensors.
- The caller's own inputs are checked (token ids in range, masks of 0/1)
  where they are: a CPU tensor is read on the host with :func:`host_array`
  (no device involved, no dispatcher op), whatever device the model is on.
  Inputs already on an accelerator are checked with one read when the call
  has several positions (a prompt: once per call), and not at all for a
  single-position step, where the check would be the step's only sync
  (an out-of-range id there fails in the embedding, as in HF and TransformerLens).
"""

from typing import Optional

import numpy as np
from torch import Tensor

__all__ = ["host_array", "checks_on_device"]


def host_array(tensor: Tensor) -> Optional[np.ndarray]:
    """The values of a CPU tensor as a NumPy array (shared memory), None for any other device.

    >>> import torch
    >>> host_array(torch.tensor([1, 2])).tolist(), host_array(torch.ones(1, device="meta"))
    ([1, 2], None)
    """
    if tensor.device.type != "cpu":
        return None
    try:
        return (tensor.detach() if tensor.requires_grad else tensor).numpy()
    except (TypeError, RuntimeError):  # a dtype NumPy lacks (bfloat16), a conjugate view...
        return None


def checks_on_device(tensor: Tensor) -> bool:
    """Whether an input on an accelerator is worth one host read to check (several positions)."""
    return tensor.ndim >= 2 and tensor.shape[1] > 1
