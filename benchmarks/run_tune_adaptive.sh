#!/usr/bin/env bash
# One device call (~5 min) for what the sixth session left untimed (pallas_kernels/NOTES.md,
# "Not measured yet"): the statistics sweep's warpgroup layouts with a per-query scale, the
# fixed-max forward's tiles (adaptive temperature's main sweep), the backward with 3 compute
# warpgroups (the dq kernel's dc sums), and ptxas register use of the 4-warpgroup sweep.
#   bash benchmarks/run_tune_adaptive.sh "$OUT"
set -u
out=${1:-/tmp/tune-adaptive}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
MOSAIC_GPU_DUMP_PTXAS=1 timeout 60 python3 - > "$out/ptxas.log" 2>&1 <<'PY'
import jax, jax.numpy as jnp
from pallas_kernels.common import MaskSpec
from pallas_kernels.forward import flash_stats
B, N, H, D = 1, 1024, 2, 64
q = k = jnp.ones((B, N, H, D), jnp.bfloat16)
c = jnp.ones((B, H, N), jnp.float32)
b = jnp.zeros((B, H, N), jnp.float32)
seg = jnp.zeros((B, N), jnp.int32)
for name, kw in (("plain", {}), ("c", dict(query_scale=c)), ("b", dict(key_bias=b)),
                 ("segments", dict(mask=MaskSpec(is_causal=True, q_segment_ids=seg,
                                                 kv_segment_ids=seg)))):
    print(f"=== stats D={D} {name}", flush=True)
    jax.block_until_ready(flash_stats(q, k, logit_scale=0.125, **kw))
PY
grep -E "^=== |spill stores|Used [0-9]+ registers" "$out/ptxas.log" | cut -c1-140
timeout "${TUNE_TIMEOUT:-360}" python3 benchmarks/kernels.py --dims "${DIMS:-64,128}" \
  --lengths "${LENGTHS:-4096}" --causal 0,1 --flags "${FLAGS:-c}" \
  --bwd-configs "${BWD:-default,wgs3,wgs3kv64}" --stats-configs "${STATS:-default,pp,free2,free3,free4}" \
  --rounds "${ROUNDS:-5}" --out "$out/kernels.json" 2>&1 | filter > "$out/kernels.log"
sed -n '/^ms per kernel/,$p' "$out/kernels.log"
