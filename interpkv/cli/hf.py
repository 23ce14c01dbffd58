"""Old import path of :mod:`interpkv.diagnostics.hf_reference`, kept for code written against 0.2.

The HuggingFace reference is library code (the zoo's conversion check reads
it too) and lives in :mod:`interpkv.diagnostics.hf_reference`; this module only
re-exports its names. New code imports that module.
"""

from interpkv.diagnostics.hf_reference import hf_difference, hf_logits

__all__ = ["hf_logits", "hf_difference"]
