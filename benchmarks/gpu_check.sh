#!/usr/bin/env bash
# The GPU check: memel on one CUDA GPU in under 8 minutes, one table at the end.
#
#   bash benchmarks/gpu_check.sh                 (from the repository root)
#
# Steps, each under its own time bound and all under GPU_CHECK_BUDGET_S (default 420 s):
#   setup     install the wheels in .whl/ (if any) into /tmp/site; PYTHONPATH=/tmp/site:platform
#   tests     pytest -m gpu on every test file that holds gpu-marked tests
#   deepspeed a 1-process DeepSpeed ZeRO-2 bf16 run of pythia-70m with rd (benchmarks/gpu_deepspeed.py), no Ray
#   overhead  memel bench overhead --device cuda (none/original/rd/l2e) on pythia-70m, then pythia-160m
#   kernels   memel bench inhibition --device cuda, --kernel eager, then (after pythia-160m) --kernel compiled
# Without a CUDA GPU the CUDA steps are skipped with a line saying so (the tests still collect and
# skip themselves); GPU_CHECK_CPU_SMOKE=1 runs them instead at tiny sizes on the CPU, to try the
# script out. Raw logs, one JSON per step, results.tsv, results.json and table.txt go to $OUT if set,
# else to a new temp dir. Exit status: 0 if no step failed, else 1.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
OUT="${OUT:-$(mktemp -d -t memel-gpu-check-XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
START_S=$(date +%s)
RESULTS="$OUT/results.tsv"
printf 'step\tstatus\tseconds\tnote\n' >"$RESULTS"
export COLUMNS=200 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

say() { printf '[gpu-check %4ss] %s\n' "$(($(date +%s) - START_S))" "$*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; say "$1: $2 ($3 s) $4"; }
left_s() { echo $((BUDGET_S - ($(date +%s) - START_S))); }

# run_step NAME BOUND_S COMMAND...: runs COMMAND under min(BOUND_S, budget left - 10 s), its output
# to $OUT/NAME.log; records ok / FAIL (rc) / TIMEOUT / SKIP (no budget left).
run_step() {
  local name=$1 bound=$2
  shift 2
  local left limit began rc
  left=$(left_s)
  limit=$((left - 10 < bound ? left - 10 : bound))
  if ((limit < 15)); then
    record "$name" SKIP 0 "out of the time budget (${BUDGET_S} s)"
    return 0
  fi
  say "$name: start (bound ${limit} s): $*"
  began=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - began))
  tail -n 25 "$OUT/$name.log" | sed "s/^/    [$name] /"
  if ((rc == 0)); then
    record "$name" ok "$took" ""
  elif ((rc == 124 || rc == 137)); then
    record "$name" TIMEOUT "$took" "stopped at its ${limit} s bound; see $name.log"
  else
    record "$name" FAIL "$took" "exit $rc; see $name.log"
  fi
  return 0
}

# --- setup -------------------------------------------------------------------------------------
began=$(date +%s)
export PYTHONPATH="$ROOT/platform${PYTHONPATH:+:$PYTHONPATH}"
shopt -s nullglob
wheels=("$ROOT"/.whl/*.whl)
note="no wheels in .whl/"
if ((${#wheels[@]})) && "$PY" -m pip --version >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    >"$OUT/setup.log" 2>&1; then
    export PYTHONPATH="$SITE:$PYTHONPATH"
    note="${#wheels[@]} wheels -> $SITE"
  else
    note="wheels NOT installed (see setup.log); using the packages already importable"
  fi
elif ((${#wheels[@]})); then  # no pip: a wheel is a zip archive of what goes on the path
  if "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "${wheels[@]}" \
    >"$OUT/setup.log" 2>&1; then
    export PYTHONPATH="$SITE:$PYTHONPATH"
    note="${#wheels[@]} wheels unzipped -> $SITE (no pip)"
  else
    note="wheels NOT unzipped (see setup.log); using the packages already importable"
  fi
fi
"$PY" - "$OUT/environment.json" >>"$OUT/setup.log" 2>&1 <<'EOF'
import importlib, json, platform, sys
import torch
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(),
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for name in ("memel", "deepspeed", "pydantic", "triton", "ray"):
    try:
        module = importlib.import_module(name)
        env[name] = getattr(module, "__version__", "?")
    except Exception as error:  # noqa: BLE001
        env[name] = f"missing ({type(error).__name__})"
with open(sys.argv[1], "w") as file:  # a file: deepspeed prints to stdout on import
    file.write(json.dumps(env) + "\n")
EOF
if [[ -s "$OUT/environment.json" ]] && "$PY" -c 'import memel, pydantic, typer, rich' 2>>"$OUT/setup.log"; then
  record setup ok $(($(date +%s) - began)) "$note; environment.json: $(tr -d '\n' <"$OUT/environment.json")"
else
  record setup FAIL $(($(date +%s) - began)) "$note; memel does not import: see setup.log"
fi
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if ((CUDA)); then
  DEVICE=cuda
  export DS_ACCELERATOR=cuda
elif [[ "$SMOKE" == 1 ]]; then
  DEVICE=cpu
  say "no CUDA GPU: GPU_CHECK_CPU_SMOKE=1, so the CUDA steps run at tiny sizes on the CPU (their figures mean nothing)"
else
  DEVICE=
fi
cuda_step() {  # cuda_step NAME BOUND_S COMMAND...: run_step, or SKIP with the reason where there is no GPU
  if [[ -z "$DEVICE" ]]; then
    record "$1" SKIP 0 "no CUDA GPU visible to torch (GPU_CHECK_CPU_SMOKE=1 runs it on the CPU at tiny sizes)"
  else
    run_step "$@"
  fi
}

# --- gpu-marked tests (conftest is not loaded: its server fixtures need packages a GPU box may lack) ---
mapfile -t gpu_tests < <(grep -l "pytest.mark.gpu" "$ROOT"/tests/test_*.py)
run_step tests 180 "$PY" -m pytest -q -p no:cacheprovider --noconftest -m gpu -W ignore::pytest.PytestConfigWarning \
  --junitxml="$OUT/tests.xml" "${gpu_tests[@]}"

# --- DeepSpeed ZeRO-2 bf16, one process, no Ray --------------------------------------------------
if [[ "$DEVICE" == cpu ]]; then
  ds_args=(--device cpu --precision fp32 --model byte-0.2m --steps 15 --batch 2 --seq 32)
else
  ds_args=(--device cuda --precision bf16 --model pythia-70m --steps 300 --batch 8 --seq 512)
fi
cuda_step deepspeed 150 "$PY" "$ROOT/benchmarks/gpu_deepspeed.py" --zero 2 "${ds_args[@]}" --out "$OUT/deepspeed.json"

# --- memel bench overhead / inhibition on the device ----------------------------------------------
overhead() {  # overhead MODEL BOUND_S
  local size=(--batch 8 --seq 512 --rounds 30)
  [[ "$DEVICE" == cpu ]] && size=(--batch 2 --seq 16 --rounds 2)
  local model=$1
  [[ "$DEVICE" == cpu ]] && model=byte-0.2m
  cuda_step "overhead-$1" "$2" "$PY" -m memel bench overhead --device "${DEVICE:-cuda}" --model "$model" "${size[@]}" \
    --variant none --variant original --variant rd --variant l2e --json "$OUT/overhead-$1.json"
}
kernels() {  # kernels KERNEL BOUND_S: memel bench inhibition for one kernel (compiled last: its compiles take longest)
  local size=(--repeats 9)
  [[ "$DEVICE" == cpu ]] && size=(--batch 2 --seq 8 --hidden 64 --top-n 1 --top-n 10 --repeats 2)
  cuda_step "kernels-$1" "$2" "$PY" -m memel bench inhibition --device "${DEVICE:-cuda}" --kernel "$1" "${size[@]}" \
    --json "$OUT/kernels-$1.json"
}
overhead pythia-70m 100
kernels eager 90
overhead pythia-160m 100
kernels compiled 180

# --- the table ------------------------------------------------------------------------------------
say "total $(($(date +%s) - START_S)) s; logs and results in $OUT"
"$PY" "$ROOT/benchmarks/gpu_check_table.py" "$OUT" | tee "$OUT/table.txt" || column -t -s $'\t' "$RESULTS"
status=0
grep -qE $'\t(FAIL|TIMEOUT)\t' "$RESULTS" && status=1
# what comes back from a lent machine is a few files: the table, the results, one archive of the rest
(cd "$OUT" && tar -czf logs.tar.gz --exclude=logs.tar.gz --exclude=table.txt --exclude=results.json ./* \
  && find . -maxdepth 1 -type f ! -name logs.tar.gz ! -name table.txt ! -name results.json -delete) || true
exit "$status"
