"""Sharded attention on one GPU: ``python -m checks.parallel``.

1. Blocks merged through the logsumexp, on the kernels: :func:`pallas_kernels.flash_attention`
   run over ``n`` blocks of keys at their offsets (``MaskSpec(offset=...)``, causal and
   non-causal, with a per-query scale and a per-key bias), merged as the ring merges them
   (``l = logsumexp_b l_b``, ``o = sum_b e^{l_b - l} o_b``), forward and gradients (q, k, v, c, b
   through the differentiable logsumexp) against the float32 oracle on the whole sequence; bf16,
   pass below 1e-2 relative.
2. A one-device mesh against the plain call, same process (the A/B of the sharded code path):
   ``jaxattn.sharded_attention`` with ``Parallelism(mesh, batch_axis=..., head_axis=...,
   sequence_axis=...)`` on a mesh of this one GPU against ``jaxattn.attention``, forward and
   forward+backward, softmax / RBF / adaptive temperature, bf16, B*T = 16384 tokens, 16 heads,
   D = 128, causal; interleaved rounds (:func:`benchmarks.timing.compare`), ratio
   sharded / plain paired per round.

Prints both tables last. Without a GPU it exits at once with status 2.
"""

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
import pallas_kernels as pk
from benchmarks.timing import compare, paired_ratio, warm_device
from checks.common import gpu_missing


def _rel(x, r):
    x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
    return float(np.linalg.norm(x - r) / max(np.linalg.norm(r), 1e-30))


def merged(q, k, v, c, b, *, n, causal, a):
    """The ring's merge on the kernel-level op: n query blocks, each against n key blocks at
    offset ``(i - j) * blk`` (fully visible, diagonal, or hidden under a causal mask)."""
    blk = k.shape[1] // n
    outs, lses = [], []
    for i in range(n):
        qi = q[:, i * blk:(i + 1) * blk]
        ci = None if c is None else c[..., i * blk:(i + 1) * blk]
        acc = None
        for j in range(n):
            spec = pk.MaskSpec(is_causal=causal, offset=(i - j) * blk)
            out, lse = pk.flash_attention(
                qi, k[:, j * blk:(j + 1) * blk], v[:, j * blk:(j + 1) * blk], logit_scale=a,
                query_scale=ci, key_bias=None if b is None else b[..., j * blk:(j + 1) * blk],
                mask=spec)
            cnt = pk.count_visible(spec, q.shape[0], blk, blk)[:, None, :] > 0
            part = (out.astype(jnp.float32), lse, jnp.broadcast_to(cnt, lse.shape))
            if acc is None:
                acc = part
                continue
            (ya, la, na), (yb, lb, nb) = acc, part
            lse = jnp.where(na & nb, jnp.logaddexp(la, lb),
                            jnp.where(na, la, jnp.where(nb, lb, 0.0)))
            wa, wb = (jnp.where(m, jnp.exp(x - lse), 0.0) for m, x in ((na, la), (nb, lb)))
            acc = (_rows(wa) * ya + _rows(wb) * yb, lse, na | nb)
        outs.append(acc[0])
        lses.append(acc[1])
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def _rows(w):
    return jnp.transpose(w, (0, 2, 1))[..., None]  # [B, N, T] -> [B, T, N, 1]


def _f32(x):
    return None if x is None else x.astype(jnp.float32)


def _loss(fn, ct, ctl, q, k, v, c, b):
    out, lse = fn(q, k, v, c, b)
    return jnp.sum(out.astype(jnp.float32) * ct) + jnp.sum(lse * ctl), (out, lse)


def _oracle(q, k, v, c, b, *, causal, a):
    return pk.flash_reference(_f32(q), _f32(k), _f32(v), logit_scale=a, query_scale=c,
                              key_bias=b, mask=pk.MaskSpec(is_causal=causal))


def check_merge(seed=0):
    rows = []
    B, T, N, K, H = 1, 2048, 4, 2, 128
    for n, causal, with_c, with_b in ((2, True, False, False), (4, True, True, True),
                                      (4, False, True, True)):
        ks = jax.random.split(jax.random.key(seed), 6)
        q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, T, K, H), jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, T, K, H), jnp.bfloat16)
        c = 1.0 + 0.5 * jax.random.uniform(ks[3], (B, N, T)) if with_c else None
        b = 0.3 * jax.random.normal(ks[4], (B, K, T)) if with_b else None
        a = H ** -0.5
        ct = jax.random.normal(ks[5], (B, T, N, H), jnp.float32)
        ctl = jax.random.normal(jax.random.fold_in(ks[5], 1), (B, N, T), jnp.float32)

        ours = functools.partial(merged, n=n, causal=causal, a=a)
        oracle = functools.partial(_oracle, causal=causal, a=a)
        argnums = tuple(i for i, x in enumerate((q, k, v, c, b), start=3) if x is not None)
        g = jax.jit(jax.grad(_loss, argnums=argnums, has_aux=True), static_argnums=0)
        try:
            (gs, (o, lse)) = g(ours, ct, ctl, q, k, v, c, b)
            (gr, (o_r, lse_r)) = g(oracle, ct, ctl, q, k, v, c, b)
            errs = {"out": _rel(o, o_r), "lse": float(jnp.abs(lse - lse_r).max())}
            names = [("q", "k", "v", "c", "b")[i - 3] for i in argnums]
            errs.update({f"d{nm}": _rel(x, y) for nm, x, y in zip(names, gs, gr, strict=True)})
            ok = all(e < 1e-2 for e in errs.values())
            detail = " ".join(f"{key}={e:.1e}" for key, e in errs.items())
        except Exception as e:  # noqa: BLE001 - a failing case is a row
            ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
        name = f"n{n}_{'causal' if causal else 'full'}{'_c' if with_c else ''}{'_b' if with_b else ''}"
        rows.append((name, ok, detail))
        print(name, "PASS" if ok else "FAIL", detail, flush=True)
    return rows


def _sum_out(f, q, k, v):
    return jnp.sum(f(q, k, v).astype(jnp.float32))


def _timed(f, mode):
    if mode == "fwd":
        return jax.jit(f)
    return jax.jit(jax.grad(functools.partial(_sum_out, f), argnums=(0, 1, 2)))


def ab(rounds):
    mesh = jax.make_mesh((1, 1, 1), ("data", "model", "seq"), devices=jax.devices()[:1])
    rows = []
    for T in (4096, 16384):
        B, N, H = 16384 // T, 16, 128
        ks = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(x, (B, T, N, H), jnp.bfloat16) for x in ks)
        for variant in ("softmax", "rbf", "adaptive_temperature"):
            for strategy in ("ring", "all_to_all"):
                par = jaxattn.Parallelism(mesh, batch_axis="data", head_axis="model",
                                          sequence_axis="seq", strategy=strategy)
                plain = functools.partial(jaxattn.attention, variant=variant, is_causal=True)
                sharded = functools.partial(jaxattn.sharded_attention, parallelism=par,
                                            variant=variant, is_causal=True)
                for mode in ("fwd", "fwd+bwd"):
                    times = {}
                    res = compare({"plain": (_timed(plain, mode), (q, k, v)),
                                   "sharded": (_timed(sharded, mode), (q, k, v))},
                                  rounds=rounds, rounds_out=times)
                    err = res["plain"][2] or res["sharded"][2]
                    if err:
                        rows.append((T, variant, strategy, mode, None, None, err))
                        continue
                    ratio = paired_ratio(times["sharded"], times["plain"])
                    spread = float(np.std([s / p for s, p in zip(times["sharded"], times["plain"],
                                                                 strict=True)]))
                    rows.append((T, variant, strategy, mode, res["plain"][0] * 1e3, ratio,
                                 f"round-to-round sd {spread:.3f}"))
                    print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--only", choices=("merge", "ab", "both"), default="both")
    args = parser.parse_args(argv)
    if gpu_missing(False, "python -m checks.parallel", "the CPU tests are tests/test_parallel*.py"):
        return 2
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    merge_rows = check_merge() if args.only in ("merge", "both") else []
    ab_rows = []
    if args.only in ("ab", "both"):
        warm_device()
        ab_rows = ab(args.rounds)
    if merge_rows:
        print("\n== key blocks merged through the logsumexp on the kernels (bf16 vs f32, < 1e-2) ==")
        for name, ok, detail in merge_rows:
            print(f"{name:<16} {'PASS' if ok else 'FAIL'}  {detail}")
    if ab_rows:
        print("\n== one-device mesh: sharded / plain, causal, D=128, 16 heads, B*T=16384 ==")
        for T, variant, strategy, mode, ms, ratio, note in ab_rows:
            r = "-" if ratio is None else f"{ratio:.3f}"
            t = "-" if ms is None else f"{ms:.2f} ms"
            print(f"T={T:<6} {variant:<21} {strategy:<10} {mode:<8} plain {t:>10}  ratio {r}  "
                  f"{note}")
    return 0 if all(ok for _, ok, _ in merge_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
