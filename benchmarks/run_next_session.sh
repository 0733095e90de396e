#!/usr/bin/env bash
# The next GPU session's calls, in order (pallas_kernels/NOTES.md "Not measured yet"); each is one
# device call of ~7-9 min with the tokamax wheels carried (carry [".whl"]):
#   STEP=0 bash benchmarks/run_next_session.sh "$OUT"   # jaxattn.check: every variant via the API
#   STEP=1 bash benchmarks/run_next_session.sh "$OUT"   # D = 256 at N = 1024 / 4096 / 16384
#   STEP=2 bash benchmarks/run_next_session.sh "$OUT"   # N = 1024 at D = 64 / 128
#   STEP=3 bash benchmarks/run_next_session.sh "$OUT"   # XLA, mgpu, tokamax softmax at N = 4096
#   STEP=4 bash benchmarks/run_next_session.sh "$OUT"   # one more sweep of the target cells
# (The tenth session's call, the statistics sweep without V and dc_center_lse, is in git history.)
set -u
out=${1:-/tmp/next-session}
mkdir -p "$out"
case "${STEP:-0}" in
  0) PYTHONPATH=. timeout "${CHECK_TIMEOUT:-420}" python3 -m jaxattn.check 2>&1 \
       | grep -v '^[WIE][0-9]\{4\} ' | tee "$out/check-api.log" | sed -n '/^==/,$p' ;;
  1) PART=d256 bash benchmarks/run_grid.sh "$out" ;;
  2) PART=n1024 bash benchmarks/run_grid.sh "$out" ;;
  3) PART=peers4096 bash benchmarks/run_grid.sh "$out" ;;
  4) BWD_TIMEOUT=1 bash benchmarks/run_sweep.sh "$out" ;;
  *) echo "STEP must be 0-4" >&2; exit 2 ;;
esac
