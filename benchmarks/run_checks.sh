#!/usr/bin/env bash
# The GPU correctness session for the current kernels, one device call (~8 min):
#   1. in parallel: `pallas_kernels.check` (every forward case) then `check_backward` (every
#      backward case), and the N = 131072 memory run of every variant;
#   2. a short per-kernel comparison (KERNEL_ARGS for benchmarks/kernels.py), if time is left.
# Usage (device tool, repository root): bash benchmarks/run_checks.sh "$OUT"
set -u
out=${1:-/tmp/checks}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # two processes share the GPU
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
(
  timeout "${CHECK_TIMEOUT:-200}" python3 -m pallas_kernels.check --json "$out/check.json" 2>&1 \
    | filter > "$out/check.log"
  timeout "${BWD_TIMEOUT:-260}" python3 -m pallas_kernels.check_backward --only check 2>&1 \
    | filter > "$out/check_backward.log"
) &
chain=$!
timeout "${MEMORY_TIMEOUT:-240}" python3 benchmarks/attention.py --memory \
  --impls softmax,temperature,ssmax,rbf,adaptive 2>&1 | filter > "$out/memory.log"
wait $chain
if [ -n "${KERNEL_ARGS:-}" ]; then
  # shellcheck disable=SC2086
  timeout "${KERNELS_TIMEOUT:-90}" python3 benchmarks/kernels.py $KERNEL_ARGS \
    --out "$out/kernels.json" 2>&1 | filter > "$out/kernels.log"
fi
sed -n '/^case /,$p' "$out/check.log"
sed -n '/^== correctness/,/^$/p' "$out/check_backward.log"
grep "^memory" "$out/memory.log"
[ -f "$out/kernels.log" ] && sed -n '/^ms per kernel/,$p' "$out/kernels.log"
true
