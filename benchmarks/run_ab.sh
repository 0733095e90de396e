#!/usr/bin/env bash
# Checks a kernel change on the GPU and times it against the code before it, in one process.
#   1. make the baseline here:  benchmarks/make_baseline.sh REV   (-> .old/pallas_kernels_base)
#   2. device tool, carry [".old"]:  bash benchmarks/run_ab.sh "$OUT"
# Env: FWD_CASES / BWD_CASES (the checks to run), DIMS, LENGTHS, FLAGS, ROUNDS.
set -u
out=${1:-/tmp/ab}
mkdir -p "$out"
export PYTHONPATH=.:.old${PYTHONPATH:+:$PYTHONPATH}
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader

timeout "${CHECK_TIMEOUT:-200}" python3 -m pallas_kernels.check --cases "${FWD_CASES:-1,4,10}" \
  --json "$out/check.json" 2>&1 | filter > "$out/check.log"
timeout "${CHECK_TIMEOUT:-200}" python3 -m pallas_kernels.check_backward --only check \
  --cases "${BWD_CASES:-plain_d64,causal_gqa_scale_bias_d128,window_registers_d64,segments_causal_d64}" \
  2>&1 | filter > "$out/check_backward.log"
timeout "${KERNELS_TIMEOUT:-330}" python3 benchmarks/kernels.py --dims "${DIMS:-64,128}" \
  --lengths "${LENGTHS:-4096}" --flags "${FLAGS:-plain,c,b}" --bwd-configs default \
  --rounds "${ROUNDS:-5}" --baseline pallas_kernels_base --out "$out/kernels.json" 2>&1 | filter \
  > "$out/kernels.log"
tail -n 16 "$out/check.log"; tail -n 12 "$out/check_backward.log"
sed -n '/^ms per kernel/,$p' "$out/kernels.log"
