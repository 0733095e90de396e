#!/usr/bin/env bash
# One GPU session's measurements, in the order that matters if time runs out:
#   1. the correctness check and the N = 131072 memory run (in parallel: neither is timed);
#   2. the speed benchmark of the target cells, every row written to JSON as it lands.
# Usage (device tool, repository root, tokamax wheels carried in .whl/):
#   bash benchmarks/run_h100.sh "$OUT"
# Logs and JSON go to $1 (default /tmp/h100).
set -u
out=${1:-/tmp/h100}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$out/pip.log" 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }

# Stage 1 (SKIP_CHECKS=1 leaves it out): two processes share the GPU, so neither may preallocate
# 75 % of its memory.
if [ "${SKIP_CHECKS:-0}" != 1 ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${CHECK_TIMEOUT:-150}" \
    python3 -m pallas_kernels.check --json "$out/check.json" 2>&1 | filter > "$out/check.log" &
  check_pid=$!
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${MEMORY_TIMEOUT:-150}" \
    python3 benchmarks/attention.py --memory --impls softmax,temperature,ssmax,rbf,adaptive \
    2>&1 | filter > "$out/memory.log"
  wait $check_pid
fi

# Stage 2: forward+backward first (never measured at D = 64), then forward.
bench() {  # mode, impls, timeout
  timeout "$3" python3 benchmarks/attention.py --dims "${DIMS:-128,64}" \
    --lengths "${LENGTHS:-4096,16384}" --causal 0,1 --modes "$1" --impls "$2" \
    --rounds "${ROUNDS:-7}" --out "$out/bench-$1.json" 2>&1 | filter > "$out/bench-$1.log"
}
bench fwdbwd "${IMPLS_FWDBWD:-softmax,temperature,ssmax,ssmax_learned,rbf,adaptive,cudnn,tokamax_rbf,cudnn_rbf}" \
  "${FWDBWD_TIMEOUT:-300}"
bench fwd "${IMPLS_FWD:-softmax,temperature,ssmax,ssmax_learned,rbf,adaptive,cudnn,tokamax,tokamax_rbf}" \
  "${FWD_TIMEOUT:-220}"

if [ "${SKIP_CHECKS:-0}" != 1 ]; then tail -n 14 "$out/check.log"; cat "$out/memory.log"; fi
for m in fwdbwd fwd; do
  if grep -q "^TFLOP" "$out/bench-$m.log"; then sed -n "/^TFLOP/,\$p" "$out/bench-$m.log"; else grep "TFLOP/s" "$out/bench-$m.log"; fi
done
