#!/usr/bin/env bash
# The next GPU session's first call (~3 min), for pallas_kernels/NOTES.md "Not measured yet" 1:
# what the forward with its statistics costs beside the plain forward (kernel "fwd", config "stats":
# it would hand the backward dc's centering, lse - H) and what dc costs the dq kernel (dq default
# vs nodc), with a positive per-query scale c at D = 64 / 128, N = 4096, causal or not. Then
# repeat `bash benchmarks/run_sweep.sh $OUT` (carry .whl) twice: one sweep moves a cell by up to 0.09.
#   bash benchmarks/run_next_session.sh "$OUT"
set -u
out=${1:-/tmp/next-session}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
timeout "${KERNELS_TIMEOUT:-200}" python3 benchmarks/kernels.py --dims 64,128 --lengths 4096 \
  --causal 0,1 --flags c --bwd-configs default --rounds 5 --out "$out/kernels.json" 2>&1 \
  | filter > "$out/kernels.log"
sed -n '/^ms per kernel/,$p' "$out/kernels.log"
true
