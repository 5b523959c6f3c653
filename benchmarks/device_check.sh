#!/usr/bin/env bash
# The one script run on a lent GPU (see README: "GPU validation"). Builds for this device's
# architecture only, runs the CUDA tests, runs every benchmark on cuda, and writes the log, JSON and
# Markdown under benchmarks/results/device. Budget: under 8 minutes on an H100.
#   bash benchmarks/device_check.sh            # everything
#   ONLY="attention lion" bash benchmarks/device_check.sh   # a subset of benchmarks
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
PY=${PYTHON:-python3}
exec > >(tee -a "$LOG") 2>&1

pack() {  # copy what exists so far to $OUT (no-op without the device tool)
  [ -n "$DEST" ] || return 0
  mkdir -p "$DEST"
  cp "$LOG" "$DEST/device_check.log" 2>/dev/null
  cat "$WORK"/*.md > "$DEST/summary.md" 2>/dev/null
  tar -czf "$DEST/device_check.tar.gz" -C "$WORK" . 2>/dev/null
  return 0
}

echo "== device"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader || true
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
case "$CAP" in
  90) ARCH="90a" ;;
  100) ARCH="100a" ;;
  *) ARCH="$CAP" ;;
esac
echo "arch: $ARCH"

echo "== build (sm_$ARCH only, ptxas report in $WORK/ptxas.txt)"
t0=$(date +%s)
MPT_KERNELS_CUDA=1 MPT_KERNELS_CUDA_ARCHS="$ARCH" MPT_KERNELS_BUILD_DIR=build/device \
  MPT_KERNELS_PTXAS_VERBOSE=1 $PY setup.py -q build_ext --inplace > "$WORK/build.txt" 2>&1
rc=$?
grep -E "ptxas info|spill|bytes stack" "$WORK/build.txt" > "$WORK/ptxas.txt" || true
echo "build rc=$rc in $(( $(date +%s) - t0 ))s"
if [ $rc -ne 0 ]; then tail -50 "$WORK/build.txt"; pack; exit 1; fi
$PY -c "import mpt_kernels as mk; print(mk.build_info()); print('cuda_available', mk.cuda_available())"
pack

echo "== CUDA tests"
$PY -m pytest -q -m cuda -x --timeout=300 tests 2>&1 | tail -40
pack

echo "== cuda-python example (no torch)"
if [ -f benchmarks/cuda_python_layernorm.py ]; then $PY benchmarks/cuda_python_layernorm.py || true; fi

echo "== benchmarks"
for b in ${ONLY:-layernorm attention lion model train}; do
  if [ -f "benchmarks/bench_$b.py" ]; then
    echo "-- $b"
    timeout 240 $PY -m benchmarks "$b" --device cuda --out "$WORK" || echo "benchmark $b failed rc=$?"
    pack
  fi
done
echo "== done in $(( $(date +%s) - t0 ))s"
pack
