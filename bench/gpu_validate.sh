#!/usr/bin/env bash
# GPU validation: the one command a machine with a CUDA GPU runs.
#
#   bench/gpu_validate.sh                 # all stages: build test quick full
#   bench/gpu_validate.sh build test      # some stages, in the order given
#
# Stages (each bounded by STAGE_TIMEOUT seconds, default 480, so each fits 8 minutes):
#   build  build the CUDA extension (SLSDEEP_KERNELS_FORCE_CUDA=1: fail rather than skip it)
#   test   the GPU tests: compiled Triton and CUDA backends against the reference, TF32 off
#   quick  the benchmarks' forward+backward pass only, fewer rounds
#   full   every benchmark
# Every stage records what it measured in bench/results/<date>-<gpu>.json (RESULTS to override)
# right after it ends, so a later stage that fails or hangs loses nothing. Exit status: non-zero
# when any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test quick full)
timeout_s=${STAGE_TIMEOUT:-480}
python=${PYTHON:-python}
gpu=$("$python" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu")' | tr -cs 'A-Za-z0-9._-' '-' | sed 's/-$//')
results=${RESULTS:-bench/results/$(date -u +%F)-$gpu.json}
logs=$(mktemp -d)
status=0

run_stage() {  # run_stage NAME [record options...] -- COMMAND...
  local name=$1; shift
  local options=()
  while [ "$1" != "--" ]; do options+=("$1"); shift; done
  shift
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$timeout_s" "$@" 2>&1 | tee "$logs/$name.log"
  local rc=${PIPESTATUS[0]}
  "$python" bench/results.py record "$results" --stage "$name" --rc "$rc" --seconds $((SECONDS - start)) \
    --log "$logs/$name.log" "${options[@]}"
  echo "=== $name: exit $rc, $((SECONDS - start)) s -> $results"
  [ "$rc" -eq 0 ] || status=1
}

for stage in "${stages[@]}"; do
  case $stage in
    build)
      run_stage build -- env SLSDEEP_KERNELS_FORCE_CUDA=1 "$python" -m pip install --no-build-isolation --no-deps -e . ;;
    test)
      run_stage test --junit-xml "$logs/test.xml" -- \
        "$python" -m pytest tests -q -m gpu -p no:cacheprovider --junitxml="$logs/test.xml" ;;
    quick)
      run_stage quick_bench --benchmark-json "$logs/quick.json" -- env SLSDEEP_BENCH_QUICK=1 \
        "$python" -m pytest bench -q --benchmark-only -p no:cacheprovider --benchmark-json="$logs/quick.json" ;;
    full)
      run_stage full_bench --benchmark-json "$logs/full.json" -- \
        "$python" -m pytest bench -q --benchmark-only -p no:cacheprovider --benchmark-json="$logs/full.json" ;;
    *)
      echo "unknown stage '$stage' (expected build, test, quick, full)" >&2; exit 2 ;;
  esac
done
echo "results: $results"
exit $status
