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
