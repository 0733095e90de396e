#!/usr/bin/env bash
# The next GPU session's first call (~9 min), the untimed items of pallas_kernels/NOTES.md ("Not
# measured yet"), most valuable first:
#   0. the forward check on three cases (the forward now lowers without the reduction scratch);
#   0b. D = 128 softmax forward with 192-key tiles / 3 stages of 128 (they fit SMEM since 0);
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
timeout "${CHECK_TIMEOUT:-90}" python3 -m pallas_kernels.check --cases 0,4,9 --json "$out/check.json" \
  2>&1 | filter > "$out/check.log"
sed -n '/^case /,$p' "$out/check.log"
timeout "${TUNE_TIMEOUT:-100}" python3 benchmarks/attention.py --tune --dims 128 --lengths 4096,16384 \
  --causal 0,1 --tune-flags plain --tune-block-kv 128,192 --tune-stages 2,3 --rounds 5 \
  --out "$out/tune-d128.json" 2>&1 | filter > "$out/tune-d128.log"
grep "^tune" "$out/tune-d128.log" | cut -c1-110
timeout "${PROFILE_TIMEOUT:-150}" python3 benchmarks/profile.py \
  --impls softmax,ssmax,ssmax_learned,rbf,adaptive,cudnn --dims 64,128 --lengths 4096 --causal 0,1 \
  --top 6 --out "$out/profile.json" 2>&1 | filter > "$out/profile.log"
grep -E "^[a-z_]+ D=|#[12]|fusion" "$out/profile.log" | cut -c1-100
timeout "${KERNELS_TIMEOUT:-90}" python3 benchmarks/kernels.py --no-forward --dims 128 --lengths 4096 \
  --causal 0,1 --flags c --bwd-configs default --stats-configs default,free3,pp --rounds 5 \
  --out "$out/kernels.json" 2>&1 | filter > "$out/kernels.log"
sed -n '/^ms per kernel/,$p' "$out/kernels.log"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout "${BWD_TIMEOUT:-140}" python3 -m pallas_kernels.check_backward --only check \
  --cases long_16k_causal_d128,rbf_d128 2>&1 | filter > "$out/check_backward.log" &
bwd=$!
timeout "${MEMORY_TIMEOUT:-140}" python3 benchmarks/attention.py --memory \
  --impls softmax,temperature,ssmax,rbf,adaptive 2>&1 | filter > "$out/memory.log"
wait $bwd
grep "PASS\|FAIL\|ERROR" "$out/check_backward.log"
grep "^memory" "$out/memory.log"
true
