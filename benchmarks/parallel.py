"""Bytes communicated by each sequence-parallel strategy: ``python -m benchmarks.parallel``.

Runs on the CPU (it sets 8 host devices before importing jax): for every strategy of
:func:`jaxattn.sharded_attention` (ring on the contiguous and zigzag layouts, all-to-all) it
compiles one attention call, forward and forward+backward, on a mesh of ``--devices`` devices along
the sequence, and sums the buffers of the collectives in the lowered program
(``collective_permute``, ``all_to_all``, ``all_gather``, ``all_reduce``): the bytes one device sends
per call (as lowered: see :func:`collective_bytes`). Beside it, the analytic count of each strategy:

* ring, forward: the ``n - 1`` hops of the K and V blocks, ``2 (n - 1) (S/n) K H b`` per batch row
  (``b`` bytes per element) -- the minimum for a scheme that keeps the queries in place (every
  device receives every other device's keys and values once);
* ring, backward: the blocks go around again (``2 (n - 1)`` hops) and their float32 gradients
  ``n`` hops home: ``2 (n - 1) (S/n) K H b + 2 n (S/n) K H 4``;
* all-to-all: ``(n - 1) / n`` of each of q, k, v and the output (and of their cotangents in the
  backward).

Then the model of when the ring hides its transfers on an H100 (printed with its numbers):
one ring step computes ``4 C^2 N H`` FLOPs (``C = T / n`` local tokens, non-causal; half that
causal) while it sends ``2 C K H b`` bytes; with ``F`` FLOP/s sustained and ``W`` bytes/s per
link direction, compute covers the transfer when ``4 C^2 N H / F >= 2 C K H b / W``, i.e.

.. math:: C \\ge \\frac{K}{N} \\cdot \\frac{b F}{2 W}.

Example::

  PYTHONPATH=. python3 -m benchmarks.parallel --devices 8 --length 4096
"""

import argparse
import os
import re
import sys

NUM_DEVICES = 8
if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={NUM_DEVICES}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxattn  # noqa: E402

COLLECTIVES = ("collective_permute", "all_to_all", "all_gather", "all_reduce")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "ui32": 4, "i1": 1, "i8": 1, "f64": 8,
                "i64": 8}
# H100 SXM: bf16 dense peak 989 TFLOP/s (a fused kernel sustains ~60 % of it), NVLink 4
# 900 GB/s per GPU in both directions together, i.e. ~450 GB/s each way.
H100_FLOPS, H100_LINK = 0.6 * 989e12, 450e9


def _tensor_bytes(text):
    total = 0
    for dims, dtype in re.findall(r"tensor<((?:\d+x)*)(\w+)>", text):
        size = int(np.prod([int(d) for d in dims.split("x") if d])) if dims else 1
        total += size * _DTYPE_BYTES.get(dtype, 4)
    return total


def collective_bytes(stablehlo_text: str, n: int) -> dict:
    """Bytes one device sends, by collective, in a lowered (StableHLO) module.

    The program as JAX asks for it, before XLA's optimisations (on the CPU, XLA moves 16-bit to
    float32 conversions in front of the collectives, which a GPU program does not do). Per
    operand of ``X`` bytes: a ``collective_permute`` sends ``X``, an ``all_to_all`` ``(n-1)/n X``,
    an ``all_gather`` ``(n-1) X`` and an ``all_reduce`` ``2 (n-1)/n X`` (ring algorithms).
    """
    factor = {"collective_permute": 1.0, "all_to_all": (n - 1) / n, "all_gather": n - 1.0,
              "all_reduce": 2 * (n - 1) / n}
    totals = dict.fromkeys(COLLECTIVES, 0.0)
    lines = stablehlo_text.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r'"stablehlo\.(' + "|".join(COLLECTIVES) + r')"', line)
        if not m:
            continue
        sig = line
        j = i
        while "->" not in sig.split(m.group(0))[-1] and j + 1 < len(lines):
            j += 1  # an all_reduce's region: the types follow its closing line
            sig = lines[j]
        operands = sig[sig.rindex(": (") + 3: sig.rindex(") ->")]
        totals[m.group(1)] += factor[m.group(1)] * _tensor_bytes(operands)
    return totals


def analytic(strategy, mode, n, B, T, N, K, H, b):
    C = T // n
    block = B * C * K * H
    if strategy == "ring":
        fwd = 2 * (n - 1) * block * b
        return fwd if mode == "fwd" else 2 * fwd + 2 * n * block * 4
    q = B * C * N * H
    fwd = (n - 1) / n * (2 * q + 2 * block) * b
    return fwd if mode == "fwd" else 2 * fwd


def measure(strategy, layout, mode, n, B, T, N, K, H, dtype):
    mesh = jax.make_mesh((n,), ("seq",), devices=jax.devices()[:n])
    par = jaxattn.Parallelism(mesh, sequence_axis="seq", strategy=strategy, layout=layout)
    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H))]

    def fwd(q, k, v):
        return jaxattn.sharded_attention(q, k, v, parallelism=par, is_causal=True)

    f = fwd if mode == "fwd" else jax.value_and_grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(
        jnp.float32)), argnums=(0, 1, 2))
    return collective_bytes(jax.jit(f).lower(*shapes).as_text(), n)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=NUM_DEVICES)
    parser.add_argument("--length", type=int, default=4096, help="T = S, the whole sequence")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    n, B, T, N, K, H = args.devices, 1, args.length, args.heads, args.kv_heads, args.head_dim
    dtype, b = jnp.bfloat16, 2
    print(f"B={B} T=S={T} N={N} K={K} H={H} bf16, {n} devices along the sequence, causal")
    print(f"{'strategy':<22}{'pass':<9}{'measured MB':>12}{'analytic MB':>13}{'ratio':>7}  by kind")
    for strategy, layout in (("ring", "contiguous"), ("ring", "zigzag"),
                             ("all_to_all", "contiguous")):
        for mode in ("fwd", "fwd+bwd"):
            got = measure(strategy, layout, mode, n, B, T, N, K, H, dtype)
            total = sum(got.values())
            want = analytic(strategy, mode, n, B, T, N, K, H, b)
            kinds = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in got.items() if v)
            print(f"{strategy + '/' + layout:<22}{mode:<9}{total / 1e6:>12.3f}{want / 1e6:>13.3f}"
                  f"{total / want:>7.2f}  {kinds}")
    c_min = K / N * b * H100_FLOPS / (2 * H100_LINK)
    print(f"\nring hides its K/V transfer on an H100 (F = {H100_FLOPS / 1e12:.0f} TFLOP/s "
          f"sustained, W = {H100_LINK / 1e9:.0f} GB/s per direction) when the local chunk "
          f"C = T/n >= (K/N) b F / (2 W) = {c_min:.0f} tokens ({2 * c_min:.0f} causal, where a "
          f"step computes half)")


if __name__ == "__main__":
    main()
