"""Run the benchmark scripts in this folder (``make bench``).

    python benchmarks/run.py                   # everything (~15 min on 2 cores)
    python benchmarks/run.py --quick           # decode: toy + smaller prompts, 1 repeat; others reduced
    python benchmarks/run.py --only decode compare
    python benchmarks/run.py --only decode -- --only gpt2:512   # extra arguments for the scripts
"""

import argparse
import pathlib
import subprocess
import sys

here = pathlib.Path(__file__).parent
# Defaults that keep the whole run near 15 minutes (a full TransformerLens patching sweep alone is ~30).
DEFAULT = {"bench_patching.py": ["--tl-sample", "16"]}
QUICK = {
    "bench_decode.py": ["--quick"],
    "bench_compare.py": ["--repeats", "1"],
    "bench_patching.py": ["--prefix", "64", "--suffix", "8"],
    "bench_persist.py": ["--repeats", "3"],
}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="smaller settings for every script")
parser.add_argument("--only", nargs="+", help="script names without bench_ / .py, e.g. decode compare")
parser.add_argument("extra", nargs="*", help="arguments passed to every selected script (after --)")
args = parser.parse_args()

scripts = sorted(here.glob("bench_*.py"))
if args.only:
    scripts = [s for s in scripts if s.stem[len("bench_"):] in args.only]
status = 0
for script in scripts:
    print(f"\n=== {script.name}", flush=True)
    extra = QUICK.get(script.name, []) if args.quick else DEFAULT.get(script.name, [])
    status |= subprocess.call([sys.executable, str(script), *extra, *args.extra])
sys.exit(status)
