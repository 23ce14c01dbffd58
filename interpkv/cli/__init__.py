"""The ``interpkv`` command line: checks, the demo and its HTML report.

- :mod:`~interpkv.cli.app`: argument parsing and the ``check`` / ``demo`` commands.
- :mod:`~interpkv.cli.checks`: the equivalence checks, fault zoo and greedy pairs.
- :mod:`~interpkv.cli.html`: the self-contained HTML report.
- :mod:`~interpkv.cli.hf`: the HuggingFace reference logits (:func:`~interpkv.cli.hf.hf_logits`).
"""

from interpkv.cli.app import main

__all__ = ["main"]
