#!/usr/bin/env bash
# The GPU correctness session for the current kernels, one device call (~8 min):
#   1. in parallel: `pallas_kernels.check` (every forward case), `check_backward` (every backward
#      case) and the N = 131072 memory run of every variant (none of them is timed; run one after
#      the other the two checks took over 10 minutes, more than one device call);
#   2. a short per-kernel comparison (KERNEL_ARGS for benchmarks/kernels.py), if time is left.
# Usage (device tool, repository root): bash benchmarks/run_checks.sh "$OUT"
set -u
out=${1:-/tmp/checks}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # three processes share the GPU
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout "${CHECK_TIMEOUT:-420}" python3 -m pallas_kernels.check --json "$out/check.json" 2>&1 \
  | filter > "$out/check.log" &
fwd=$!
timeout "${BWD_TIMEOUT:-420}" python3 -m pallas_kernels.check_backward --only check 2>&1 \
  | filter > "$out/check_backward.log" &
bwd=$!
timeout "${MEMORY_TIMEOUT:-240}" python3 benchmarks/attention.py --memory \
  --impls softmax,temperature,ssmax,rbf,adaptive 2>&1 | filter > "$out/memory.log"
wait $fwd $bwd
if [ -n "${KERNEL_ARGS:-}" ]; then
  # shellcheck disable=SC2086
  timeout "${KERNELS_TIMEOUT:-90}" python3 benchmarks/kernels.py $KERNEL_ARGS \
    --out "$out/kernels.json" 2>&1 | filter > "$out/kernels.log"
fi
if grep -q '^case ' "$out/check.log"; then sed -n '/^case /,$p' "$out/check.log"
else echo "forward check cut off; cases done:"
  grep -o '"name": "[^"]*"\|"pass": [a-z]*' "$out/check.log" | paste - -; fi
if grep -q '^== correctness' "$out/check_backward.log"; then
  sed -n '/^== correctness/,/^$/p' "$out/check_backward.log"
else echo "backward check cut off; cases done:"; grep "PASS\|FAIL" "$out/check_backward.log"; fi
grep "^memory" "$out/memory.log"
[ -f "$out/kernels.log" ] && sed -n '/^ms per kernel/,$p' "$out/kernels.log"
true
