"""GPU check and timing of the fused backward (``python -m checks.backward``).

1. Correctness: :func:`pallas_kernels.backward.flash_backward` on bf16 inputs against ``jax.vjp`` of the
   float32 oracle :func:`pallas_kernels.common.flash_reference` (forward residuals from the oracle too),
   fresh random inputs and cotangents, realistic sizes up to T = S = 16384 and D = 256; pass iff every
   output's relative error ``||x - ref|| / ||ref||`` is below 1e-2 and no output holds NaN.
2. Speed: the backward alone, bf16, B*T = 16384 tokens, 16 heads, D in {64, 128}, T in {4096, 16384},
   causal and not, against cuDNN's backward (``jax.vjp`` of ``jax.nn.dot_product_attention(
   implementation="cudnn")`` forward+backward minus its forward). FLOPs: bwd = 2.5 x fwd,
   fwd = 4 B H T^2 D, halved when causal. Median of 10 timed calls after warm-up.

A pass/fail table and a timing table are printed last. Without a GPU it exits at once with status 2,
unless ``--interpret`` asks for the CPU interpreter.
"""

import argparse
import dataclasses
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from checks.common import gpu_missing, parse_overrides
from pallas_kernels.backward import BackwardBlockSizes, default_backward_block_sizes, flash_backward
from pallas_kernels.common import MaskSpec, flash_reference, is_masked

# name: (B, T, S, N, K, D, mask kwargs, registers, use query_scale, use key_bias (True: N(0, 1);
# "rbf": RBF-like, 30 - ||k_j||^2 / sqrt(D)))
CHECKS = {
    "plain_d64": (2, 1024, 1024, 4, 4, 64, {}, 0, False, False),
    "causal_gqa_scale_bias_d128": (1, 2048, 2048, 8, 2, 128, dict(is_causal=True), 0, True, True),
    "ragged_lengths_d128": (2, 1000, 1100, 4, 1, 128, "lengths", 0, True, True),
    "window_registers_d64": (1, 2048, 2048, 4, 2, 64, dict(local_window_size=(300, 40)), 4, True, False),
    "segments_causal_d64": (2, 1024, 1024, 2, 1, 64, "segments", 0, False, True),
    "head_dims_96": (1, 1024, 1024, 2, 1, 96, dict(is_causal=True), 0, False, False),
    "d256_causal": (1, 2048, 2048, 2, 1, 256, dict(is_causal=True), 0, True, True),
    "long_16k_d256": (1, 16384, 16384, 1, 1, 256, {}, 0, False, True),
    "long_16k_causal_d128": (1, 16384, 16384, 2, 1, 128, dict(is_causal=True), 0, True, False),
    "rbf_causal_gqa_d64": (2, 2048, 2048, 4, 2, 64, dict(is_causal=True), 0, False, "rbf"),
    "rbf_d128": (1, 2048, 2048, 4, 4, 128, {}, 0, False, "rbf"),
}
TOL = 1e-2


def _mask(kind, B, T, S, key):
    if kind == "lengths":
        kq, kk = jax.random.split(key)
        return MaskSpec(q_lengths=jax.random.randint(kq, (B,), T // 2, T + 1),
                        kv_lengths=jax.random.randint(kk, (B,), S // 2, S + 1))
    if kind == "segments":
        seg = jnp.sort(jax.random.randint(key, (B, T), 0, 4), axis=1)
        return MaskSpec(q_segment_ids=seg, kv_segment_ids=seg, is_causal=True)
    return MaskSpec(**kind)


def _inputs(key, B, T, S, N, K, D, use_c, use_b, dtype=jnp.bfloat16):
    ks = jax.random.split(key, 7)
    q = jax.random.normal(ks[0], (B, T, N, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, D), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (B, T, N, D), jnp.float32).astype(dtype)
    c = jax.random.uniform(ks[4], (B, N, T), jnp.float32, 0.5, 1.5) if use_c else None
    b = jax.random.normal(ks[5], (B, K, S), jnp.float32) if use_b else None
    if use_b == "rbf":
        b = _rbf_bias(k, D)
    return q, k, v, do, c, b, ks[6]


def _rbf_g(D):
    """``g`` of the rbf cases' key bias ``30 + g ||k_j||^2``."""
    return -1.0 / math.sqrt(D)


def _rbf_bias(k, D):
    """``30 + g ||k_j||^2`` (:func:`_rbf_g`), float32 ``[B, K, S]``: RBF's key term (plus a constant)."""
    return 30.0 + _rbf_g(D) * jnp.sum(k.astype(jnp.float32) ** 2, -1).transpose(0, 2, 1)


def _rel(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if np.isnan(x).any():
        return float("nan")
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def check_case(name, seed, query_scale_grad=True, flip_mma_db=False, overrides=None):
    """Errors of one CHECKS case against the float32 oracle; ``flip_mma_db``: the default config
    with ``BackwardBlockSizes.mma_db`` flipped (on at D = 64 by default); ``overrides``: fields of
    the default config to replace (``--set``)."""
    B, T, S, N, K, D, mask_kind, R, use_c, use_b = CHECKS[name]
    q, k, v, do, c, b, mkey = _inputs(jax.random.key(seed), B, T, S + R, N, K, D, use_c, use_b)
    mask = _mask(mask_kind, B, T, S, mkey)
    if R:
        mask = dataclasses.replace(mask, num_registers=R)
    a = 1.0 / math.sqrt(D)

    def ref_fn(q, k, v, c, b):
        return flash_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                               logit_scale=a, query_scale=c, key_bias=b, mask=mask)

    (out, lse), vjp = jax.vjp(ref_fn, q, k, v, c, b)
    refs = vjp((do.astype(jnp.float32), jnp.zeros_like(lse)))
    config = None
    if flip_mma_db or overrides:
        config = default_backward_block_sizes(D, c is not None, is_masked(mask))
        if flip_mma_db:
            config = dataclasses.replace(config, mma_db=not config.mma_db)
        config = dataclasses.replace(config, **(overrides or {}))
    got = flash_backward(q, k, v, out.astype(q.dtype), lse, do, logit_scale=a, query_scale=c,
                         key_bias=b, mask=mask, query_scale_grad=query_scale_grad, config=config)
    got = jax.block_until_ready(got)
    errs = {}
    for label, g, r in zip(("dq", "dk", "dv", "dc", "db"), got, refs, strict=True):
        if r is None or (label == "dc" and not query_scale_grad):
            assert g is None, label
            continue
        errs[label] = _rel(g, r)
    if use_b == "rbf":  # the bias's key gradient added in the kernel (bias_key_grad), as RBF runs
        def ref_total(q, k, v, c):
            return ref_fn(q, k, v, c, _rbf_bias(k, D))

        dk_total = jax.vjp(ref_total, q, k, v, c)[1]((do.astype(jnp.float32), jnp.zeros_like(lse)))[1]
        fused = flash_backward(q, k, v, out.astype(q.dtype), lse, do, logit_scale=a, query_scale=c,
                               key_bias=b, mask=mask, config=config, kernels=("dkv",),
                               bias_key_grad=2.0 * _rbf_g(D))
        errs["dk+bias"] = _rel(jax.block_until_ready(fused[1]), dk_total)
    return errs


def _median_time(fn, *args, reps=10):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _chunked_forward(q, k, v, a, causal, chunk=1024):
    """Exact float32 forward (out, natural-log lse) in query chunks, for timing inputs."""
    chunk = min(chunk, q.shape[1])
    B, T, N, D = q.shape
    n = T // chunk

    def one(i):
        qs = jax.lax.dynamic_slice_in_dim(q, i * chunk, chunk, 1).astype(jnp.float32)
        s = a * jnp.einsum("BTNH,BSNH->BNTS", qs, k.astype(jnp.float32))
        if causal:
            rows = i * chunk + jnp.arange(chunk)[:, None]
            s = jnp.where(rows >= jnp.arange(k.shape[1])[None, :], s, -1e30)
        lse = jax.nn.logsumexp(s, axis=-1)
        p = jnp.exp(s - lse[..., None])
        o = jnp.einsum("BNTS,BSNH->BTNH", p, v.astype(jnp.float32))
        return o.astype(q.dtype), lse

    outs, lses = jax.lax.map(one, jnp.arange(n))
    out = jnp.moveaxis(outs, 0, 1).reshape(B, T, N, D)
    lse = jnp.moveaxis(lses, 0, 2).reshape(B, N, T)
    return out, lse


# Candidate configs for ``--tune`` (dq block_q, dq block_kv, dkv block_q, dkv block_kv, wgs, stages).
TUNE_CONFIGS = (
    BackwardBlockSizes(64, 128, 64, 64, 2, 2),
    BackwardBlockSizes(64, 128, 64, 64, 2, 3),
    BackwardBlockSizes(64, 64, 64, 64, 2, 2),
    BackwardBlockSizes(64, 128, 128, 64, 2, 2),
    BackwardBlockSizes(64, 64, 128, 64, 2, 3),
    BackwardBlockSizes(64, 128, 64, 128, 1, 2),
)


def _timing_inputs(T, D, causal, heads, tokens):
    """bf16 ``q, k, v, do`` of ``tokens / T`` sequences, the forward's ``out, lse``, scale and mask."""
    B = tokens // T
    ks = jax.random.split(jax.random.key(T + D + causal), 4)
    q, k, v, do = (jax.random.normal(kk, (B, T, heads, D), jnp.float32).astype(jnp.bfloat16) for kk in ks)
    a = 1.0 / math.sqrt(D)
    out, lse = jax.jit(_chunked_forward, static_argnums=(3, 4))(q, k, v, a, causal)
    return q, k, v, do, out, lse, a, MaskSpec(is_causal=causal)


def tune_case(T, D, causal, heads=16, tokens=16384):
    """Backward time (ms) of each :data:`TUNE_CONFIGS` entry; errors (e.g. SMEM overflow) as text."""
    q, k, v, do, out, lse, a, mask = _timing_inputs(T, D, causal, heads, tokens)
    results = {}
    for cfg in TUNE_CONFIGS:
        fn = jax.jit(lambda q, k, v, o, s, d, cfg=cfg: flash_backward(
            q, k, v, o, s, d, logit_scale=a, mask=mask, config=cfg)[:3])
        try:
            results[cfg] = _median_time(fn, q, k, v, out, lse, do) * 1e3
        except Exception as e:  # noqa: BLE001 - report and try the next config
            results[cfg] = f"{type(e).__name__}: {str(e)[:120]}"
        print(T, D, causal, cfg, results[cfg], flush=True)
    return results


def time_case(T, D, causal, heads=16, tokens=16384):
    q, k, v, do, out, lse, a, mask = _timing_inputs(T, D, causal, heads, tokens)
    B = q.shape[0]

    ours = jax.jit(lambda q, k, v, o, s, d: flash_backward(q, k, v, o, s, d, logit_scale=a, mask=mask)[:3])
    t_ours = _median_time(ours, q, k, v, out, lse, do)

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=a, is_causal=causal, implementation="cudnn")

    fwd = jax.jit(cudnn)
    fwd_bwd = jax.jit(lambda q, k, v, d: jax.vjp(cudnn, q, k, v)[1](d))
    t_fwd = _median_time(fwd, q, k, v)
    t_fb = _median_time(fwd_bwd, q, k, v, do)
    flops = 2.5 * 4 * B * heads * T * T * D / (2 if causal else 1)
    return dict(B=B, T=T, D=D, causal=causal, ours_ms=t_ours * 1e3, cudnn_bwd_ms=(t_fb - t_fwd) * 1e3,
                ours_tflops=flops / t_ours / 1e12, cudnn_tflops=flops / (t_fb - t_fwd) / 1e12)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("check", "time", "both", "tune"), default="both")
    parser.add_argument("--cases", default=",".join(CHECKS))
    parser.add_argument("--seed", type=int, default=int(time.time()) % 10_000)
    parser.add_argument("--no-query-scale-grad", action="store_true",
                        help="run the dq kernel without the dc sums (query_scale_grad=False)")
    parser.add_argument("--flip-mma-db", action="store_true",
                        help="the default config with BackwardBlockSizes.mma_db flipped")
    parser.add_argument("--set", default="",
                        help="BackwardBlockSizes fields to override, e.g. overlap=1,block_kv_dq=64")
    parser.add_argument("--interpret", action="store_true",
                        help="run without a GPU, in the Mosaic GPU interpreter (hours at these sizes)")
    args = parser.parse_args(argv)
    if gpu_missing(args.interpret, "python -m checks.backward",
                   "pass --interpret to run it in the (very slow) CPU interpreter"):
        return 2
    overrides = parse_overrides(args.set, BackwardBlockSizes)
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, "seed", args.seed, flush=True)
    rows, timings = [], []
    if args.only in ("check", "both"):
        for i, name in enumerate(args.cases.split(",")):
            t0 = time.perf_counter()
            try:
                errs = check_case(name, args.seed + i, not args.no_query_scale_grad,
                                  args.flip_mma_db, overrides)
                ok = all(e < TOL for e in errs.values())
                rows.append((name, "PASS" if ok else "FAIL",
                             " ".join(f"{k}={v:.2e}" for k, v in errs.items())))
            except Exception as e:  # noqa: BLE001 - report and continue with the next case
                rows.append((name, "ERROR", f"{type(e).__name__}: {str(e)[:300]}"))
            print(*rows[-1], f"({time.perf_counter() - t0:.1f}s)", flush=True)
    if args.only in ("time", "both"):
        for D in (64, 128):
            for T in (4096, 16384):
                for causal in (False, True):
                    try:
                        timings.append(time_case(T, D, causal))
                        print(timings[-1], flush=True)
                    except Exception as e:  # noqa: BLE001
                        print("timing error", T, D, causal, type(e).__name__, str(e)[:300], flush=True)
    if args.only == "tune":
        for D in (64, 128):
            for T in (4096, 16384):
                for causal in (False, True):
                    tune_case(T, D, causal)
        return 0
    print("\n== correctness (bf16 vs float32 oracle, rel err < 1e-2) ==")
    for name, status, detail in rows:
        print(f"{name:30s} {status:5s} {detail}")
    print("\n== backward time (bf16, 16 heads, B*T=16384) ==")
    print(f"{'T':>6} {'D':>4} {'causal':>6} {'ours ms':>8} {'cudnn ms':>9} {'ours TF/s':>9} "
          f"{'cudnn TF/s':>10} {'ratio':>6}")
    for r in timings:
        ratio = r["ours_tflops"] / r["cudnn_tflops"]
        print(f"{r['T']:6d} {r['D']:4d} {r['causal']!s:>6} {r['ours_ms']:8.3f} {r['cudnn_bwd_ms']:9.3f} "
              f"{r['ours_tflops']:9.1f} {r['cudnn_tflops']:10.1f} {ratio:6.2f}")
    return 0 if all(status == "PASS" for _, status, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
