#!/usr/bin/env bash
# make gpu-check: on a CUDA machine whose python already has torch (no downloads), build mtlcore
# in place with its CUDA kernels, run the CUDA tests, the CUDA benchmarks, a subset of the tests
# under compute-sanitizer (memcheck, racecheck) and the tests on tensors of more than 2^31
# elements. CI never needs this.
#
# Every step's log and the benchmarks' JSON go to build/gpu-check/; after each step that folder
# is packed into $OUT/gpu_check.tar.gz and the one-line-per-step summary copied to
# $OUT/gpu_summary.txt (default OUT: bench/results), so a run stopped at a time limit still
# leaves what it measured, in two files. Each step has a time limit of its own (seconds below).
# STEPS="build tests bench" (say) runs only those steps, in the order of the script; a run
# without `build` uses the build an earlier run left in build/gpu-site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
LOGS=build/gpu-check
SUMMARY=$LOGS/summary.txt
STEPS=${STEPS:-build info tests bench memcheck racecheck large}
PY=${PYTHON:-python3}
rm -rf "$LOGS"
mkdir -p "$LOGS" "$OUT"
export MTLCORE_CUDA=1
export MTLCORE_CUDA_ARCHS=${MTLCORE_CUDA_ARCHS:-$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" 2>/dev/null || echo "80;90")}
export PYTHONPATH=$PWD/build/gpu-site${PYTHONPATH:+:$PYTHONPATH}
status=0

pack() {
  cp "$SUMMARY" "$OUT/gpu_summary.txt"
  tar czf "$OUT/gpu_check.tar.gz" -C "$LOGS" .
}

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME SECONDS COMMAND...: runs COMMAND (output to $LOGS/NAME.log) under a time limit,
# records its exit status and duration in the summary and packs the results.
step() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  echo "== $name (at most ${limit} s) =="
  local start rc
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - start))s" | tee -a "$SUMMARY"
  tail -n 25 "$LOGS/$name.log"
  [ "$rc" -eq 0 ] || status=1
  pack
  return "$rc"
}

echo "gpu-check $(date -u +%FT%TZ) archs $MTLCORE_CUDA_ARCHS steps: $STEPS" | tee "$SUMMARY"

step build 420 $PY -m pip install --no-build-isolation --no-deps --no-index \
  --target build/gpu-site -C build-dir=build/gpu --upgrade . || {
  echo "build failed: nothing else runs"
  exit 1
}

step info 60 $PY -m mtlcore info

step tests 300 $PY -m pytest tests -q -m "cuda and not large" -p no:cacheprovider --maxfail=25

# The benchmarks write their JSON under $OUT: here, the folder that is packed.
benchmarks() {
  export OUT=$LOGS
  local rc=0
  $PY bench/bench_optim.py --device cuda || rc=1
  for dtype in float32 float16 bfloat16; do
    $PY bench/bench_conv.py --device cuda --dtype "$dtype" --no-compile --quick || rc=1
  done
  for dtype in float32 bfloat16; do
    $PY bench/bench_loss.py --device cuda --dtype "$dtype" --quick || rc=1
    $PY bench/bench_pool.py --device cuda --dtype "$dtype" --no-compile --quick || rc=1
  done
  $PY bench/bench_train.py --device cuda --quick || rc=1
  return $rc
}
export -f benchmarks
export LOGS PY
step bench 300 bash -c benchmarks

# compute-sanitizer over small CUDA tests that reach every op, forward and backward (memcheck:
# out-of-bounds and misaligned accesses; racecheck: shared-memory hazards). Only our kernels are
# instrumented (their names contain "mtlcore"), and torch's caching allocator is off so that each
# tensor is an allocation of its own and an access past its end is caught. The large, opcheck and
# compile tests stay out: instrumented, they would take far too long.
SANITIZER=$(command -v compute-sanitizer || true)
if [ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  SANITIZER=/usr/local/cuda/bin/compute-sanitizer
fi
SANITIZED_TESTS="(deterministic or kernel_shapes_and_same_padding or empty_batch \
or tasks_without_labels or found_inf_skips or non_dense_and_mixed) and not opcheck and not compile"
for tool in memcheck racecheck; do
  if [ -z "$SANITIZER" ]; then
    wanted "$tool" && echo "$tool skipped: compute-sanitizer not found" | tee -a "$SUMMARY"
    continue
  fi
  step "$tool" 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
    --error-exitcode 1 --kernel-name kns=mtlcore \
    $PY -m pytest tests -q -m "cuda and not large" -k "$SANITIZED_TESTS" -p no:cacheprovider
done

step large 240 $PY -m pytest tests -q -m "cuda and large" -p no:cacheprovider

pack
exit $status
