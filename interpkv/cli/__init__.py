"""The ``interpkv`` command line: checks, the demo and its HTML report.

- :mod:`~interpkv.cli.app`: argument parsing and the ``check`` / ``demo`` commands.
- :mod:`~interpkv.cli.checks`: the equivalence checks, fault zoo and greedy pairs.
- :mod:`~interpkv.cli.html`: the self-contained HTML report.
- :mod:`~interpkv.cli.hf`: the HuggingFace reference logits (:func:`~interpkv.cli.hf.hf_logits`).
- :mod:`~interpkv.cli.engine_checks`: ``check --engine`` and the demo's "other implementations".
- :mod:`~interpkv.cli.runtime`: a run's torch threads and its zoo models, each built once.
"""

from interpkv.cli.app import main

__all__ = ["main"]
