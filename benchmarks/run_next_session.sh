#!/usr/bin/env bash
# The next GPU sessions' calls, in priority order (pallas_kernels/NOTES.md "Not measured yet");
# each is one device call of <= 9 min, with the tokamax wheels carried (carry [".whl"]) for 2-5:
#   STEP=0 bash benchmarks/run_next_session.sh "$OUT"   # jaxattn.check: every variant via the API
#   STEP=1 ...                                          # causal launch order (heavy_first) A/B
#   STEP=2 ...                                          # grid: D = 256 at N = 1024 / 4096 / 16384
#   STEP=3 ...                                          # grid: N = 1024 at D = 64 / 128
#   STEP=4 ...                                          # grid: XLA, mgpu, tokamax softmax, N = 4096
#   STEP=5 ...                                          # one more sweep of the target cells
#   STEP=6 ...                                          # D = 256 tiles: forward, backward, sweep
# (The tenth session's call, the statistics sweep without V and dc_center_lse, is in git history.)
set -u
out=${1:-/tmp/next-session}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
case "${STEP:-0}" in
  0) timeout "${CHECK_TIMEOUT:-420}" python3 -m jaxattn.check 2>&1 | filter \
       | tee "$out/check-api.log" | sed -n '/^==/,$p' ;;
  1) timeout 500 python3 benchmarks/kernels.py --dims 64,128 --lengths 4096,16384 --causal 1 \
       --flags plain,c --bwd-configs default,dqascending --stats-configs default,defaultascending \
       --rounds 7 --out "$out/kernels-heavy.json" 2>&1 | filter > "$out/kernels-heavy.log"
     sed -n '/^ms per kernel/,$p' "$out/kernels-heavy.log" ;;
  2) PART=d256 bash benchmarks/run_grid.sh "$out" ;;
  3) PART=n1024 bash benchmarks/run_grid.sh "$out" ;;
  4) PART=peers4096 bash benchmarks/run_grid.sh "$out" ;;
  5) BWD_TIMEOUT=1 bash benchmarks/run_sweep.sh "$out" ;;
  6) timeout 250 python3 benchmarks/attention.py --tune --dims 256 --lengths 4096 --causal 0,1 \
       --tune-flags plain,c,b --tune-block-kv 64,128 --tune-stages 2,3 --rounds 5 \
       --out "$out/tune-d256.json" 2>&1 | filter > "$out/tune-d256.log"
     tail -n 30 "$out/tune-d256.log"
     timeout 300 python3 benchmarks/kernels.py --no-forward --dims 256 --lengths 4096 --causal 0,1 \
       --flags plain,c --bwd-configs default,kv128,edge --rounds 5 \
       --stats-configs default,defaultnov,free2,free2nov,free2kv128nov \
       --out "$out/kernels-d256.json" 2>&1 | filter > "$out/kernels-d256.log"
     sed -n '/^ms per kernel/,$p' "$out/kernels-d256.log" ;;
  *) echo "STEP must be 0-6" >&2; exit 2 ;;
esac
