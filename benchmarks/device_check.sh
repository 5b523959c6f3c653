#!/usr/bin/env bash
# The one script run on a lent GPU (see README: "GPU validation"). Builds for this device's
# architecture only, runs the CUDA tests, runs the benchmarks on cuda, and writes the log, JSON and
# Markdown under benchmarks/results/device.
#   bash benchmarks/device_check.sh                          # everything, within DEADLINE_S
#   ONLY="attention lion" bash benchmarks/device_check.sh    # a subset of benchmarks
#   DEADLINE_S=300 SKIP_TESTS=1 bash benchmarks/device_check.sh
# A session has about 15 minutes of device time, machine start-up included, and one command may run
# 10 minutes. So the script works against a deadline (DEADLINE_S seconds from its start, default
# 480, leaving room for a second, targeted run), in order of what a first run must return: the
# build and its ptxas report, the fast CUDA tests, the training benchmark (the acceptance rows:
# the 65,536-token 7B layer, mpt-1b MFU), compute-sanitizer's memcheck over the small CUDA tests and
# racecheck over the attention smoke tests,
# attention, Lion, LayerNorm, the loss, the 65k-token test, the model benchmark. Each stage gets at most its
# own cap and what is left before the deadline; a stage with under 20 s left is skipped and named in
# the log.
# Under the device tool ($OUT set), at most 8 files come back from $OUT: after every stage the script
# refreshes three there (device_check.log, summary.md with every benchmark table so far, and
# device_check.tar.gz with all results), so a run cut short still returns what it had.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=benchmarks/results/device
mkdir -p "$WORK"
DEST=${OUT:-}
LOG="$WORK/device_check.log"
export PYTHONUNBUFFERED=1
# Less fragmentation when a baseline fills most of the card (transformers' eager attention at mpt-1b).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-480}
T_START=$(date +%s)
exec > >(tee -a "$LOG") 2>&1

pack() {  # copy what exists so far to $OUT (no-op without the device tool)
  [ -n "$DEST" ] || return 0
  mkdir -p "$DEST"
  cp "$LOG" "$DEST/device_check.log" 2>/dev/null
  cat "$WORK"/*.md > "$DEST/summary.md" 2>/dev/null
  tar -czf "$DEST/device_check.tar.gz" -C "$WORK" . 2>/dev/null
  return 0
}
trap 'pack' EXIT
trap 'echo "device_check: terminated after $(elapsed)s"; pack; exit 143' TERM INT
elapsed() { echo $(( $(date +%s) - T_START )); }
# budget CAP: prints min(CAP, seconds left before the deadline - 5); returns 1 (stage skipped) under 20 s
budget() {
  local left=$(( DEADLINE_S - $(elapsed) - 5 ))
  if [ "$left" -lt 20 ]; then return 1; fi
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
stage() {  # stage NAME CAP CMD...: run CMD under `timeout`, log its time and exit status
  local name=$1 cap=$2 b rc t0
  shift 2
  if ! b=$(budget "$cap"); then echo "== $name: SKIPPED (deadline ${DEADLINE_S}s, $(elapsed)s used)"; return 0; fi
  echo "== $name (at most ${b}s; $(elapsed)s used)"
  t0=$(date +%s)
  timeout --kill-after=10 "$b" "$@"
  rc=$?
  [ $rc -eq 124 ] && echo "$name: TIMED OUT after ${b}s"
  echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s"
  pack
  return 0
}

echo "== device"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
if [ -z "$CAP" ]; then
  echo "FATAL: nvidia-smi reports no GPU (missing, or no device visible): nothing to check here"; pack; exit 1
fi
case "$CAP" in
  90) ARCH="90a" ;;
  100) ARCH="100a" ;;
  *) ARCH="$CAP" ;;
esac
echo "arch: $ARCH; nvcc: $(nvcc --version | tail -1); $($PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)')"

echo "== build (sm_$ARCH only, ptxas report in $WORK/ptxas.txt)"
t0=$(date +%s)
MPT_KERNELS_CUDA=1 MPT_KERNELS_CUDA_ARCHS="$ARCH" MPT_KERNELS_BUILD_DIR=build/device \
  MPT_KERNELS_PTXAS_VERBOSE=1 timeout 300 $PY setup.py -q build_ext --inplace > "$WORK/build_run.txt" 2>&1
rc=$?
# A second run on a warm machine rebuilds nothing, so its log has no ptxas lines: keep the first
# run's report rather than overwrite it with an empty one.
if [ $rc -ne 0 ] || grep -q "ptxas info" "$WORK/build_run.txt" || [ ! -s "$WORK/ptxas.txt" ]; then
  mv "$WORK/build_run.txt" "$WORK/build.txt"
  grep -E "ptxas info|spill|bytes stack" "$WORK/build.txt" > "$WORK/ptxas.txt" || true
else
  echo "(nothing recompiled: the ptxas report of the earlier build is kept)"; rm -f "$WORK/build_run.txt"
fi
echo "build rc=$rc in $(( $(date +%s) - t0 ))s; spills: $(grep -c -E '[1-9][0-9]* bytes spill' "$WORK/ptxas.txt")"
if [ $rc -ne 0 ]; then tail -50 "$WORK/build.txt"; pack; exit 1; fi
# A CUDA build that cannot reach the GPU (driver older than the toolkit, say) would skip every CUDA
# test and still look green: stop here instead.
if ! $PY -c "import sys, torch, mpt_kernels as mk; print(mk.build_info()); ok = mk.cuda_available() and torch.cuda.is_available(); print('cuda_available', mk.cuda_available(), 'torch', torch.cuda.is_available()); sys.exit(0 if ok else 2)"; then
  echo "FATAL: the CUDA build or torch sees no GPU; the CUDA tests would all skip"; pack; exit 1
fi
pack

# Fast CUDA tests: the per-path smoke tests come first in each file, so a broken kernel is named
# early; --maxfail keeps one broken kernel from hiding the state of the others. Full output in
# $WORK/cuda_tests.txt, the summary lines in the log.
run_tests() {
  $PY -m pytest -q -p no:cacheprovider -m "$1" --maxfail=25 --timeout=120 -rfE tests > "$WORK/$2" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed|error|skipped|deselected" "$WORK/$2" | tail -40
  return $rc
}
if [ -z "${SKIP_TESTS:-}" ]; then
  stage "CUDA tests (fast)" 200 bash -c "$(declare -f run_tests); PY=$PY WORK=$WORK run_tests 'cuda and not slow' cuda_tests.txt"
fi

bench() {  # bench NAME CAP [ARGS...]
  local name=$1 cap=$2
  shift 2
  case " ${ONLY:-layernorm attention lion loss model train} " in *" $name "*) ;; *) return 0 ;; esac
  stage "benchmark $name" "$cap" $PY -m benchmarks "$name" --device cuda --out "$WORK" "$@"
}
bench train 200
# compute-sanitizer memcheck over the small CUDA tests (one cudaMalloc per tensor, so an access past a
# tensor's end is caught rather than landing in a neighbour inside torch's cached block).
if [ -z "${SKIP_TESTS:-}" ] && command -v compute-sanitizer > /dev/null; then
  stage "memcheck (small CUDA tests)" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --error-exitcode 3 --print-limit 20 --log-file "$WORK/memcheck.txt" \
    $PY -m pytest -q -p no:cacheprovider -m "cuda and not slow" -x --timeout=140 \
    -k "smoke or empty or offset or bad_input or rejects or step_matches or row_blocks or 6x4097 or 3x50432 or qkvpacked or matches_cpu_and_uses_current_stream or unused_sum_output" tests
  grep -E "ERROR SUMMARY|Invalid|out of bounds" "$WORK/memcheck.txt" 2>/dev/null | head -20
  # Shared-memory races (cp.async stages, the Q tile borrowing a K/V stage, dS^T reuse) on the real
  # hardware; the CPU emulator's racecheck build (tests/cuda_emu/README.md) checks the same per byte
  # against barrier counts, this against the GPU's own scheduling. One dtype of the per-path smoke tests.
  stage "racecheck (smoke tests, bf16)" 100 compute-sanitizer --tool racecheck \
    --error-exitcode 3 --print-limit 20 --log-file "$WORK/racecheck.txt" \
    $PY -m pytest -q -p no:cacheprovider -m cuda -x --timeout=90 -k "smoke and bfloat16" tests/test_attention_cuda.py
  grep -E "ERROR SUMMARY|hazard|Race" "$WORK/racecheck.txt" 2>/dev/null | head -20
fi
if [ -z "${SKIP_TESTS:-}" ] && ! command -v compute-sanitizer > /dev/null; then
  echo "== memcheck, racecheck: SKIPPED (compute-sanitizer not on PATH)"
fi
# FlexAttention compiles anew per seqlen: at one seqlen only, to keep the run short.
bench attention 120 --flex-seqlens 8192
bench lion 60
bench layernorm 60
bench loss 40
if [ -z "${SKIP_TESTS:-}" ]; then
  stage "CUDA test 65k tokens (slow)" 120 bash -c "$(declare -f run_tests); PY=$PY WORK=$WORK run_tests 'cuda and slow' cuda_tests_slow.txt"
fi
bench model 150
echo "== cuda-python example (no torch)"
if b=$(budget 30); then timeout "$b" $PY benchmarks/cuda_python_layernorm.py || echo "cuda_python_layernorm rc=$?"; else echo "SKIPPED (deadline)"; fi
echo "== done in $(elapsed)s"
pack
