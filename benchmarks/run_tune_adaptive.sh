#!/usr/bin/env bash
# One device call (~9 min) for items the seventh session left untimed (pallas_kernels/NOTES.md,
# "Not measured yet"), most valuable first:
#   1. BlockSizes.intra_overlap (FA3's intra-warpgroup overlap in the forward): the GPU check on
#      three cases, then its time beside the default forward (kernels.py column fwd:overlap);
#   2. the softmax forward at D = 128 with 192-key tiles (FA3 takes 176 there; 128 now);
#   3. the statistics sweep's layouts at D = 128 with c, causal and not;
#   4. ptxas register use and spills of the 4-warpgroup statistics sweep at D = 64.
#   bash benchmarks/run_tune_adaptive.sh "$OUT"
set -u
out=${1:-/tmp/tune-adaptive}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
timeout "${CHECK_TIMEOUT:-100}" python3 -m pallas_kernels.check --cases 0,4,7 \
  --set intra_overlap=1,pingpong=0 --json "$out/check-overlap.json" 2>&1 | filter > "$out/check-overlap.log"
sed -n '/^case /,$p' "$out/check-overlap.log"
timeout "${FWD_TIMEOUT:-170}" python3 benchmarks/kernels.py --dims 64,128 --lengths 4096 --causal 0,1 \
  --flags plain,c,b --bwd-configs "" --rounds "${ROUNDS:-5}" --out "$out/fwd-overlap.json" 2>&1 \
  | filter > "$out/fwd-overlap.log"
sed -n '/^ms per kernel/,$p' "$out/fwd-overlap.log"
timeout "${TUNE_TIMEOUT:-100}" python3 benchmarks/attention.py --tune --dims 128 --lengths 4096,16384 \
  --causal 0 --tune-flags plain --tune-block-kv 128,192 --tune-stages 2 --rounds "${ROUNDS:-5}" \
  --out "$out/tune-d128.json" 2>&1 | filter > "$out/tune-d128.log"
grep "^tune" "$out/tune-d128.log"
timeout "${STATS_TIMEOUT:-100}" python3 benchmarks/kernels.py --no-forward --dims 128 --lengths 4096 \
  --causal 0,1 --flags c --bwd-configs "" --stats-configs default,free2,free3,free3kv64,pp \
  --rounds "${ROUNDS:-5}" --out "$out/stats-d128.json" 2>&1 | filter > "$out/stats-d128.log"
sed -n '/^ms per kernel/,$p' "$out/stats-d128.log"
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
