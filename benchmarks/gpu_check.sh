#!/usr/bin/env bash
# The one script to run on a lent GPU machine (an H200: torch 2.11, Triton 3.6, Python 3.12, no network), within
# ~10 minutes:  benchmarks/gpu_check.sh OUTDIR
# Steps: build the extension there (CUDA kernels for sm_90 only, the H200's, to halve the nvcc time), `pspnet-fast
# info`, the test suite (CUDA tests run when a device is present), the GPU benchmark (bfloat16, the 713x713 and
# Cityscapes feature sizes at batch 8, workloads ppm and ppm-train; the fused head's ops (tools/check_head_cuda.py)
# and the head workloads at 8x2048x90x90, bfloat16). Every step has its own time limit, its log in
# OUTDIR/<step>.log and its exit status in OUTDIR/status.tsv; a failing step does not stop the later ones.
set -u
if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
: >"$OUT/status.tsv"
FAILED=0

# step NAME SECONDS CMD...: runs CMD under a time limit (rc 124: it ran out), logs it, records name/rc/seconds.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%ss\n' "$name" "$rc" "$(( $(date +%s) - start ))" | tee -a "$OUT/status.tsv"
  tail -n 25 "$OUT/$name.log" >>"$OUT/summary.txt"
  [ "$rc" -eq 0 ] || FAILED=1
  return 0
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; "$PY" --version; } \
  >"$OUT/machine.txt" 2>&1
step build 180 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
step info 30 "$PY" -m pspnet_fast.cli info
step tests 150 "$PY" -m pytest tests -q -x -p no:cacheprovider
step head_ops 60 "$PY" tools/check_head_cuda.py
step bench 220 "$PY" -m pspnet_fast.cli bench --device cuda --dtype bfloat16 --shape 8,2048,90,90 \
  --shape 8,2048,64,128 --workload ppm,ppm-train --json "$OUT/bench.json"
step bench_head 150 "$PY" -m pspnet_fast.cli bench --device cuda --dtype bfloat16 --shape 8,2048,90,90 \
  --workload head,head-train --rounds 5 --json "$OUT/bench_head.json"
cat "$OUT/status.tsv"
exit $FAILED
