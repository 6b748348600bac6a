#!/usr/bin/env bash
# make gpu-check: on a CUDA machine whose python already has torch (no downloads), build mtlcore
# in place with its CUDA kernels, run the CUDA tests, a subset of them under compute-sanitizer
# (memcheck, racecheck), the tests on tensors of more than 2^31 elements and the CUDA benchmarks,
# and write logs and results under $OUT (default bench/results). CI never needs this.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
export OUT
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MTLCORE_CUDA=1
export MTLCORE_CUDA_ARCHS=${MTLCORE_CUDA_ARCHS:-$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" 2>/dev/null || echo "80;90")}
status=0

echo "== build (archs $MTLCORE_CUDA_ARCHS) =="
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps --no-index --quiet \
    --target build/gpu-site -C build-dir=build/gpu --upgrade . >"$OUT/gpu_build.log" 2>&1; then
  tail -50 "$OUT/gpu_build.log"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
export PYTHONPATH=$PWD/build/gpu-site${PYTHONPATH:+:$PYTHONPATH}

$PY -m mtlcore info | tee "$OUT/gpu_info.json"

echo "== CUDA tests =="
$PY -m pytest tests -q -m "cuda and not large" -p no:cacheprovider --maxfail=25 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

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
if [ -n "$SANITIZER" ]; then
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool =="
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      --kernel-name kns=mtlcore \
      $PY -m pytest tests -q -m "cuda and not large" -k "$SANITIZED_TESTS" -p no:cacheprovider \
      2>&1 | tee "$OUT/gpu_$tool.log" | tail -15
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
else
  echo "== compute-sanitizer not found (PATH, /usr/local/cuda/bin): memcheck and racecheck skipped =="
fi

echo "== CUDA tests on more than 2^31 elements =="
$PY -m pytest tests -q -m "cuda and large" -p no:cacheprovider 2>&1 \
  | tee "$OUT/gpu_large.log" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== CUDA benchmarks =="
$PY bench/bench_optim.py --device cuda 2>&1 | tee "$OUT/gpu_bench_optim.log" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for dtype in float32 float16 bfloat16; do
  $PY bench/bench_conv.py --device cuda --dtype "$dtype" --no-compile --quick 2>&1 \
    | tee "$OUT/gpu_bench_conv_$dtype.log" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
for dtype in float32 bfloat16; do
  $PY bench/bench_loss.py --device cuda --dtype "$dtype" --quick 2>&1 \
    | tee "$OUT/gpu_bench_loss_$dtype.log" | tail -6
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
for dtype in float32 bfloat16; do
  $PY bench/bench_pool.py --device cuda --dtype "$dtype" --no-compile --quick 2>&1 \
    | tee "$OUT/gpu_bench_pool_$dtype.log" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
$PY bench/bench_train.py --device cuda --quick 2>&1 | tee "$OUT/gpu_bench_train.log" | tail -4
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
