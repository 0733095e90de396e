#!/usr/bin/env bash
# Eighth session: BackwardConfig.pu_mma timed (dq kernel with c) and checked on the GPU.
set -u
out=${1:-/tmp/pumma}
mkdir -p "$out"
export PYTHONPATH=.
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
timeout "${KERNELS_TIMEOUT:-140}" python3 benchmarks/kernels.py --no-forward --dims 64,128 --lengths 4096 \
  --causal 0,1 --flags c --bwd-configs default,pumma,pummakv128 --rounds 5 \
  --out "$out/kernels-pumma.json" 2>&1 | filter > "$out/kernels-pumma.log"
sed -n '/^ms per kernel/,$p' "$out/kernels-pumma.log"
timeout "${BWD_TIMEOUT:-130}" python3 -m pallas_kernels.check_backward --only check \
  --cases window_registers_d64,rbf_causal_gqa_d64,causal_gqa_scale_bias_d128 --set dc_mma=1,pu_mma=1 2>&1 | filter \
  > "$out/check-pumma.log"
grep "PASS\|FAIL" "$out/check-pumma.log"
true
