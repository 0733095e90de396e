#!/usr/bin/env bash
# One device call (~6 min) for items the seventh session left untimed (pallas_kernels/NOTES.md,
# "Not measured yet"):
#   1. ptxas register use and spills of the 4-warpgroup statistics sweep (D = 64; plain, c, b,
#      segments), which runs at 104 registers per thread;
#   2. the softmax forward at D = 128 with 192-key tiles (FA3 takes 176 there; 128 now), where our
#      forward stays at 0.92x cuDNN non-causal;
#   3. the statistics sweep's layouts at D = 128 with c, causal and not (adaptive temperature's
#      forward is at 0.57-0.59x our softmax causal).
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
timeout "${TUNE_TIMEOUT:-150}" python3 benchmarks/attention.py --tune --dims 128 --lengths 4096,16384 \
  --causal 0 --tune-flags plain --tune-block-kv 128,192 --tune-stages 2 --rounds "${ROUNDS:-5}" \
  --out "$out/tune-d128.json" 2>&1 | filter > "$out/tune-d128.log"
grep "^tune" "$out/tune-d128.log"
timeout "${STATS_TIMEOUT:-150}" python3 benchmarks/kernels.py --no-forward --dims 128 --lengths 4096 \
  --causal 0,1 --flags c --bwd-configs "" --stats-configs default,free2,free3,free3kv64,pp \
  --rounds "${ROUNDS:-5}" --out "$out/stats-d128.json" 2>&1 | filter > "$out/stats-d128.log"
sed -n '/^ms per kernel/,$p' "$out/stats-d128.log"
