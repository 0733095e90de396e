#!/usr/bin/env bash
# Per-kernel diagnosis and tuning on the H100 (one device call, ~8 min):
#   1. benchmarks/kernels.py: forward (fold off/on), dq and dkv per backward config and flags;
#   2. the forward block-size / fold sweep (benchmarks/attention.py --tune);
#   3. with PTXAS=1 first: ptxas resource use (registers, spills) of every kernel compiled by a
#      short kernels.py run (D = 128, causal).
# Usage (device tool, repository root): bash benchmarks/run_kernels_h100.sh "$OUT"
set -u
out=${1:-/tmp/h100}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }

if [ "${PTXAS:-0}" = 1 ]; then
  MOSAIC_GPU_DUMP_PTXAS=1 timeout "${PTXAS_TIMEOUT:-60}" python3 benchmarks/kernels.py --dims 128 \
    --lengths 4096 --causal 1 --flags plain,c,b --bwd-configs default,kv64 --rounds 1 \
    > "$out/ptxas.log" 2>&1
  grep -E "^\{|spill stores" "$out/ptxas.log" | grep -v "^ " | cut -c1-120
fi
timeout "${KERNELS_TIMEOUT:-260}" python3 benchmarks/kernels.py --dims "${DIMS:-128,64}" \
  --lengths "${LENGTHS:-4096}" --rounds "${ROUNDS:-7}" --bwd-configs "${CONFIGS:-default,first,edge,kv64}" \
  --out "$out/kernels.json" 2>&1 | filter > "$out/kernels.log"
timeout "${TUNE_TIMEOUT:-260}" python3 benchmarks/attention.py --tune --dims "${DIMS:-128,64}" \
  --lengths "${LENGTHS:-4096}" --rounds "${ROUNDS:-7}" --out "$out/tune.json" 2>&1 | filter \
  > "$out/tune.log"

sed -n '/^ms per kernel/,$p' "$out/kernels.log"
grep "^tune" "$out/tune.log" | sed "s/^tune //"
