#!/usr/bin/env bash
# Per-kernel diagnosis on the H100 (one device call): register use, per-kernel times, GPU checks.
#   1. ptxas resource use (registers, spills) of the forward / dq / dkv kernels, D = 128, causal;
#   2. benchmarks/kernels.py: forward (fold off/on), dq and dkv per backward config and flags;
#   3. the backward correctness check and the forward check's long cases.
# Usage (device tool, repository root): bash benchmarks/run_kernels_h100.sh "$OUT"
set -u
out=${1:-/tmp/h100}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }

MOSAIC_GPU_DUMP_PTXAS=1 timeout "${PTXAS_TIMEOUT:-60}" python3 benchmarks/kernels.py --dims 128 \
  --lengths 4096 --causal 1 --flags plain,c,b --bwd-configs default,kv64 --reps 1 \
  > "$out/ptxas.log" 2>&1
timeout "${KERNELS_TIMEOUT:-240}" python3 benchmarks/kernels.py --dims "${DIMS:-128,64}" \
  --lengths "${LENGTHS:-4096}" --reps "${REPS:-10}" --out "$out/kernels.json" 2>&1 | filter \
  > "$out/kernels.log"
timeout "${BWD_CHECK_TIMEOUT:-150}" python3 -m pallas_kernels.check_backward --only check 2>&1 \
  | filter > "$out/check_backward.log"
timeout "${CHECK_TIMEOUT:-100}" python3 -m pallas_kernels.check --cases "${CASES:-8,9}" \
  --json "$out/check.json" 2>&1 | filter > "$out/check.log"

grep -E "Compiling entry|Used [0-9]+ registers|spill" "$out/ptxas.log" | sort | uniq -c | sort -rn | head -30
grep -E "^\{" "$out/ptxas.log" | cut -c1-150 | head -20
sed -n '/^ms per kernel/,$p' "$out/kernels.log"
tail -n 12 "$out/check_backward.log"
tail -n 6 "$out/check.log"
