#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer: builds mpt_kernels._C with
# MPT_KERNELS_SANITIZE=address,undefined (no CUDA) in a scratch copy of this checkout, then runs the
# kernel tests against it. The tests poison outputs, so an element a kernel forgets to write fails
# there; this catches what they cannot see: reads or writes past a buffer (a tile load at an odd
# size, a vector tail), uses after free, and undefined behaviour (shifts, overflows, misaligned
# accesses). An ASan build hands out exact-size host buffers instead of pooled 2 MiB blocks
# (csrc/common/host_pool.cpp), so the red zone starts right after each kernel output.
#
#   bash tests/run_sanitized.sh                       # kernel + model tests, then the CUDA kernels on the
#                                                     # host emulator (tests/cuda_emu; ~8 min on 2 cores)
#   bash tests/run_sanitized.sh tests/test_model.py   # other test files
# Environment: PYTHON (default python3), SANITIZE_DIR (scratch directory, default a fresh temp dir).
# Exit status 0 when the tests pass and no sanitizer report was written; reports are printed.
set -uo pipefail
T0=$(date +%s)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=${SANITIZE_DIR:-$(mktemp -d /tmp/mptk_sanitize.XXXXXX)}
ASAN_LIB=$(gcc -print-file-name=libasan.so 2>/dev/null || true)
STDCXX_LIB=$(gcc -print-file-name=libstdc++.so 2>/dev/null || true)
if [ ! -e "$ASAN_LIB" ] || [ ! -e "$STDCXX_LIB" ]; then
  echo "run_sanitized: SKIPPED (gcc's libasan.so / libstdc++.so not found)"
  exit 0
fi

echo "== copy of the checkout in $WORK/src"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf -) | tar -xf - -C "$WORK/src" || exit 1
rm -f "$WORK"/src/mpt_kernels/_C*.so

echo "== build (MPT_KERNELS_SANITIZE=address,undefined, CPU only) (+$(( $(date +%s) - T0 ))s)"
(cd "$WORK/src" && MPT_KERNELS_CUDA=0 MPT_KERNELS_SANITIZE=address,undefined MPT_KERNELS_BUILD_DIR="$WORK/build" \
  "$PY" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1) || { tail -40 "$WORK/build.log"; exit 1; }

EMU=0
if [ $# -eq 0 ]; then
  EMU=1
  set -- tests/test_attention.py tests/test_layernorm.py tests/test_lion.py tests/test_loss.py tests/test_linear.py \
    tests/test_eager_paths.py \
    tests/test_memory.py tests/test_model.py tests/test_generation_review.py tests/test_fuzz_inputs.py tests/test_decode_step.py
fi
echo "== pytest under the sanitizers: $* (+$(( $(date +%s) - T0 ))s)"
rm -f "$WORK"/report.*
# Python is not instrumented: the runtime is preloaded (libstdc++ too, or ASan's __cxa_throw
# interceptor finds no real function and aborts at the first C++ exception). Leak checking is off:
# CPython keeps its interned objects to the end. Reports go to files: pytest captures stderr.
cd "$WORK/src"
LD_PRELOAD="$ASAN_LIB $STDCXX_LIB" \
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$WORK/report" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$WORK/report" \
  PYTHONPATH="$WORK/src" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "$@"
rc=$?
if [ $EMU -eq 1 ] && [ $rc -eq 0 ]; then
  # The CUDA kernels' own source on the host emulator (tests/cuda_emu), built with the same sanitizers:
  # reads or writes past a tensor from a kernel, the .cu line named (a CPU-side memcheck). One case
  # per kernel path plus the LayerNorm, loss and Lion kernels (~3.5 min on 2 cores, build included).
  echo "== CUDA kernels on the host emulator under the sanitizers (+$(( $(date +%s) - T0 ))s)"
  LD_PRELOAD="$ASAN_LIB $STDCXX_LIB" MPTK_EMU_SANITIZE=address,undefined \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$WORK/report" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$WORK/report" \
    PYTHONPATH="$WORK/src" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_emulated.py \
    -k "((each_path and bfloat16) or varlen or (cross_entropy and not float32) or bit_for_bit or misaligned or (layer_norm and (1x7 or 2x40000))) and not racecheck"
  rc=$?
fi
# ASan warns once that it does not fully support swapcontext (the emulator's fibers): not a finding.
for f in "$WORK"/report.*; do
  [ -e "$f" ] || continue
  if ! grep -v "ASan doesn't fully support makecontext/swapcontext" "$f" | grep -q .; then rm -f "$f"; fi
done
if ls "$WORK"/report.* > /dev/null 2>&1; then
  echo "== sanitizer reports"
  cat "$WORK"/report.*
  rc=1
fi
echo "run_sanitized: rc=$rc in $(( $(date +%s) - T0 ))s"
if [ $rc -eq 0 ] && [ -z "${SANITIZE_DIR:-}" ]; then rm -rf "$WORK"; fi  # kept when something failed
exit $rc
