"""Shared pytest setup.

- Never touch the network: zoo models build from configs.
- One torch thread per process: the models are tiny, so intra-op threads only
  add spin-wait overhead (15x slower per step on a loaded 2-core machine);
  `make test` runs two pytest workers instead.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)


# Hypothesis profiles for the cache-lifecycle property tests (tests/integration/
# test_lifecycle.py picks one with INTERPKV_HYPOTHESIS_PROFILE; not loaded globally,
# so other modules keep their own settings). "lifecycle-fast" is what `make test`
# runs; "lifecycle-full" (>= 200 programs per scheme) also runs under the slow marker.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "lifecycle-fast", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "lifecycle-full", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# Run-time shape checks (pyproject.toml: --jaxtyping-packages=...) preempt interpkv's own
# argument errors with a TypeCheckError. A test whose point is one of those errors (a float
# where an int goes, a tensor of the wrong rank, model=0) is marked `unchecked_shapes`: the
# checker steps aside for it, so the test sees what a user without the checker sees.
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _unchecked_shapes(request):
    if request.node.get_closest_marker("unchecked_shapes") is None:
        yield
        return
    from jaxtyping import config

    before = config.jaxtyping_disable
    config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        config.update("jaxtyping_disable", before)
