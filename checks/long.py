"""Hardmax and top-k at long context on one GPU: ``python -m checks.long``.

Runs ``jaxattn.attention`` with the default dispatch (the fused kernels decline these
normalisers, so the chunked sweep of :mod:`jaxattn.chunked` runs) at ``T = S = 131072``
(``--length``), B = 1, one query head, head dim 64, float32, causal. The reference would need
the ``T x S`` logits (64 GiB in float32); instead 256 query rows spread over the sequence are
checked against the reference run on those rows alone, with the causal mask written out as a
bool mask for them. Prints the wall time of a jitted call, the device's peak memory and the
errors, last a table; exit status 1 if a check fails. Without a GPU it exits at once with status 2
unless ``--length`` is small enough for the CPU (``--cpu``).

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


def run(variant, T, rows=256, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, (1, T, 1, 64), jnp.float32) for key in ks)
    f = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, variant=variant, is_causal=True,
                                                  return_stats=True))
    out, stats = jax.block_until_ready(f(q, k, v))  # compile and run once
    t0 = time.perf_counter()
    out, stats = jax.block_until_ready(f(q, k, v))
    seconds = time.perf_counter() - t0
    mem = jax.devices()[0].memory_stats() or {}
    idx = jnp.asarray(np.unique(np.linspace(0, T - 1, rows).astype(np.int64)))
    mask = (jnp.arange(T)[None, :] <= idx[:, None])[None, None]  # [1, 1, rows, T]
    ref, ref_stats = jaxattn.attention(q[:, idx], k, v, variant=variant, mask=mask,
                                       implementation="xla", return_stats=True)
    errs = {"out": float(jnp.abs(out[:, idx] - ref).max())}
    for field in ("logsumexp", "entropy", "max_weight"):
        errs[field] = float(jnp.abs(getattr(stats, field)[..., idx] - getattr(ref_stats, field)).max())
    return seconds, mem.get("peak_bytes_in_use"), errs


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
    for name, variant in (("hardmax", jaxattn.Hardmax()), ("top-8", jaxattn.TopK(8))):
        try:
            seconds, peak, errs = run(variant, args.length)
            ok = all(e < TOL for e in errs.values())
            detail = (f"{seconds * 1e3:.1f} ms, peak {peak / 2**30:.2f} GiB, " if peak else
                      f"{seconds * 1e3:.1f} ms, ") + " ".join(f"{k}={e:.1e}" for k, e in errs.items())
        except Exception as e:  # noqa: BLE001 - a failing case is a row of the table
            ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
        rows.append((name, ok, detail))
        print(name, "PASS" if ok else "FAIL", detail, flush=True)
    print(f"\n== causal hardmax / top-k at T = S = {args.length}, chunked (err < {TOL:g}) ==")
    for name, ok, detail in rows:
        print(f"{name:<8} {'PASS' if ok else 'FAIL'}  {detail}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
