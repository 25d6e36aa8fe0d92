#!/usr/bin/env bash
# Mutation testing of the inhibition core and the statistics sink with mutmut (docs/testing.md).
# Not part of CI. Usage: tools/mutation.sh run [MUTANT_GLOB]; tools/mutation.sh results; tools/mutation.sh show NAME
# mutmut names modules after their path and strips only a leading "src/", so it runs from
# build/mutation/ where src -> platform/ (the package then keeps its import name, memel).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work="$root/build/mutation"
mkdir -p "$work"
ln -sfn ../../platform "$work/src"
ln -sfn ../../tests "$work/tests"
ln -sfn ../../pyproject.toml "$work/pyproject.toml"
cd "$work"
unset PYTHONPATH  # the mutated copy (mutants/src) must be the memel that the tests import
# A private build of the native kernel: its source path under mutants/ differs from the checkout's.
export TORCH_EXTENSIONS_DIR="$work/torch_extensions"
exec nice -n 15 python -m mutmut "$@"
