"""Recheck mutmut mutants with chosen tests and no CPU limit (docs/testing.md).

mutmut gives each mutant a CPU budget and runs the tests that cover it in no set order, so a
mutant that a fast test kills can still time out behind slow tests. This runs the given tests
(``pytest -x``, in the given order) once per mutant, with the mutant switched on, and prints
``killed`` or ``survived`` for each. Run it after ``tools/mutation.sh run`` (which writes
build/mutation/mutants/), e.g.:

    python tools/mutation_recheck.py --tests tests/test_inhibition_statistics.py -- NAME [NAME ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "build" / "mutation" / "mutants"


def recheck(mutant: str, tests: list[str], timeout_s: float) -> str:
    """``killed`` when the tests fail with the mutant switched on, else ``survived``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        MUTANT_UNDER_TEST=mutant,
        PYTHONPATH=str(MUTANTS / "src"),
        TORCH_EXTENSIONS_DIR=str(ROOT / "build" / "mutation" / "torch_extensions"),
    )
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--rootdir=.", *tests]
    try:
        result = subprocess.run(command, cwd=MUTANTS, env=env, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout"
    if result.returncode == 0:
        return "survived"
    if result.returncode == 1:
        return "killed"
    return f"error (pytest exit {result.returncode})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", nargs="+", required=True, help="test files or node ids, run in this order")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    parser.add_argument("mutants", nargs="+", help="full mutant names, as `tools/mutation.sh results` lists them")
    args = parser.parse_args()
    for mutant in args.mutants:
        print(f"{mutant}: {recheck(mutant, args.tests, args.timeout)}", flush=True)


if __name__ == "__main__":
    main()
