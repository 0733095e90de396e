#!/usr/bin/env bash
# Forward tiles per problem flag (plain / c / b) and the forward's ptxas register use, one call:
#   bash benchmarks/run_tune_h200.sh "$OUT"
set -u
out=${1:-/tmp/tune}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
filter() { grep -v '^[WIE][0-9]\{4\} ' ; }
MOSAIC_GPU_DUMP_PTXAS=1 timeout 90 python3 - > "$out/ptxas.log" 2>&1 <<'PY'
import jax, jax.numpy as jnp
from pallas_kernels.common import MaskSpec
from pallas_kernels.forward import flash_forward
B, N, H, D = 1, 1024, 2, int(__import__("os").environ.get("PTXAS_D", "64"))
q = k = v = jnp.ones((B, N, H, D), jnp.bfloat16)
c = jnp.ones((B, H, N), jnp.float32)
b = jnp.zeros((B, H, N), jnp.float32)
for name, kw in (("plain", {}), ("c", dict(query_scale=c, query_scale_nonnegative=True)),
                 ("b", dict(key_bias=b))):
    print(f"=== forward D={D} causal {name}", flush=True)
    jax.block_until_ready(flash_forward(q, k, v, logit_scale=0.125, mask=MaskSpec(is_causal=True), **kw))
PY
grep -E "^=== |spill stores|Used [0-9]+ registers" "$out/ptxas.log" | cut -c1-140
timeout "${TUNE_TIMEOUT:-300}" python3 benchmarks/attention.py --tune --dims "${DIMS:-64}" \
  --lengths "${LENGTHS:-4096}" --causal 0,1 --tune-flags "${FLAGS:-plain,c,b}" \
  --tune-block-kv "${BLOCK_KV:-128,256}" --tune-stages "${STAGES:-2,3}" --tune-mma "${MMA:-0}" --rounds "${ROUNDS:-5}" \
  --out "$out/tune.json" 2>&1 | filter > "$out/tune.log"
grep "^tune" "$out/tune.log" | sed "s/^tune //"
