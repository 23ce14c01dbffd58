"""Old import path of :mod:`interpkv.verify.checks`, kept for notebooks written against 0.2.

The checks are library code and live in :mod:`interpkv.verify.checks`; this
module only re-exports its names (``from interpkv.cli.checks import check_zoo``
keeps working). New code imports :mod:`interpkv.verify.checks`.
"""

from interpkv.diagnostics.hf_reference import hf_logits
from interpkv.verify.checks import (
    BUG_ZOO,
    CACHED_TOL,
    COMPARE_TOL,
    HF_TOL,
    CheckResult,
    FaultResult,
    GenerationResult,
    bug_zoo,
    check_fault,
    check_generation,
    check_hf_dir,
    check_model,
    check_zoo,
    greedy_pair,
    hf_difference,
)

__all__ = [
    "CheckResult",
    "FaultResult",
    "check_model",
    "check_zoo",
    "check_hf_dir",
    "hf_difference",
    "hf_logits",
    "check_fault",
    "bug_zoo",
    "BUG_ZOO",
    "GenerationResult",
    "greedy_pair",
    "check_generation",
    "CACHED_TOL",
    "HF_TOL",
    "COMPARE_TOL",
]
