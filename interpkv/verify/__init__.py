"""Verification: the equivalence checks, the fault zoo, and the other implementations audited.

What ``interpkv check`` and ``interpkv demo`` run, as a library (the CLI in
:mod:`interpkv.cli` only parses arguments and prints; notebooks call these
directly):

- :mod:`~interpkv.verify.checks`: cached vs uncached vs the HF twin per model
  (:func:`~interpkv.verify.checks.check_model`, ``check_zoo``, ``check_hf_dir``),
  the bug zoo localized by :func:`interpkv.compare` (``check_fault``,
  ``bug_zoo``), greedy generation pairs (``greedy_pair``, ``check_generation``).
- :mod:`~interpkv.verify.engine_checks`: the same checks for TransformerLens's
  and HF's own caches (``check --engine``), and the engine faults localized.
- :mod:`~interpkv.verify.engine_faults`: corruption planted in any engine's
  cache update; the one place that monkeypatches TransformerLens's and HF's
  cache classes.
- :mod:`~interpkv.verify.findings`: TransformerLens 3.x cache bugs,
  demonstrated and checked against HF.
- :mod:`~interpkv.verify.models`: the zoo models of one run, each built once.
- :mod:`~interpkv.verify.saved_cache`: a saved cache loaded into a model
  (``check --cache``): what wrote it against what the model runs under now,
  and its continuation against an uncached run.
- :mod:`~interpkv.verify.verdicts`: the one verdict vocabulary (PASS / FAIL / KNOWN UPSTREAM)
  and the one count every report prints.

The HuggingFace reference logits these compare against are
:mod:`interpkv.diagnostics.hf_reference`.
"""
