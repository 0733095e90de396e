#!/usr/bin/env bash
# The next GPU session's first call (~7 min), the untimed items of pallas_kernels/NOTES.md ("Not
# measured yet"), most valuable first:
#   1. where the time goes per variant, with the RBF dk term in the kernel (benchmarks/profile.py);
#   2. the dq kernel without dc on 128-key tiles at D = 128 (kernels.py column dq:nodckv128) and the
#      causal statistics sweep's new layout (stats:default vs stats:free3 at D = 128);
#   3. the backward check cases the eighth session's timeout cut off, and the memory run.
#   bash benchmarks/run_next_session.sh "$OUT"
set -u
out=${1:-/tmp/next-session}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
timeout "${PROFILE_TIMEOUT:-170}" python3 benchmarks/profile.py \
  --impls softmax,ssmax,ssmax_learned,rbf,adaptive,cudnn --dims 64,128 --lengths 4096 --causal 0,1 \
  --top 6 --out "$out/profile.json" 2>&1 | filter > "$out/profile.log"
grep -E "^[a-z_]+ D=|#[12]|fusion" "$out/profile.log" | cut -c1-100
timeout "${KERNELS_TIMEOUT:-120}" python3 benchmarks/kernels.py --no-forward --dims 128 --lengths 4096 \
  --causal 0,1 --flags c --bwd-configs default --stats-configs default,free3,pp --rounds 5 \
  --out "$out/kernels.json" 2>&1 | filter > "$out/kernels.log"
sed -n '/^ms per kernel/,$p' "$out/kernels.log"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout "${BWD_TIMEOUT:-150}" python3 -m pallas_kernels.check_backward --only check \
  --cases long_16k_causal_d128,rbf_d128 2>&1 | filter > "$out/check_backward.log" &
bwd=$!
timeout "${MEMORY_TIMEOUT:-150}" python3 benchmarks/attention.py --memory \
  --impls softmax,temperature,ssmax,rbf,adaptive 2>&1 | filter > "$out/memory.log"
wait $bwd
grep "PASS\|FAIL\|ERROR" "$out/check_backward.log"
grep "^memory" "$out/memory.log"
true
