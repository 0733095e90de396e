#!/usr/bin/env bash
# One GPU call (~7 min) for pallas_kernels/NOTES.md "Not measured yet": the statistics sweep's new
# default (4 free warpgroups, no V stream) GPU-checked over the check cases that run it and timed
# with c / b beside the old layouts; the dq kernel with dc centered on lse_i / c_i
# (BackwardConfig.dc_center_lse: no float32 row sum of p u per logit), its timing and GPU check.
# Then run `bash benchmarks/run_sweep.sh $OUT` (carry .whl).
#   bash benchmarks/run_next_session.sh "$OUT"
set -u
out=${1:-/tmp/next-session}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
timeout "${CHECK_TIMEOUT:-150}" python3 -m pallas_kernels.check --cases 1,2,4,7,10,11 \
  --json "$out/check-stats.json" 2>&1 | filter > "$out/check-stats.log"
sed -n '/^case /,$p' "$out/check-stats.log"
timeout "${STATS_TIMEOUT:-100}" python3 benchmarks/kernels.py --no-forward --bwd-configs "" \
  --flags c,b --dims 64,128 --lengths 4096 --causal 0,1 --rounds 5 \
  --stats-configs default,free4,free3,pp,free3nov \
  --out "$out/kernels-stats.json" 2>&1 | filter > "$out/kernels-stats.log"
sed -n '/^ms per kernel/,$p' "$out/kernels-stats.log"
timeout "${KERNELS_TIMEOUT:-150}" python3 benchmarks/kernels.py --no-forward --dims 64,128 \
  --lengths 4096 --causal 0,1 --flags c --bwd-configs default,dclse,kv128dclse,kv128dcmma \
  --rounds 5 --out "$out/kernels-dc.json" 2>&1 | filter > "$out/kernels-dc.log"
sed -n '/^ms per kernel/,$p' "$out/kernels-dc.log"
cases=causal_gqa_scale_bias_d128,ragged_lengths_d128,window_registers_d64,long_16k_causal_d128
timeout "${BWD_TIMEOUT:-120}" python3 -m pallas_kernels.check_backward --only check --cases $cases \
  --set dc_center_lse=1 > "$out/check-dclse.log" 2>&1
timeout "${BWD_TIMEOUT:-120}" python3 -m pallas_kernels.check_backward --only check \
  --cases causal_gqa_scale_bias_d128,long_16k_causal_d128 \
  --set dc_center_lse=1,dc_mma=1,block_kv_dq=128 >> "$out/check-dclse.log" 2>&1
filter < "$out/check-dclse.log" | grep -v '^device' | tail -20
true
