#!/usr/bin/env bash
# One device call (~7 min, tokamax wheels carried in .whl/): the sweep of the target cells
# (run_h100.sh without its checks), then one backward check case (BWD_CASES).
#   bash benchmarks/run_sweep.sh "$OUT"
set -u
out=${1:-/tmp/sweep}
mkdir -p "$out"
SKIP_CHECKS=1 ROUNDS=5 DIMS=64,128 FWDBWD_TIMEOUT=300 FWD_TIMEOUT=190 \
  IMPLS_FWDBWD=softmax,ssmax,ssmax_learned,rbf,adaptive,cudnn,tokamax_rbf,cudnn_rbf \
  IMPLS_FWD=softmax,ssmax,ssmax_learned,rbf,adaptive,cudnn,tokamax_rbf bash benchmarks/run_h100.sh "$out"
PYTHONPATH=. timeout "${BWD_TIMEOUT:-75}" python3 -m pallas_kernels.check_backward --only check \
  --cases "${BWD_CASES:-rbf_causal_gqa_d64}" 2>&1 | grep -v '^[WIE][0-9]\{4\} ' > "$out/check_backward.log"
grep "PASS\|FAIL" "$out/check_backward.log"
true
