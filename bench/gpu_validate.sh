#!/usr/bin/env bash
# GPU validation: the one command a machine with a CUDA GPU runs, planned to fit two calls of the
# device machine (one H200, 16 cores, bare at every call): call 1 within 8 minutes, call 2 within 5.
#
#   bench/gpu_validate.sh --call 1 [--out DIR] [--save-cache]   # build, GPU tests, memcheck, quick bench
#   bench/gpu_validate.sh --call 2 [--out DIR] [--restore FILE] # torch.compile baselines, full bench
#   bench/gpu_validate.sh [STAGE ...]                           # these stages (none: every stage), no call budget
#   bench/gpu_validate.sh --dry-run [--call 1|2] [--out DIR]    # no GPU: every stage's plumbing, quick stand-ins
#   bench/gpu_validate.sh --plan [--call 1|2]                   # print the plan and exit
#
# Call 1: build alongside precompile (both CPU-bound; the Triton variants of the GPU tests), then
# precompile_model in the background (the benchmarks' shapes) while test_bf16, test_fp16, test_fp32
# (the GPU tests by dtype, TF32 off by tests/conftest.py), sanitize (compute-sanitizer memcheck:
# bench/sanitize_cases.py), quick and quick_cuda (benchmarks, fused vs eager only) run. Call 2:
# build alongside precompile_model (or --restore call 1's cache), compile_bench (the torch.compile
# baselines of the quick cases), full (every case, every way but compile). By name only: full_cuda,
# compile_full, compile_model. The whole model's inference baseline on a GPU is
# torch.compile(mode="max-autotune") of the unfused model (slsdeep/benchmark.py), minutes of
# autotuning per batch size, more than either call can spare: only compile_model runs it,
# at batch 16 and 64 (`bench/gpu_validate.sh compile_model`, SLSDEEP_BENCH_QUICK=1 for batch 64 only:
# plain PyTorch, no build needed; the fused and eager figures come from quick and full, the three
# ways of a case meet in one table row); compile_bench and compile_full run every other
# compile baseline, in the default mode (SLSDEEP_BENCH_COMPILE_MODE=default).
#
# Each stage runs under its own time limit (the plan prints them; CAP_<stage>=S overrides one):
# 10 s before it pytest gets SIGINT (it still writes its junit XML; the plugin's event log keeps
# every outcome and benchmark anyway), KILL at it, and tests not started 15 s before it are skipped.
# Under --call the limits are also cut to what is left of the call's budget (CALL1_BUDGET=470,
# CALL2_BUDGET=290 s; the stages' limits sum within it, so only an overrun cuts, and a later stage
# first); compile_bench also takes the time the earlier stages left unused. Every stage records into the results file (bench/results/<date>-<gpu>.json;
# --results FILE to choose) as soon as it ends, with the per-op, per-backend pass table
# (bench/results.py), and the file is copied to --out DIR (default $OUT) with the logs
# (gpu-validate-logs.tgz) so that both come back from the device machine even if a later stage hangs.
# --save-cache also writes gpu-validate-cache.tgz there (the built extensions, the Triton cache, the
# results so far) and --restore FILE in the next call skips the build when the sources match and
# continues the same results file. Exit status: non-zero when any stage failed.
set -uo pipefail
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$self")/.."

# The stages, one row each: name, time cap (s), kind, what it does.
declare -A CAP KIND WHAT
while read -r stage cap kind what; do
  CAP[$stage]=$cap KIND[$stage]=$kind WHAT[$stage]=$what
done <<'STAGES'
build             120  build       CUDA + CPU extensions: pip install --no-build-isolation --no-deps -e . (FORCE_CUDA, MAX_JOBS=16)
precompile        120  precompile  compile_check --precompile --group tests: the Triton variants the GPU tests launch
precompile_model  120  precompile  compile_check --precompile --group model: the Triton variants of the benchmarks' shapes
test_bf16          40  gpu-tests   GPU tests in bf16 (pytest -m gpu --gpu-group bf16)
test_fp16          25  gpu-tests   GPU tests in fp16
test_fp32          40  gpu-tests   GPU tests in fp32 (TF32 off) and those with no dtype parameter
sanitize           90  sanitize    compute-sanitizer memcheck, every op x {triton, cuda}, forward+backward, in parallel
quick              45  bench       benchmarks: first case of each op, last pass, fused (triton) vs eager
quick_cuda         35  bench       benchmarks: the same cases, fused on the cuda backend
compile_bench      90  bench       benchmarks: torch.compile baselines of the quick cases, default mode (takes the call's slack)
full               60  bench       benchmarks: every case and pass, every way but compile (fused = triton)
full_cuda          60  bench       benchmarks: every case and pass, fused ways on the cuda backend
compile_full      240  bench       benchmarks: torch.compile baselines of every case, default mode
compile_model     540  bench       benchmarks: the whole model's torch.compile(mode="max-autotune") inference baselines, batch 16 and 64
STAGES
declare -A GROUPS_OF=([test_bf16]=bf16 [test_fp16]=fp16 [test_fp32]=fp32,other)
declare -A BACKEND_OF=([quick]=triton [quick_cuda]=cuda [full]=triton [full_cuda]=cuda)
CALL1=(build precompile precompile_model test_bf16 test_fp16 test_fp32 sanitize quick quick_cuda)
CALL2=(build precompile_model compile_bench full)
ALL=("${CALL1[@]}" compile_bench full)
ELASTIC=" compile_bench compile_full "
# A precompile stage that runs in the background (call 1's precompile_model) gets this limit instead.
declare -A BACKGROUND_CAP=([precompile]=240 [precompile_model]=240)
RESERVE=10 # seconds a call keeps for the last record and copies
GRACE=10   # a stage gets SIGINT this long before its limit (KILL at it); no new test starts 5 s before that
for stage in "${!CAP[@]}"; do
  override=CAP_$stage
  [ -z "${!override:-}" ] || CAP[$stage]=${!override}
done

usage() { sed -n '2,/^set -uo/p' "$self" | sed '$d' | sed 's/^# \{0,1\}//'; }

now() { date +%s; }

python=${PYTHON:-}
[ -n "$python" ] || { command -v python >/dev/null 2>&1 && python=python || python=python3; }

# ---------------------------------------------------------------------------------------------------
# One stage's body (run as `gpu_validate.sh --_stage NAME` under `timeout`; context in GV_* variables)
# ---------------------------------------------------------------------------------------------------
note() { echo "$*" >>"$GV_LOGS/$GV_STAGE.notes"; echo "note: $*"; }

gpu_test_files() {  # the files that hold GPU tests (collecting the rest of tests/ only costs time)
  local files
  mapfile -t files < <(grep -l 'mark\.gpu' tests/test_*.py)
  [ ${#files[@]} -gt 0 ] || files=(tests)
  printf '%s\n' "${files[@]}"
}

# A dry run's three stand-ins that import torch and Triton, started together when the run starts
# (dry_start) and picked up by their stages (dry_finish): the same commands, in parallel.
dry_command() {
  local files
  case $1 in
    tests)  # every GPU test on the CPU (all skip there) through the selection plugin
      mapfile -t files < <(gpu_test_files)
      CUDA_VISIBLE_DEVICES="" "$GV_PYTHON" -m pytest "${files[@]}" -q -m gpu -p no:cacheprovider -p bench.results \
        --gpu-group bf16,fp16,fp32,other --gpu-selection "$GV_LOGS/dry-all.selection.json" --junitxml="$GV_LOGS/dry-all.xml" ;;
    sanitize) "$GV_PYTHON" bench/sanitize_cases.py --dry-run --json "$GV_LOGS/dry-sanitize.json" ;;
    quick)  # the real benchmark ids through the way filter (listing the model's cases builds no model)
      env SLSDEEP_BENCH_QUICK=1 SLSDEEP_BENCH_WAYS=fused,eager SLSDEEP_KERNELS_BACKEND=triton CUDA_VISIBLE_DEVICES="" \
        "$GV_PYTHON" -m pytest bench/test_bench_ops.py bench/test_bench_model.py bench/test_bench_encoder.py --collect-only -q \
        -p no:cacheprovider -p bench.results ;;
  esac
}
dry_start() { (dry_command "$1" >"$GV_LOGS/dry-$1.out" 2>&1; echo $? >"$GV_LOGS/dry-$1.rc") & }
dry_finish() {  # dry_finish NAME: its output, and its exit status
  [ -f "$GV_LOGS/dry-$1.started" ] || dry_start "$1"
  while [ ! -f "$GV_LOGS/dry-$1.rc" ]; do sleep 0.2; done
  cat "$GV_LOGS/dry-$1.out"
  return "$(cat "$GV_LOGS/dry-$1.rc")"
}

stage_body() {
  local name=$1 py=$GV_PYTHON f=$GV_LOGS/$1
  export GV_STAGE=$name
  case $name in
    build)
      if [ "$GV_DRY" = 1 ]; then
        echo "dry run: would run: SLSDEEP_KERNELS_FORCE_CUDA=1 MAX_JOBS=$GV_JOBS $py -m pip install --no-build-isolation --no-deps -e ."
        ls setup.py pyproject.toml csrc/cuda/*.cu csrc/cuda_bind/*.cpp csrc/cpu/*.cpp || exit 1
        "$py" -m pip --version || exit 1
        if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then echo "nvcc: $(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
        else echo "nvcc: not here (the GPU run builds with /usr/local/cuda/bin/nvcc)"; fi
        [ -z "$GV_RESTORED" ] || note "dry run: the cache's extensions match these sources: the GPU run restores them instead of building"
        exit 0
      fi
      if [ -n "$GV_RESTORED" ]; then
        note "restored the extensions from the cache (built from these sources): no build"
      else
        SLSDEEP_KERNELS_FORCE_CUDA=1 MAX_JOBS=$GV_JOBS "$py" -m pip install --no-build-isolation --no-deps -e . || exit $?
      fi
      exec "$py" -c 'import slsdeep_kernels as s; print("available backends:", s.available_backends())' ;;
    precompile | precompile_model)
      local module commands
      module=$(ls slsdeep_kernels/compile_check.py slsdeep_kernels/compile_check/__main__.py 2>/dev/null | head -1)
      if [ "$name" = precompile ]; then  # what the GPU tests launch
        commands=("$py -m slsdeep_kernels.compile_check --precompile --group tests --jobs $GV_JOBS")
      else  # the benchmarks' shapes
        commands=("$py -m slsdeep_kernels.compile_check --precompile --group model --jobs $GV_MODEL_JOBS")
      fi
      if [ -z "$module" ]; then
        if [ "$GV_DRY" = 1 ]; then
          note "STUB: slsdeep_kernels.compile_check is not in this tree: a GPU run's $name fails and the tests JIT-compile (on pytest-xdist workers where installed)"
          exit 0
        fi
        echo "slsdeep_kernels.compile_check is missing: nothing precompiled (the tests compile as they go)"
        exit 127
      fi
      if [ "$GV_DRY" = 1 ]; then
        for option in --precompile --jobs --group; do
          grep -rq -- "\"$option\"" "$(dirname "$module")" || { echo "$module has no $option option"; exit 1; }
        done
        printf 'dry run: would run: %s\n' "${commands[@]}"
        echo "(TRITON_CACHE_DIR=$TRITON_CACHE_DIR)"
        exit 0
      fi
      local command rc=0
      for command in "${commands[@]}"; do
        echo "+ $command"
        $command || rc=$?
      done
      exit $rc ;;
    test_*)
      local groups=${GROUPS_OF[$name]} files
      mapfile -t files < <(gpu_test_files)
      if [ "$GV_DRY" = 1 ]; then
        # One CPU run of every GPU test (all skip without a GPU) with the selection plugin; each test
        # stage's stand-in is its share of that run: the real ids, groups and junit parsing.
        dry_finish tests || exit $?
        exec "$py" bench/results.py dry-split "$GV_LOGS/dry-all.xml" "$GV_LOGS/dry-all.selection.json" \
          --groups "$groups" --junit-out "$f.xml" --selection-out "$f.selection.json"
      fi
      local workers=()
      if [ "$(cat "$GV_LOGS/precompile.rc" 2>/dev/null || echo 0)" != 0 ] && "$py" -c 'import xdist' 2>/dev/null; then
        workers=(-n "${TEST_WORKERS:-8}")
        note "precompile failed: the tests run on ${TEST_WORKERS:-8} pytest-xdist workers so that their JIT compiles overlap"
      fi
      exec env PYTHONUNBUFFERED=1 "$py" -m pytest "${files[@]}" -q -m gpu -p no:cacheprovider -p bench.results \
        --gpu-group "$groups" --gpu-selection "$f.selection.json" --gpu-log "$f.events.jsonl" \
        --gpu-deadline "$GV_DEADLINE" --junitxml="$f.xml" -rfEs --tb=short "${workers[@]}" ;;
    sanitize)
      if [ "$GV_DRY" = 1 ]; then
        dry_finish sanitize
        local rc=$?
        cp "$GV_LOGS/dry-sanitize.json" "$f.sanitize.json" 2>/dev/null
        exit $rc
      fi
      exec "$py" bench/sanitize_cases.py --run --out-dir "$GV_LOGS" --timeout $((GV_DEADLINE - $(now))) --json "$f.sanitize.json" ;;
    quick | quick_cuda | compile_bench | full | full_cuda | compile_full | compile_model)
      local envs files=(bench/test_bench_ops.py bench/test_bench_model.py bench/test_bench_encoder.py)
      case $name in
        quick) envs=(SLSDEEP_BENCH_QUICK=1 SLSDEEP_BENCH_WAYS=fused,eager SLSDEEP_KERNELS_BACKEND=triton) ;;
        quick_cuda) envs=(SLSDEEP_BENCH_QUICK=1 SLSDEEP_BENCH_WAYS=fused SLSDEEP_KERNELS_BACKEND=cuda) ;;
        compile_bench) envs=(SLSDEEP_BENCH_QUICK=1 SLSDEEP_BENCH_WAYS=compile SLSDEEP_BENCH_COMPILE_MODE=default) ;;
        full) envs=(SLSDEEP_BENCH_WAYS=-compile SLSDEEP_KERNELS_BACKEND=triton) ;;
        full_cuda) envs=(SLSDEEP_BENCH_WAYS=fused,fused-memory-efficient SLSDEEP_KERNELS_BACKEND=cuda) ;;
        compile_full) envs=(SLSDEEP_BENCH_WAYS=compile SLSDEEP_BENCH_COMPILE_MODE=default) ;;
        compile_model) envs=(SLSDEEP_BENCH_WAYS=compile SLSDEEP_BENCH_COMPILE_MODE=max-autotune) files=(bench/test_bench_model.py) ;;
      esac
      if [ "$GV_DRY" = 1 ]; then
        ls "${files[@]}" || exit 1
        if [ "$name" = quick ]; then dry_finish quick; exit $?; fi
        echo "dry run: would run: env ${envs[*]} $py -m pytest ${files[*]} -q --benchmark-only -p bench.results ..."
        exit 0
      fi
      exec env "${envs[@]}" PYTHONUNBUFFERED=1 "$py" -m pytest "${files[@]}" -q --benchmark-only -p no:cacheprovider \
        -p bench.results --gpu-log "$f.events.jsonl" --gpu-deadline "$GV_DEADLINE" --benchmark-json="$f.bench.json" \
        --junitxml="$f.xml" -rfEs --tb=short ;;
    *) echo "unknown stage $name"; exit 2 ;;
  esac
}

if [ "${1:-}" = "--_stage" ]; then
  stage_body "$2"
  exit $?
fi

# ---------------------------------------------------------------------------------------------------
# Arguments, the plan
# ---------------------------------------------------------------------------------------------------
call="" dry=0 out=${OUT:-} results=${RESULTS:-} save_cache=0 restore="" plan_only=0 stages=()
while [ $# -gt 0 ]; do
  case $1 in
    --call) call=${2:-}; shift 2 ;;
    --call=*) call=${1#*=}; shift ;;
    --dry-run) dry=1; shift ;;
    --out) out=${2:-}; shift 2 ;;
    --results) results=${2:-}; shift 2 ;;
    --save-cache) save_cache=1; shift ;;
    --restore) restore=${2:-}; shift 2 ;;
    --plan) plan_only=1; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -n "${CAP[$1]:-}" ] || { echo "unknown stage '$1' (stages: ${!CAP[*]})" >&2; exit 2; }
       stages+=("$1"); shift ;;
  esac
done
budget=""
case $call in
  1) [ ${#stages[@]} -gt 0 ] || stages=("${CALL1[@]}"); budget=${CALL1_BUDGET:-470} ;;
  2) [ ${#stages[@]} -gt 0 ] || stages=("${CALL2[@]}"); budget=${CALL2_BUDGET:-290} ;;
  "") [ ${#stages[@]} -gt 0 ] || stages=("${ALL[@]}"); budget=${CALL_BUDGET:-} ;;
  *) echo "--call must be 1 or 2" >&2; exit 2 ;;
esac

# build runs alongside the first precompile stage (both CPU-bound: 16 cores); a later precompile
# stage runs in the background (on GV_MODEL_JOBS cores) until the first benchmark stage waits for it.
make_steps() {  # make_steps STAGE...: sets steps (build+X: concurrent pair; bg:X: background)
  local stage paired=""
  steps=()
  for stage in "$@"; do
    if [ "${KIND[$stage]}" = precompile ] && [[ " $* " == *" build "* ]] && [ -z "$paired" ]; then paired=$stage; fi
  done
  for stage in "$@"; do
    if [ "$stage" = build ] && [ -n "$paired" ]; then steps+=("build+$paired")
    elif [ "$stage" = "$paired" ]; then continue
    elif [ "${KIND[$stage]}" = precompile ]; then steps+=("bg:$stage")
    else steps+=("$stage")
    fi
  done
}
step_cap() {
  case $1 in
    build+*) local other=${1#build+}; echo $((CAP[build] > CAP[$other] ? CAP[build] : CAP[$other])) ;;
    bg:*) echo 0 ;;  # runs alongside the stages after it
    *) echo "${CAP[$1]}" ;;
  esac
}
later_caps() { local i sum=0; for ((i = $1 + 1; i < ${#steps[@]}; i++)); do sum=$((sum + $(step_cap "${steps[$i]}"))); done; echo $sum; }

print_plan() {  # print_plan TITLE BUDGET STAGE...
  local title=$1 limit=$2 at=0 step row='  %-16s %6s %9s  %s\n'
  shift 2
  make_steps "$@"
  echo "plan: $title${limit:+, budget $limit s}"
  printf "$row" stage "cap s" "starts by" what
  for step in "${steps[@]}"; do
    case $step in
      build+*)
        printf "$row" build "${CAP[build]}" "$at" "${WHAT[build]}"
        printf "$row" "${step#build+}" "${CAP[${step#build+}]}" "$at" "${WHAT[${step#build+}]} (alongside build)" ;;
      bg:*) printf "$row" "${step#bg:}" "${BACKGROUND_CAP[${step#bg:}]}" "$at" "${WHAT[${step#bg:}]} (in the background until a benchmark stage)" ;;
      *) printf "$row" "$step" "${CAP[$step]}" "$at" "${WHAT[$step]}" ;;
    esac
    at=$((at + $(step_cap "$step")))
  done
  echo "  total ${at} s of stage limits${limit:+ (budget of the call: $limit s, ${RESERVE} s kept for the last record)}"
}
plan() {
  if [ -n "$call" ]; then print_plan "call $call" "$budget" "${stages[@]}"
  elif [ ${#stages[@]} -eq ${#ALL[@]} ]; then
    print_plan "call 1 (bench/gpu_validate.sh --call 1)" "${CALL1_BUDGET:-470}" "${CALL1[@]}"
    print_plan "call 2 (bench/gpu_validate.sh --call 2)" "${CALL2_BUDGET:-290}" "${CALL2[@]}"
    [ "$dry" = 1 ] || echo "  (this run: every stage once, each under its own limit, no call budget)"
  else print_plan "these stages" "$budget" "${stages[@]}"
  fi
}
if [ "$plan_only" = 1 ]; then plan; exit 0; fi

# ---------------------------------------------------------------------------------------------------
# Paths: logs, the results file, --out, the cache
# ---------------------------------------------------------------------------------------------------
start_time=$(now)
call_end=""
[ -z "$budget" ] || call_end=$((start_time + budget))
[ -n "$out" ] || [ "$dry" = 0 ] || out=$(mktemp -d /tmp/gpu-validate-dry.XXXXXX)
[ -z "$out" ] || mkdir -p "$out" || { echo "cannot create --out $out" >&2; exit 2; }
logs=$(mktemp -d /tmp/gpu-validate-logs.XXXXXX)
cache=""
# The logs travel in gpu-validate-logs.tgz; a dry run leaves nothing else behind.
trap 'rm -rf ${cache:+"$cache"}; [ "$dry" = 0 ] || [ -z "$out" ] || rm -rf "$logs"' EXIT
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
slug=$("$python" bench/results.py device | tr -cs 'A-Za-z0-9._-' '-' | sed 's/-$//')
restored=""
if [ -n "$restore" ]; then
  [ -f "$restore" ] || { echo "--restore: no file $restore" >&2; exit 2; }
  cache=$(mktemp -d /tmp/gpu-validate-cache.XXXXXX)
  tar xf "$restore" -C "$cache" || { echo "--restore: cannot unpack $restore" >&2; exit 2; }
  if [ "$(cat "$cache/build.sha256" 2>/dev/null)" = "$("$python" bench/results.py source-hash --build)" ] &&
    ls "$cache"/so/_C*.so >/dev/null 2>&1; then
    restored=1
    if [ "$dry" = 0 ]; then cp "$cache"/so/_C*.so slsdeep_kernels/; fi
    echo "restore: extensions built from these sources: $(cd "$cache/so" && echo _C*.so)$([ "$dry" = 0 ] || echo " (dry run: left in $cache)")"
  else
    echo "restore: the cached extensions were built from other sources: building"
  fi
  if [ -d "$cache/triton-cache" ] && [ "$dry" = 0 ]; then
    mkdir -p "$TRITON_CACHE_DIR" && cp -rn "$cache/triton-cache/." "$TRITON_CACHE_DIR/" && echo "restore: Triton cache -> $TRITON_CACHE_DIR"
  fi
  previous=$(ls "$cache"/results/*.json 2>/dev/null | head -1)
  if [ -n "$previous" ] && [ -z "$results" ]; then
    results=$([ "$dry" = 1 ] && echo "$out" || echo bench/results)/$(basename "$previous")
    [ -f "$results" ] || cp "$previous" "$results"
    echo "restore: continuing $(basename "$previous")"
  fi
fi
if [ -z "$results" ]; then
  # A dry run never writes into bench/results (it only checks that it could).
  if [ "$dry" = 1 ]; then results=$out/dry-run-$(date -u +%F)-$slug.json; else results=bench/results/$(date -u +%F)-$slug.json; fi
fi
mkdir -p "$(dirname "$results")" bench/results
check=$(mktemp bench/results/.writable.XXXXXX) && rm -f "$check" || { echo "bench/results is not writable" >&2; exit 2; }

plan
echo "results: $results${out:+ (copied to $out)}; logs: $logs${out:+ (copied to $out/gpu-validate-logs.tgz)}"
[ "$dry" = 0 ] || echo "DRY RUN: every stage's plumbing with quick stand-ins; nothing is built, run on a GPU or validated"
plan_args=()
for stage in "${stages[@]}"; do plan_args+=("$stage=${CAP[$stage]}"); done
"$python" bench/results.py init "$results" --call "${call:-all}" ${out:+--copy-to "$out"} --plan "${plan_args[@]}" \
  $([ "$dry" = 1 ] && echo --dry-run) || { echo "cannot write $results" >&2; exit 2; }

pack_logs() { [ -z "$out" ] || tar czf "$out/gpu-validate-logs.tgz" -C "$logs" . 2>/dev/null || true; }

# ---------------------------------------------------------------------------------------------------
# Running and recording a stage
# ---------------------------------------------------------------------------------------------------
record() {  # record NAME RC SECONDS LIMIT
  local name=$1 f=$logs/$1 args
  args=(record "$results" --stage "$name" --kind "${KIND[$name]}" --rc "$2" --seconds "$3" --budget "$4" --log "$f.log"
    --call "${call:-all}")
  [ ! -f "$f.xml" ] || args+=(--junit-xml "$f.xml")
  [ ! -f "$f.selection.json" ] || args+=(--selection "$f.selection.json")
  [ ! -f "$f.events.jsonl" ] || args+=(--events "$f.events.jsonl")
  [ ! -f "$f.bench.json" ] || args+=(--benchmark-json "$f.bench.json")
  [ ! -f "$f.sanitize.json" ] || args+=(--sanitize-json "$f.sanitize.json")
  [ -z "${BACKEND_OF[$name]:-}" ] || args+=(--backend "${BACKEND_OF[$name]}")
  [ -z "$out" ] || args+=(--copy-to "$out")
  if [ -f "$f.notes" ]; then while IFS= read -r line; do args+=(--note "$line"); done <"$f.notes"; fi
  "$python" bench/results.py "${args[@]}" || echo "!!! could not record $name into $results"
  pack_logs
}

run_stage() {  # run_stage NAME LIMIT [background]: the stage under `timeout`, logged, recorded
  local name=$1 limit=$2 background=${3:-} start rc signal=INT
  start=$(now)
  [ -z "$background" ] || signal=TERM  # a background job ignores SIGINT
  echo "=== $name (limit ${limit} s): ${WHAT[$name]}"
  # SIGINT (TERM in the background) a grace before the limit, KILL at it; no new test 5 s before SIGINT.
  # A dry run's stand-ins, slow only on a busy CPU, are never cut before 120 s (the limit is recorded).
  local grace kill_at=$limit soft deadline
  [ "$dry" = 0 ] || [ "$kill_at" -ge 120 ] || kill_at=120
  grace=$((kill_at >= 4 * GRACE ? GRACE : kill_at / 4))
  soft=$((kill_at - grace))
  deadline=$((start + (soft - 5 > kill_at / 2 ? soft - 5 : kill_at / 2)))
  if [ -n "$background" ]; then
    GV_DEADLINE=$deadline timeout -s $signal -k "$grace" "$soft" bash "$self" --_stage "$name" >"$logs/$name.log" 2>&1
    rc=$?
  else
    GV_DEADLINE=$deadline timeout -s $signal -k "$grace" "$soft" bash "$self" --_stage "$name" 2>&1 | tee "$logs/$name.log"
    rc=${PIPESTATUS[0]}
  fi
  echo "$rc" >"$logs/$name.rc"
  record "$name" "$rc" $(($(now) - start)) "$limit"
  echo "=== $name: exit $rc, $(($(now) - start)) s (limit $limit s)$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ', TIMED OUT')"
  return $((rc == 0 ? 0 : 1))
}

limit_of() {  # limit_of STEP INDEX: the step's cap, within what the call has left; an elastic stage also
  # takes the slack the earlier stages left (what is left beyond the caps of the stages after it)
  local step=$1 cap avail
  cap=$(step_cap "$step")
  case $step in bg:*) cap=${BACKGROUND_CAP[${step#bg:}]} ;; esac
  if [ -z "$call_end" ]; then echo "$cap"; return; fi
  avail=$((call_end - $(now) - RESERVE))
  if [[ "$ELASTIC" == *" $step "* ]] && [ $((avail - $(later_caps "$2"))) -gt "$cap" ]; then cap=$((avail - $(later_caps "$2"))); fi
  echo $((cap < avail ? cap : avail))
}

save_cache() {  # the built extensions, the Triton cache and the results so far, for the next call's --restore
  [ "$save_cache" = 1 ] && [ -n "$out" ] || return 0
  local pack cache_file
  rm -f "$out/gpu-validate-cache.tgz" "$out/gpu-validate-cache.txz"
  pack=$(mktemp -d /tmp/gpu-validate-pack.XXXXXX)
  mkdir -p "$pack/so" "$pack/results"
  cp slsdeep_kernels/_C*.so "$pack/so/" 2>/dev/null
  "$python" bench/results.py source-hash --build >"$pack/build.sha256"
  cp "$results" "$pack/results/"
  [ "$dry" = 1 ] || [ ! -d "$TRITON_CACHE_DIR" ] || cp -r "$TRITON_CACHE_DIR" "$pack/triton-cache"
  cache_file=$out/gpu-validate-cache.tgz
  tar czf "$cache_file" -C "$pack" .
  too_big() { [ "$(stat -c %s "$1")" -gt $((15 * 1024 * 1024)) ]; }  # a file of at most 16 MiB comes back
  if too_big "$cache_file" && command -v xz >/dev/null; then
    rm -f "$cache_file"
    cache_file=$out/gpu-validate-cache.txz
    tar -C "$pack" -cf - . | xz -T0 -6 >"$cache_file"
  fi
  if too_big "$cache_file"; then
    rm -rf "$pack/triton-cache" "$cache_file"
    cache_file=$out/gpu-validate-cache.tgz
    tar czf "$cache_file" -C "$pack" .
    echo "cache: the Triton cache did not fit in 15 MiB: extensions and results only"
  fi
  echo "cache: $cache_file ($(du -h "$cache_file" | cut -f1)); next call: --restore it"
  rm -rf "$pack"
}

make_steps "${stages[@]}"
export GV_PYTHON=$python GV_LOGS=$logs GV_DRY=$dry GV_RESTORED=$restored GV_JOBS=${JOBS:-16} GV_MODEL_JOBS=${MODEL_JOBS:-12}
if [ "$dry" = 1 ]; then
  for stage in "${stages[@]}"; do
    case $stage in test_*) name=tests ;; sanitize | quick) name=$stage ;; *) continue ;; esac
    [ -f "$logs/dry-$name.started" ] || { touch "$logs/dry-$name.started"; dry_start "$name"; }
  done
fi
status=0
declare -A background=()
wait_background() {
  local name
  for name in "${!background[@]}"; do
    echo "=== waiting for $name (in the background since it started)"
    wait "${background[$name]}" || status=1
    echo "--- $name, log tail:"
    tail -n 8 "$logs/$name.log"
    unset "background[$name]"
  done
}
for ((index = 0; index < ${#steps[@]}; index++)); do
  step=${steps[$index]}
  [ "${KIND[$step]:-}" != bench ] || wait_background
  limit=$(limit_of "$step" "$index")
  if [ "$limit" -lt 5 ]; then
    for name in $(echo "${step#bg:}" | tr + ' '); do
      echo "=== $name: not started, the call's budget is spent"
      echo "not started: the call's budget was spent" >"$logs/$name.notes"
      record "$name" -1 0 0
    done
    status=1
    continue
  fi
  case $step in
    build+*)
      other=${step#build+}
      GV_MODEL_JOBS=$GV_JOBS run_stage "$other" "$((CAP[$other] < limit ? CAP[$other] : limit))" background &
      pair_pid=$!
      run_stage build "$((CAP[build] < limit ? CAP[build] : limit))" || status=1
      wait "$pair_pid" || status=1
      echo "--- $other (ran alongside build), log tail:"
      tail -n 12 "$logs/$other.log"
      save_cache ;;  # the extensions at least, should the call be cut short
    bg:*)
      touch "$logs/${step#bg:}.started"
      run_stage "${step#bg:}" "$limit" background &
      background[${step#bg:}]=$! ;;
    *)
      run_stage "$step" "$limit" || status=1 ;;
  esac
done
wait_background

save_cache

echo
"$python" bench/results.py summary "$results"
echo "results: $results${out:+ (and $out/$(basename "$results"))}; $(($(now) - start_time)) s${budget:+ of a $budget s budget}"
exit $status
