"""The fused path against the reference through the public API: ``python -m checks.api``.

For every kernel variant and option a user trains with -- temperature, scalable-softmax with a
learned ``s``, RBF with its ``gamma``, adaptive temperature with and without the gradient through
``beta``, registers, learned sink logits, the logit soft cap, GQA, causal / window / length /
segment masks -- runs
``jaxattn.attention(..., implementation="pallas")`` on 16-bit inputs and
``implementation="xla"`` on the same values in float32, and compares the output and every
gradient (``q``, ``k``, ``v``, the variant's parameters, the registers) by
``||x - r|| / ||r||``. Prints a pass/fail table (bf16 / f16 against float32: below 1e-2).

On a Hopper GPU it runs the Mosaic GPU kernels at realistic sizes; elsewhere ``--small`` runs
them in the interpreter at toy sizes (slow: minutes); without a GPU and without ``--small`` it
exits at once with status 2.

Example::

  PYTHONPATH=. python3 -m checks.api                 # GPU
  PYTHONPATH=. python3 -m checks.api --small --cases adaptive_beta_grad_d64
"""

import argparse
import dataclasses
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from checks.common import gpu_missing
from jaxattn import variants

TOL = 1e-2


@dataclasses.dataclass(frozen=True)
class Case:
    variant: variants.Variant
    D: int = 128
    K: int = 2  # kv heads (N = 8 query heads)
    masks: tuple = ()  # of "causal", "window", "lengths", "segments"
    registers: int = 0
    dtype: str = "bfloat16"
    soft_cap: float | None = None  # logits_soft_cap
    sinks: bool = False  # learned sink logits, one per query head (their gradient is checked)


CASES = {
    "softmax_causal_gqa_d128": Case(variants.Softmax(), masks=("causal",)),
    "temperature_window_d64": Case(variants.Softmax(0.7), D=64, masks=("window",)),
    "ssmax_learned_causal_d128": Case(variants.ScalableSoftmax(0.43), masks=("causal",)),
    "ssmax_learned_registers_d64": Case(variants.ScalableSoftmax(0.6), D=64, registers=4,
                                        masks=("lengths",)),
    "rbf_gamma_causal_d64": Case(variants.RBF(0.05), D=64, masks=("causal",)),
    "rbf_gamma_segments_d128_f16": Case(variants.RBF(0.02), masks=("segments",), dtype="float16"),
    "adaptive_causal_d128": Case(variants.AdaptiveTemperature(stop_gradient_beta=True),
                                 masks=("causal",)),
    "adaptive_beta_grad_d64": Case(variants.AdaptiveTemperature(), D=64, masks=("causal",)),
    "adaptive_beta_grad_registers_d128": Case(variants.AdaptiveTemperature(), registers=2),
    "softmax_registers_segments_d64": Case(variants.Softmax(), D=64, registers=4,
                                           masks=("segments",)),
    "softcap_temperature_causal_d128": Case(variants.Softmax(0.7), masks=("causal",), soft_cap=1.0),
    "softcap_ssmax_learned_lengths_d64": Case(variants.ScalableSoftmax(0.43), D=64,
                                              masks=("lengths",), soft_cap=2.0),
    "softcap_adaptive_causal_d128": Case(variants.AdaptiveTemperature(stop_gradient_beta=True),
                                         masks=("causal",), soft_cap=2.0),
    "sinks_ssmax_learned_causal_d128": Case(variants.ScalableSoftmax(0.43), masks=("causal",),
                                            sinks=True),
    "sinks_rbf_registers_d64": Case(variants.RBF(0.05), D=64, registers=2, masks=("causal",),
                                    sinks=True),
    "sinks_softmax_segments_d64_f16": Case(variants.Softmax(), D=64, masks=("segments",),
                                           sinks=True, dtype="float16"),
}


def _leaves_f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _inputs(case, B, T, seed):
    ks = jax.random.split(jax.random.key(seed), 8)
    dt = jnp.dtype(case.dtype)
    normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dt)
    N = 8
    q, do = normal(ks[0], (B, T, N, case.D)), normal(ks[3], (B, T, N, case.D))
    k, v = normal(ks[1], (B, T, case.K, case.D)), normal(ks[2], (B, T, case.K, case.D))
    regs = None
    if case.registers:
        regs = (normal(ks[4], (case.registers, case.K, case.D)),
                normal(ks[5], (case.registers, case.K, case.D)))
    opts = {}
    if "causal" in case.masks:
        opts["is_causal"] = True
    if "window" in case.masks:
        opts["local_window_size"] = (T // 8, T // 32)
    if "lengths" in case.masks:
        opts["query_seq_lengths"] = jax.random.randint(ks[6], (B,), T // 2, T + 1)
        opts["key_value_seq_lengths"] = jax.random.randint(ks[7], (B,), T // 2, T + 1)
    if "segments" in case.masks:
        seg = jnp.sort(jax.random.randint(ks[6], (B, T), 0, 4), axis=1)
        opts.update(q_segment_ids=seg, kv_segment_ids=seg, is_causal=True)
    if case.soft_cap is not None:
        opts["logits_soft_cap"] = case.soft_cap
    # sinks between -1 and 3: a fifth to nearly all of a row's weight
    sinks = jax.random.uniform(ks[7], (N,), jnp.float32, -1.0, 3.0) if case.sinks else None
    return (q, k, v, regs, do, sinks), opts


def _rel(x, r):
    x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
    if not np.all(np.isfinite(x)):
        return math.inf
    return float(np.linalg.norm(x - r) / max(np.linalg.norm(r), 1e-30))


def run_case(name, B, T, seed):
    """``{"out": err, "dq": err, ...}`` of one case: the fused path's relative errors."""
    case = CASES[name]
    (q, k, v, regs, do, sinks), opts = _inputs(case, B, T, seed)
    var = _leaves_f32(case.variant)

    def f(impl):
        def fn(q, k, v, var, regs, sinks):
            return jaxattn.attention(q, k, v, variant=var, registers=regs, sink_logits=sinks,
                                     implementation=impl, **opts)
        def out_and_grads(q, k, v, var, regs, sinks, do):
            out, vjp = jax.vjp(fn, q, k, v, var, regs, sinks)
            return vjp(do) + (out,)
        return jax.jit(out_and_grads)

    # The cotangent of a loss that depends on the output (0.5 ||o||^2 plus noise): with pure noise
    # the parameters' gradients (one sum over every logit) cancel to near zero and their relative
    # error says little.
    out = jax.jit(lambda q, k, v, var, regs, sinks: jaxattn.attention(
        q, k, v, variant=var, registers=regs, sink_logits=sinks, implementation="xla", **opts))(
        *_leaves_f32((q, k, v)), var, _leaves_f32(regs), sinks)
    do = (do.astype(jnp.float32) + out).astype(do.dtype)
    got = jax.block_until_ready(f("pallas")(q, k, v, var, regs, sinks, do))
    want = f("xla")(*_leaves_f32((q, k, v)), var, _leaves_f32(regs), sinks, _leaves_f32(do))
    errs = {"out": _rel(got[-1], want[-1])}
    for label, g, w in zip(("dq", "dk", "dv", "dparam", "dregs", "dsinks"), got[:-1], want[:-1],
                           strict=True):
        for i, (gl, wl) in enumerate(zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True)):
            errs[label + (str(i) if label == "dregs" else "")] = _rel(gl, wl)
    return errs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--small", action="store_true",
                        help="B = 1, T = 128 (for the CPU interpreter); default B = 2, T = 2048")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 10_000)
    args = parser.parse_args(argv)
    unknown = [name for name in args.cases.split(",") if name not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if gpu_missing(args.small, "python -m checks.api",
                   "pass --small to run it at toy sizes in the CPU interpreter (minutes)"):
        return 2
    B, T = (1, 128) if args.small else (2, 2048)
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, "seed", args.seed,
          f"B={B} T=S={T} N=8", flush=True)
    rows = []
    for name in args.cases.split(","):
        t0 = time.perf_counter()
        try:
            errs = run_case(name, B, T, args.seed)
            ok = all(e < TOL for e in errs.values())
            detail = " ".join(f"{key}={e:.2e}" for key, e in errs.items())
        except Exception as e:  # noqa: BLE001 - a failing case is a row of the table
            ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
        rows.append((name, ok, detail))
        print(f"{name} {'PASS' if ok else 'FAIL'} {detail} ({time.perf_counter() - t0:.1f}s)",
              flush=True)
    print(f"\n== jaxattn.attention pallas vs xla float32 (rel err < {TOL:g}) ==")
    for name, ok, detail in rows:
        print(f"{name:<36} {'PASS' if ok else 'FAIL'}  {detail}")
    print("ALL PASS" if all(ok for _, ok, _ in rows) else "SOME FAILED")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
