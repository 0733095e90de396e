#!/usr/bin/env bash
# The rest of the benchmark grid, never timed so far: D = 256 at every N, and N = 1024 at
# D = 64 / 128, with every peer (cuDNN, XLA up to N = 4096, jax's attention_mgpu, tokamax); one
# device call per part (~7-9 min each, tokamax wheels carried in .whl/):
#   PART=d256 bash benchmarks/run_grid.sh "$OUT"    # D = 256, N = 1024 / 4096 / 16384
#   PART=n1024 bash benchmarks/run_grid.sh "$OUT"   # D = 64 / 128, N = 1024; XLA and mgpu at N = 4096
#   PART=d256bwd bash benchmarks/run_grid.sh "$OUT" # D = 256 forward+backward, N = 4096 / 16384
# Rows land in $OUT/bench-{fwdbwd,fwd}.json after every cell (a cut-off run keeps its rows);
# name them benchmarks/results/h200-grid-PART-{fwdbwd,fwd}-DATE.json.
set -u
out=${1:-/tmp/grid}
part=${PART:-d256}
ours=softmax,temperature,ssmax,ssmax_learned,rbf,adaptive
case "$part" in
  d256) dims=256 lengths=1024,4096,16384 peers=cudnn,xla,mgpu,tokamax,tokamax_rbf ;;
  n1024) dims=64,128 lengths=1024 peers=cudnn,xla,mgpu,tokamax,tokamax_rbf,cudnn_rbf ;;
  peers4096) dims=64,128 lengths=4096 peers=cudnn,xla,mgpu,tokamax ours=softmax ;;
  # forward+backward only (the forward ran in the eleventh session): D = 256 after dkv_split
  d256bwd) dims=256 lengths=4096,16384 peers=cudnn,xla,mgpu,tokamax,tokamax_rbf
           : "${FWDBWD_TIMEOUT:=480}" "${FWD_TIMEOUT:=1}" ;;
  *) echo "PART must be d256, d256bwd, n1024 or peers4096" >&2; exit 2 ;;
esac
SKIP_CHECKS=1 ROUNDS=${ROUNDS:-3} DIMS=$dims LENGTHS=$lengths \
  FWDBWD_TIMEOUT=${FWDBWD_TIMEOUT:-300} FWD_TIMEOUT=${FWD_TIMEOUT:-220} \
  IMPLS_FWDBWD=$ours,$peers IMPLS_FWD=$ours,$peers bash benchmarks/run_h100.sh "$out"
