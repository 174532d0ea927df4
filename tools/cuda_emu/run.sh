#!/usr/bin/env bash
# One command for the CPU emulator of the CUDA kernels: generate one unit per csrc/cuda/ppm_* source, build them,
# run the five test scripts (test_emu_head.py generates and builds its own library).
# Usage: tools/cuda_emu/run.sh [quick|full]   (default quick)
# Generated files and the build go to $PSPNET_FAST_EMU_DIR (default: a per-checkout folder under the system temp dir).
# Python: $PYTHON, else the repository's .venv, else python3. Exit status 0 only when every script passed.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
MODE="${1:-quick}"
case "$MODE" in
  quick) FLAG=--quick ;;
  full) FLAG= ;;
  *) echo "usage: $0 [quick|full]" >&2; exit 2 ;;
esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
# The emulator runs every CUDA thread as its own std::thread; intra-op OpenMP threads on top only oversubscribe.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Nothing generated inside the repository, not even __pycache__ for emu_common.py.
export PYTHONDONTWRITEBYTECODE=1
# The scripts read --quick; exported too so nothing started from them can miss it. Unset in full mode.
if [ "$MODE" = quick ]; then export PSPNET_FAST_EMU_QUICK=1; else unset PSPNET_FAST_EMU_QUICK; fi

start=$SECONDS
"$PYTHON" "$HERE/make_emu.py" || exit 1
"$PYTHON" "$HERE/build.py" || exit 1
echo "generate + build: $((SECONDS - start))s"
failed=()
for t in test_emu.py test_emu2.py test_emu_bwd.py test_emu_fwd1.py test_emu_head.py; do
  t0=$SECONDS
  echo "== $t ($MODE)"
  if "$PYTHON" "$HERE/$t" $FLAG; then
    echo "== $t passed in $((SECONDS - t0))s"
  else
    echo "== $t FAILED in $((SECONDS - t0))s"
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -eq 0 ]; then
  echo "cuda_emu $MODE: all passed in $((SECONDS - start))s"
else
  echo "cuda_emu $MODE: FAILED ${failed[*]} ($((SECONDS - start))s)"
  exit 1
fi
