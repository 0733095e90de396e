#!/usr/bin/env bash
# The next GPU session's first call (~8 min), for pallas_kernels/NOTES.md "Not measured yet" 1-2:
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
# The statistics sweep (adaptive temperature's first pass) without the V stream it never reads
# (BlockSizes.sweep_skips_v, interpreter-checked only). A V-less sweep failed on the H100 in the
# second session (wrong lse / illegal instruction after XLA work; NOTES.md "The statistics
# sweep"): check.py runs XLA work before each kernel call, so check it first (D = 128 and 64, GQA +
# bias, segments), then time it beside today's layouts and the tiles / rings the freed SMEM allows.
timeout "${CHECK_TIMEOUT:-120}" python3 -m pallas_kernels.check --cases 1,2,4,7 --stats-set sweep_skips_v=1 \
  --json "$out/check-skipv.json" 2>&1 | filter > "$out/check-skipv.log"
sed -n '/^case /,$p' "$out/check-skipv.log"
timeout "${STATS_TIMEOUT:-200}" python3 benchmarks/kernels.py --no-forward --bwd-configs "" \
  --flags plain --dims 64,128 --lengths 4096,16384 --causal 0,1 --rounds 5 \
  --stats-configs default,defaultnov,ppnov,free3nov,free4nov,free3kv256nov,free4kv256nov,free3s3nov \
  --out "$out/kernels-stats.json" 2>&1 | filter > "$out/kernels-stats.log"
sed -n '/^ms per kernel/,$p' "$out/kernels-stats.log"
true
