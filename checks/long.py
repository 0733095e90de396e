"""Hardmax and top-k at long context on one GPU: ``python -m checks.long``.

Runs ``jaxattn.attention`` at ``T = S = 131072`` (``--length``), B = 1, one query head, head dim
64, causal: hardmax and top-8 in float32 through the chunked sweep of :mod:`jaxattn.chunked` (the
default dispatch: the kernels take 16-bit inputs only), and hardmax in bfloat16 on the fused
forward kernel (``implementation="pallas"``, :func:`pallas_kernels.flash_hardmax`; once more on
small dyadic q and k, whose exact logits tie often), with softmax
on the same kernel for its time. The reference would need the ``T x S`` logits (64 GiB in
float32); instead 256 query rows spread over the sequence are checked against the float32
reference run on those rows alone (of the same, rounded, inputs), with the causal mask written out
as a bool mask for them. Prints the wall time of a jitted call, the device's peak memory and the
errors, last a table; exit status 1 if a check fails. Without a GPU it exits at once with status 2
unless ``--length`` is small enough for the CPU (``--cpu``; the fused rows then run in the
interpreter).

Example::

  PYTHONPATH=. python3 -m checks.long
  PYTHONPATH=. python3 -m checks.long --cpu --length 4096
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from checks.common import gpu_missing

TOL = 1e-4  # float32 logits of H = 64 terms, summed in other orders: ~1e-6; weights of O(1)
# bfloat16 rows: the output is rounded once to bfloat16 (half an ulp: 2^-9 |o| <= 1.6e-2 for
# |o| < 8); the statistics stay float32 (from logits that differ by float32 accumulation order).
TOL_BF16 = {"out": 1.6e-2, "logsumexp": TOL, "entropy": TOL, "max_weight": TOL}


def run(variant, T, rows=256, seed=0, dtype=jnp.float32, implementation=None, check=True,
        dyadic=False):
    ks = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, (1, T, 1, 64), jnp.float32).astype(dtype) for key in ks)
    if dyadic:  # q, k in {-1, -1/2, 0, 1/2, 1}: exact logits, so the ties are real (and many)
        q, k = ((jax.random.randint(key, (1, T, 1, 64), -2, 3) / 2).astype(dtype) for key in ks[:2])
    f = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, variant=variant, is_causal=True,
                                                  return_stats=True,
                                                  implementation=implementation))
    out, stats = jax.block_until_ready(f(q, k, v))  # compile and run once
    t0 = time.perf_counter()
    out, stats = jax.block_until_ready(f(q, k, v))
    seconds = time.perf_counter() - t0
    mem = jax.devices()[0].memory_stats() or {}
    if not check:
        return seconds, mem.get("peak_bytes_in_use"), {}
    idx = jnp.asarray(np.unique(np.linspace(0, T - 1, rows).astype(np.int64)))
    mask = (jnp.arange(T)[None, :] <= idx[:, None])[None, None]  # [1, 1, rows, T]
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    ref, ref_stats = jaxattn.attention(q[:, idx], k, v, variant=variant, mask=mask,
                                       implementation="xla", return_stats=True)
    errs = {"out": float(jnp.abs(out[:, idx].astype(jnp.float32) - ref).max())}
    for field in ("logsumexp", "entropy", "max_weight"):
        errs[field] = float(jnp.abs(getattr(stats, field)[..., idx] - getattr(ref_stats, field)).max())
    return seconds, mem.get("peak_bytes_in_use"), errs


# (row name, variant, dtype, implementation, tolerances, or "time" for a timing row; dyadic)
ROWS = (
    ("hardmax", jaxattn.Hardmax(), jnp.float32, None, None, False),
    ("top-8", jaxattn.TopK(8), jnp.float32, None, None, False),
    ("hardmax-fused", jaxattn.Hardmax(), jnp.bfloat16, "pallas", TOL_BF16, False),
    ("hardmax-ties", jaxattn.Hardmax(), jnp.bfloat16, "pallas", TOL_BF16, True),
    ("softmax-fused", jaxattn.Softmax(), jnp.bfloat16, "pallas", "time", False),
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (use a small --length)")
    args = parser.parse_args(argv)
    if gpu_missing(args.cpu, "python -m checks.long", "pass --cpu with a small --length"):
        return 2
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, f"T=S={args.length}",
          flush=True)
    rows = []
    for name, variant, dtype, implementation, tol, dyadic in ROWS:
        try:
            seconds, peak, errs = run(variant, args.length, dtype=dtype, dyadic=dyadic,
                                      implementation=implementation, check=tol != "time")
            limits = {} if tol == "time" else (tol or dict.fromkeys(errs, TOL))
            ok = all(errs[k] < limits[k] for k in errs)
            detail = (f"{seconds * 1e3:.1f} ms, peak {peak / 2**30:.2f} GiB, " if peak else
                      f"{seconds * 1e3:.1f} ms, ") + " ".join(f"{k}={e:.1e}" for k, e in errs.items())
        except Exception as e:  # noqa: BLE001 - a failing case is a row of the table
            ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
        rows.append((name, ok, detail))
        print(name, "PASS" if ok else "FAIL", detail, flush=True)
    print(f"\n== causal hardmax / top-k at T = S = {args.length}: chunked float32, fused bfloat16 "
          f"(err < {TOL:g}; bf16 output < {TOL_BF16['out']:g}) ==")
    for name, ok, detail in rows:
        print(f"{name:<14} {'PASS' if ok else 'FAIL'}  {detail}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
