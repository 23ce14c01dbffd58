"""Command line: ``interpkv check [MODEL ...]`` and ``interpkv demo``."""

import argparse
import sys
from typing import List, Optional, Sequence

__all__ = ["main"]


def _table(results) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="interpkv: cached vs uncached vs HuggingFace")
    for column in ("model", "scheme", "dtype", "max |dlogit| cached-uncached", "max |dlogit| vs HF", "verdict"):
        table.add_column(column)
    for r in results:
        hf = "-" if r.max_dlogit_hf is None else f"{r.max_dlogit_hf:.2e}"
        verdict = "[green]PASS[/green]" if r.ok else "[red]FAIL[/red]"
        table.add_row(r.model, r.scheme, str(r.dtype).replace("torch.", ""), f"{r.max_dlogit:.2e}", hf, verdict)
    Console().print(table)


def _check(names: Sequence[str], dtype_name: str) -> int:
    import torch
    from rich.progress import track

    from . import zoo
    from .checks import check_zoo

    unknown = [n for n in names if n not in zoo.names()]
    if unknown:
        print(f"unknown model(s) {unknown}; zoo models: {', '.join(zoo.names())}", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
    results = []
    for name in track(list(names) or zoo.names(), description="checking"):
        results.extend(check_zoo([name], dtype=dtype))
    _table(results)
    failed = [r.model for r in results if not r.ok]
    print("verdict:", "all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 0 if not failed else 1


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``interpkv`` console script."""
    parser = argparse.ArgumentParser(prog="interpkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="cached-vs-uncached equivalence checks")
    check.add_argument("models", nargs="*", help="zoo model names (default: all)")
    check.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    check.add_argument("--html", help="write an HTML report here")
    demo = sub.add_parser("demo", help="the main job on the built-in zoo")
    demo.add_argument("--html", help="write an HTML report here")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.models, args.dtype)
    return _check([], "float32")


if __name__ == "__main__":
    sys.exit(main())
