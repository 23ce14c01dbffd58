"""The ``interpkv`` command line: argument parsing, console tables and the HTML report.

Everything the commands compute is library code in :mod:`interpkv.verify`;
nothing outside this package imports it.

- :mod:`~interpkv.cli.app`: argument parsing, the ``check`` / ``demo`` commands and their console tables.
- :mod:`~interpkv.cli.html`: the self-contained HTML report.
- :mod:`~interpkv.cli.inputs`: one-line errors for bad paths and models.
- :mod:`~interpkv.cli.runtime`: a run's torch threads (one for the tiny zoo).
- :mod:`~interpkv.cli.checks` and :mod:`~interpkv.cli.hf`: old import paths of
  :mod:`interpkv.verify.checks` and :mod:`interpkv.diagnostics.hf_reference`
  (re-exports only, for notebooks written against 0.2).
"""

from interpkv.cli.app import main

__all__ = ["main"]
