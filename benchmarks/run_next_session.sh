#!/usr/bin/env bash
# The next GPU session's calls, in priority order (pallas_kernels/NOTES.md "Not measured yet");
# each is one device call of <= 9 min, with the tokamax wheels carried (carry [".whl"]) for 1-3:
#   STEP=0 bash benchmarks/run_next_session.sh "$OUT"   # GPU checks: backward (all cases), forward
#   STEP=1 ...                                          # a sweep of the target cells (heavy_first on)
#   STEP=2 ...                                          # grid: D = 256 fwd+bwd, N = 4096 / 16384
#   STEP=3 ...                                          # grid: XLA, mgpu, tokamax softmax, N = 4096
#   STEP=4 ...                                          # D = 256 tiles: forward, backward, sweep
#   STEP=5 ...                                          # causal launch order A/B (on since 1b7c9df)
#   STEP=6 ...                                          # jaxattn.check: every variant via the API
#   STEP=7 ...                                          # forward tiles at N = 1024 (D = 64 causal 0.77x)
# (The eleventh session ran the API check, the launch-order A/B and the D = 256 / N = 1024 grid;
# the twelfth steps 0-3, the thirteenth 0, 1, 6, 7, the fourteenth 4 and 1, the fifteenth 0 and 6:
# all checks PASS. Next: 1 after any kernel change, with 0 and 6 for its correctness.)
set -u
out=${1:-/tmp/next-session}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
case "${STEP:-0}" in
  0) # three processes at once (each case is ~30-60 s, mostly compiling); none preallocates
     export XLA_PYTHON_CLIENT_PREALLOCATE=false
     half1=plain_d64,causal_gqa_scale_bias_d128,ragged_lengths_d128,window_registers_d64,segments_causal_d64,head_dims_96
     half2=d256_causal,long_16k_d256,long_16k_causal_d128,rbf_causal_gqa_d64,rbf_d128
     timeout 540 python3 -m pallas_kernels.check_backward --only check --cases "$half1" 2>&1 \
       | filter > "$out/check-backward-1.log" &
     timeout 540 python3 -m pallas_kernels.check_backward --only check --cases "$half2" 2>&1 \
       | filter > "$out/check-backward-2.log" &
     timeout 540 python3 -m pallas_kernels.check 2>&1 | filter > "$out/check.log"
     wait
     grep -h "PASS\|FAIL\|Error" "$out"/check-backward-*.log
     sed -n '/^case /,$p' "$out/check.log" | tail -n 30 ;;
  1) BWD_TIMEOUT=1 bash benchmarks/run_sweep.sh "$out" ;;
  2) PART=d256bwd bash benchmarks/run_grid.sh "$out" ;;
  3) PART=peers4096 bash benchmarks/run_grid.sh "$out" ;;
  4) timeout 250 python3 benchmarks/attention.py --tune --dims 256 --lengths 4096 --causal 0,1 \
       --tune-flags plain,c,b --tune-block-kv 64,128 --tune-stages 2,3 --rounds 5 \
       --out "$out/tune-d256.json" 2>&1 | filter > "$out/tune-d256.log"
     tail -n 30 "$out/tune-d256.log"
     timeout 300 python3 benchmarks/kernels.py --no-forward --dims 256 --lengths 4096 --causal 0,1 \
       --flags plain,c --bwd-configs default,overlap,edge --rounds 5 \
       --stats-configs default,pp,free2,free2kv128 \
       --out "$out/kernels-d256.json" 2>&1 | filter > "$out/kernels-d256.log"
     sed -n '/^ms per kernel/,$p' "$out/kernels-d256.log" ;;
  5) timeout 500 python3 benchmarks/kernels.py --dims 64,128 --lengths 4096,16384 --causal 1 \
       --flags plain,c --bwd-configs default,dqascending --stats-configs default,defaultascending \
       --rounds 7 --out "$out/kernels-heavy.json" 2>&1 | filter > "$out/kernels-heavy.log"
     sed -n '/^ms per kernel/,$p' "$out/kernels-heavy.log" ;;
  6) timeout "${CHECK_TIMEOUT:-420}" python3 -m jaxattn.check 2>&1 | filter \
       | tee "$out/check-api.log" | sed -n '/^==/,$p' ;;
  7) timeout 400 python3 benchmarks/attention.py --tune --dims 64,128 --lengths 1024 --causal 1 \
       --tune-flags plain,c --tune-block-kv 64,128,256 --tune-stages 2,3 --rounds 5 \
       --out "$out/tune-n1024.json" 2>&1 | filter > "$out/tune-n1024.log"
     tail -n 30 "$out/tune-n1024.log" ;;
  *) echo "STEP must be 0-7" >&2; exit 2 ;;
esac
