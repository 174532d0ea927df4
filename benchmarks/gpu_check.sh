#!/usr/bin/env bash
# The one script to run on a lent GPU machine (an H200: torch 2.11, Python 3.12, no network), in at most 8 minutes of
# wall time by its own limits:  benchmarks/gpu_check.sh OUTDIR
#
# Steps, most important first; each has its own time limit, cut further to what is left of the whole budget
# (GPU_CHECK_BUDGET seconds, default 470), so that the script as a whole stays under 8 minutes however the steps go.
# A step cut to under 20 s is skipped (rc "skip"). Logs in OUTDIR/<step>.log, name / rc / seconds in
# OUTDIR/status.tsv, the last lines of each log in OUTDIR/summary.txt; a failing step does not stop the later ones.
#   machine     10 s  nvidia-smi, python and torch versions
#   build      170 s  pip install --no-build-isolation --no-deps -e . (CUDA for sm_90 only: TORCH_CUDA_ARCH_LIST=9.0)
#   info        15 s  pspnet-fast info (what was built, which backends run)
#   tests_cuda  60 s  the CUDA cases of the fused-PPM and error tests (pytest -k cuda, -x)
#   head_ops    45 s  tools/check_head_cuda.py: the head ops on CUDA against the reference, determinism, timing
#   kernels    150 s  tools/gpu_kernels.py: per-kernel profiler times, bytes, fraction of copy bandwidth, for pool,
#                     reduce, upsample, ppm_forward, the backward ops, head_epilogue / head_context_backward at
#                     8x2048x90x90 and 8x2048x64x128 bf16, NCHW and channels_last, plus the reference PPM eager and
#                     torch.compile (the ratios of issue 12 item 7, recorded, not asserted) -> OUTDIR/kernels.json
#   sass        15 s  tools/sass_report.py on the built extension (the toolkit's cuobjdump; no download)
#   tests_triton 40 s the Triton cases (pytest -k triton, -x)
#   bench      rest   pspnet-fast bench, workload ppm only, 3 rounds -> OUTDIR/bench.json
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
BUDGET=${GPU_CHECK_BUDGET:-470}
T0=$(date +%s)
: >"$OUT/status.tsv"
: >"$OUT/summary.txt"
FAILED=0

# step NAME SECONDS CMD...: runs CMD under min(SECONDS, what is left of BUDGET) (rc 124: it ran out), logs it,
# records name/rc/seconds.
step() {
  local name=$1 limit=$2 start rc left
  shift 2
  left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$limit" -gt "$left" ]; then
    limit=$left
    [ "$limit" -lt 20 ] && limit=0  # a step cut to under 20 s would only time out
  fi
  if [ "$limit" -le 0 ]; then
    printf '%s\tskip\t0s\t(budget spent)\n' "$name" | tee -a "$OUT/status.tsv"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  start=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%ss\n' "$name" "$rc" "$(( $(date +%s) - start ))" | tee -a "$OUT/status.tsv"
  tail -n 25 "$OUT/$name.log" >>"$OUT/summary.txt"
  [ "$rc" -eq 0 ] || FAILED=1
  return 0
}

step machine 10 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
  $PY --version; $PY -c 'import torch; print(torch.__version__, torch.version.cuda)'"
step build 170 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
step info 15 "$PY" -m pspnet_fast.cli info
step tests_cuda 60 "$PY" -m pytest tests/nn/test_ppm.py tests/nn/test_errors.py tests/ops/test_ppm_forward.py -q -x -k cuda -p no:cacheprovider
step head_ops 45 "$PY" tools/check_head_cuda.py
step kernels 150 "$PY" tools/gpu_kernels.py --rounds 10 --json "$OUT/kernels.json"
step sass 15 "$PY" tools/sass_report.py --no-download --json "$OUT/sass.json"
step tests_triton 40 "$PY" -m pytest tests -q -x -k triton -p no:cacheprovider
step bench 90 "$PY" -m pspnet_fast.cli bench --device cuda --dtype bfloat16 --shape 8,2048,90,90 \
  --shape 8,2048,64,128 --workload ppm --rounds 3 --json "$OUT/bench.json"
echo "total $(( $(date +%s) - T0 ))s of ${BUDGET}s" | tee -a "$OUT/status.tsv"
cat "$OUT/status.tsv"
exit $FAILED
