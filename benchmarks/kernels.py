"""Per-kernel times of the fused attention on one GPU: ``python benchmarks/kernels.py``.

Where :mod:`benchmarks.attention` times whole variants through ``jaxattn.attention``, this times
the three kernels of :mod:`pallas_kernels` on their own -- the forward, the backward's dq kernel
and its dk/dv kernel -- for the three shapes of the kernel-level problem
``z_ij = c_i (a q_i . k_j + b_j)`` that the variants map to:

* ``plain``: no ``c``, no ``b`` (softmax, temperature);
* ``c``: a per-query scale (scalable-softmax, adaptive temperature), ``c ~ U(0.5, 1.5)``;
* ``b``: a per-key bias (RBF), ``b_j = -||k_j||^2 / 2``;
* ``ce``: ``c`` a function of the base softmax's entropy with the entropy term fused in the
  backward (adaptive temperature's gradient through beta: ``flash_backward(base_entropy=)``, the
  base statistics from :func:`~pallas_kernels.forward.flash_stats`).

Each backward configuration of ``--bwd-configs`` is timed (``default`` = :func:`default_backward_block_sizes`,
``first`` = untuned tiles, ``edge`` / ``noedge`` = edge-only masks in both / no
kernel, ``kv64`` / ``kv128`` = 64- / 128-key dq tiles, ``wgs3`` = 3 compute warpgroups,
``overlap`` = :attr:`BackwardBlockSizes.overlap`, ``dcmma`` / ``nodcmma`` = ``dc_mma`` on / off,
``dclse`` = ``dc_center_lse``, ``dqascending`` = ``dq_heavy_first`` off, ``dkvsplit`` /
``dkvfused`` = ``dkv_split`` on / off), and
the forward with ``fold_scale`` off and on, with ``intra_overlap`` (``overlap``), with ``mma_bias``
flipped (a key bias), with ``heavy_first`` off (``ascending``) and given the exact row max (``fixedmax``);
each config's outputs are compared
with the first config's (relative norm of the difference: a config that breaks the kernel shows up);
``--stats-configs`` adds the statistics sweep (:func:`stats_configs`), and ``--fma-cols 16,32``
the forward, the fixed-max forward, the default sweep and the default backward kernels with that
many columns of each tile exponentiated on the FMA pipe (:attr:`BlockSizes.exp2_fma_cols`,
:attr:`BackwardBlockSizes.exp2_fma_cols`: ``fma<n>``, ``fixedmaxfma<n>``, ``defaultfma<n>``).
bf16, H = 16, B * N = 16384 tokens (``--tokens``); timed by :func:`benchmarks.timing.compare`
(every candidate of one problem in interleaved rounds of back-to-back calls, after a warm-up).
FLOPs as :mod:`benchmarks.attention`: forward ``4 B H N^2 D`` (halved when causal), and each
backward kernel counted at half the backward's ``2.5 x fwd``, so the two rates compare kernel
against kernel. Prints one table; ``--out`` writes the rows as JSON.
"""

import argparse
import dataclasses
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import require_gpu  # noqa: E402
from benchmarks.timing import compare, warm_device  # noqa: E402
from pallas_kernels.backward import BackwardBlockSizes, default_backward_block_sizes, flash_backward  # noqa: E402
from pallas_kernels.common import BaseEntropy, MaskSpec  # noqa: E402
from pallas_kernels.forward import default_block_sizes, default_stats_block_sizes, flash_forward, flash_stats  # noqa: E402

HEADS = 16
TOKENS = 16384


def bwd_configs(D, query_scale=False, masked=True, entropy_grad=False):
    """Named backward configs to compare at padded head dim ``D``."""
    base = default_backward_block_sizes(D, query_scale, masked, entropy_grad=entropy_grad)
    return {
        "default": base,
        "first": BackwardBlockSizes(64, 128 if D < 256 else 64, 64, 64, 2 if D < 256 else 1, 2),
        "edge": dataclasses.replace(base, dq_edge_masks=True, dkv_edge_masks=True),
        "noedge": dataclasses.replace(base, dq_edge_masks=False, dkv_edge_masks=False),
        "kv64": dataclasses.replace(base, block_kv_dq=64),
        "kv128": dataclasses.replace(base, block_kv_dq=128),
        "kv128dcmma": dataclasses.replace(base, block_kv_dq=128, dc_mma=True),
        "nomma": dataclasses.replace(base, mma_bias=False),
        "mma": dataclasses.replace(base, mma_bias=True),
        "mmadb": dataclasses.replace(base, mma_db=True),
        "nommadb": dataclasses.replace(base, mma_db=False),
        "wgs3": dataclasses.replace(base, compute_wgs=3),
        "wgs3kv64": dataclasses.replace(base, compute_wgs=3, block_kv_dq=64),
        "overlap": dataclasses.replace(base, overlap=True),
        "nooverlap": dataclasses.replace(base, overlap=False),
        "dkvsplitnooverlap": dataclasses.replace(base, dkv_split=True, overlap=False),
        "dkvsplitkv128": dataclasses.replace(base, dkv_split=True, block_kv_dq=128),
        "dkvsplitkv64": dataclasses.replace(base, dkv_split=True, block_kv_dq=64),
        "overlapkv64": dataclasses.replace(base, overlap=True, block_kv_dq=64),
        "dcmma": dataclasses.replace(base, dc_mma=True),
        "nodcmma": dataclasses.replace(base, dc_mma=False),
        "dclse": dataclasses.replace(base, dc_center_lse=True),
        "kv128dclse": dataclasses.replace(base, block_kv_dq=128, dc_mma=True, dc_center_lse=True),
        "dqascending": dataclasses.replace(base, dq_heavy_first=False),
        "dkvsplit": dataclasses.replace(base, dkv_split=True),
        "dkvfused": dataclasses.replace(base, dkv_split=False),
    }


def stats_configs(D, query_scale=False, key_bias=False):
    """Named :func:`flash_stats` configs (``--stats-configs``): the default, the forward's
    ping-pong tiles, and free-running warpgroups (2-4, no schedule barrier) over other tiles."""
    base = default_block_sizes(D, query_scale, key_bias)
    free = lambda wgs, bkv, steps: dataclasses.replace(
        base, pingpong=False, compute_wgs=wgs, block_kv=bkv, max_concurrent_steps=steps)
    configs = {
        "default": default_stats_block_sizes(D, query_scale, key_bias),
        "pp": base,
        "free2": dataclasses.replace(base, pingpong=False),
        "free2kv128": free(2, 128, 2),
        "free3": free(3, 128, 2),
        "free3kv64": free(3, 64, 3),
        "free4": free(4, 128, 2),
        "free4kv64": free(4, 64, 3),
        # the SMEM the unused V ring held, as 256-key tiles or a third stage
        "free3kv256": free(3, 256, 2),
        "free4kv256": free(4, 256, 2),
        "free3s3": free(3, 128, 3),
    }
    configs["defaultascending"] = dataclasses.replace(configs["default"], heavy_first=False)
    # each also without the V stream ("...nov", BlockSizes.sweep_skips_v)
    configs.update({f"{name}nov": dataclasses.replace(cfg, sweep_skips_v=True)
                    for name, cfg in list(configs.items())})
    return configs


def _inputs(seed, B, N, D, flags):
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k, v, do = (jax.random.normal(kk, (B, N, HEADS, D), jnp.float32).astype(jnp.bfloat16)
                   for kk in ks[:4])
    c = jax.random.uniform(ks[4], (B, HEADS, N), jnp.float32, 0.5, 1.5) if "c" in flags else None
    b = None
    if "b" in flags:
        b = jnp.transpose(-0.5 * jnp.sum(k.astype(jnp.float32) ** 2, -1), (0, 2, 1))
    return q, k, v, do, c, b


def _rel_diff(outs, ref):
    """Largest ``||x - r|| / ||r||`` over the outputs (configs must agree to bf16 rounding)."""
    if outs is None or ref is None:
        return None
    diffs = []
    # a config may return fewer outputs (``nodc``: dq without dc)
    for x, r in zip(outs, ref, strict=False):
        x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
        diffs.append(float(np.linalg.norm(x - r) / max(np.linalg.norm(r), 1e-30)))
    return max(diffs)


def _baseline_candidates(pkg, D, mask, a, fwd_args, bwd_args):
    """The forward, dq and dkv kernels of an older copy of the package (``--baseline``), at its
    own defaults, for an A/B comparison in the same process."""
    import importlib
    fwd_mod = importlib.import_module(f"{pkg}.forward")
    bwd_mod = importlib.import_module(f"{pkg}.backward")
    mask = importlib.import_module(f"{pkg}.common").MaskSpec(is_causal=mask.is_causal)
    out = {("fwd", "base"): (jax.jit(lambda q, k, v, c, b: fwd_mod.flash_forward(
        q, k, v, logit_scale=a, query_scale=c, key_bias=b, mask=mask)), fwd_args)}
    for part in ("dq", "dkv"):
        fn = jax.jit(lambda q, k, v, o, s, d, c, b, part=part: bwd_mod.flash_backward(
            q, k, v, o, s, d, logit_scale=a, query_scale=c, key_bias=b, mask=mask,
            kernels=(part,)))
        out[(part, "base")] = (fn, bwd_args)
    return out


def measure(D, N, causal, flags, rounds, configs, tokens=TOKENS, baseline=None, stats=(), forward=True,
            fma_cols=()):
    """Rows ``dict(kernel, config, ms, tflops, error, rel_diff_to_first)`` for one problem.

    ``c`` here is positive, so the forward is called with ``query_scale_nonnegative=True`` (as
    the dispatcher does for SSMax and adaptive temperature). ``baseline``: a package name whose
    kernels are timed beside these (config ``base``). ``stats``: names of
    :func:`stats_configs` to time the statistics sweep with (kernel ``stats``). ``forward``:
    False leaves the forward candidates out (``--no-forward``). ``fma_cols``: column counts of
    :attr:`BlockSizes.exp2_fma_cols` to time the forward (``fma<n>``), the fixed-max forward
    (``fixedmaxfma<n>``), the default statistics sweep and the default backward kernels
    (``defaultfma<n>``, :attr:`BackwardBlockSizes.exp2_fma_cols` where ``n`` fits its tiles) with.
    """
    B = max(1, tokens // N)
    q, k, v, do, c, b = _inputs(N + D + len(flags), B, N, D, flags)
    a = 1.0 / math.sqrt(D)
    mask = MaskSpec(is_causal=causal)
    fwd_flops = 4 * B * HEADS * N * N * D / (2 if causal else 1)
    candidates = {}
    base = default_block_sizes(D, c is not None, b is not None)

    def forward_fn(cfg, nonneg=True, stats=False):  # the forward (given a row max m or None)
        return jax.jit(lambda q, k, v, c, b, m: flash_forward(
            q, k, v, logit_scale=a, query_scale=c, key_bias=b, mask=mask, config=cfg,
            query_scale_nonnegative=nonneg and c is not None, row_max=m, return_stats=stats))

    if forward:
        configs_fwd = {"nofold": dataclasses.replace(base, fold_scale=False),
                       "fold": dataclasses.replace(base, fold_scale=True),
                       # FA3's intra-warpgroup overlap instead of the ping-pong
                       "overlap": dataclasses.replace(base, pingpong=False, intra_overlap=True),
                       # causal: query tiles launched in ascending order (heavy_first off)
                       "ascending": dataclasses.replace(base, heavy_first=False)}
        configs_fwd.update({f"fma{n}": dataclasses.replace(base, exp2_fma_cols=n)
                            for n in fma_cols})
        for name, cfg in configs_fwd.items():
            candidates[("fwd", name)] = (forward_fn(cfg), (q, k, v, c, b, None))
        # with the statistics (lse, entropy, max weight): what a forward that hands the backward
        # dc's centering (sum_j p_ij z_ij = lse - H) would cost
        candidates[("fwd", "stats")] = (forward_fn(base, stats=True), (q, k, v, c, b, None))
        if b is not None:  # BlockSizes.mma_bias flipped (timed without the c >= 0 promise)
            cfg = dataclasses.replace(base, mma_bias=not base.mma_bias)
            candidates[("fwd", "mma" if cfg.mma_bias else "nomma")] = (
                forward_fn(cfg, nonneg=False), (q, k, v, c, b, None))
        # given the exact row max (no online max), as adaptive temperature's main sweep; None:
        # the fixed-max default tiles; at D = 64 also 256-key tiles on the online forward's base
        row_max = flash_stats(q, k, logit_scale=a, query_scale=c, key_bias=b, mask=mask,
                              return_row_max=True)[2]
        fixed = {"fixedmax": None}
        if D == 64:
            fixed["fixedmax256"] = dataclasses.replace(base, block_kv=256, max_concurrent_steps=2)
        # the tiles the "fixedmax" row gets (flash_forward's own choice given a row max)
        fixed_base = default_block_sizes(D, c is not None, b is not None, fixed_max=True,
                                         masked=causal, causal_keys=N if causal else 0)
        fixed.update({f"fixedmaxfma{n}": dataclasses.replace(fixed_base, exp2_fma_cols=n)
                      for n in fma_cols})
        for name, cfg in fixed.items():
            candidates[("fwd", name)] = (forward_fn(cfg), (q, k, v, c, b, row_max))
    base_entropy = None
    if "e" in flags:  # c = 1 + H0 / 4 of the base softmax's entropy H0, f' = 1 / 4
        lse0, h0 = jax.jit(lambda q, k: flash_stats(q, k, logit_scale=a, mask=mask))(q, k)
        c = 1.0 + 0.25 * h0
        base_entropy = BaseEntropy(lse0, h0, jnp.full_like(h0, 0.25))
    out, lse = jax.jit(lambda q, k, v, c, b: flash_forward(
        q, k, v, logit_scale=a, query_scale=c, key_bias=b, mask=mask))(q, k, v, c, b)
    for part in ("dq", "dkv"):
        if base_entropy is not None and part == "dkv":  # the dkv kernel needs dq's dc: both run
            continue
        table = bwd_configs(D, c is not None, causal, base_entropy is not None)
        default = table["default"]
        fma = {f"defaultfma{n}": dataclasses.replace(default, exp2_fma_cols=n) for n in fma_cols
               if n <= min(default.block_kv_dq, default.block_q_dkv)}
        for name, cfg in [(name, table[name]) for name in configs] + list(fma.items()):
            kernels = ("dq", "dkv") if base_entropy is not None else (part,)
            fn = jax.jit(lambda q, k, v, o, s, d, c, b, cfg=cfg, kernels=kernels: flash_backward(
                q, k, v, o, s, d, logit_scale=a, query_scale=c, key_bias=b, mask=mask,
                config=cfg, kernels=kernels, base_entropy=base_entropy))
            candidates[(part if base_entropy is None else "dq+dkv", name)] = (
                fn, (q, k, v, out, lse, do, c, b))
    if c is not None and base_entropy is None:  # the dq kernel without the dc sums (a constant
        # SSMax s, a stopped beta): its default tiles, and the other dq key tile (64 / 128)
        dq_base = default_backward_block_sizes(D, True, causal, query_scale_grad=False)
        other = 64 if dq_base.block_kv_dq == 128 else 128
        nodc = {"nodc": dq_base, f"nodckv{other}": dataclasses.replace(dq_base, block_kv_dq=other)}
        for name, cfg in nodc.items():
            fn = jax.jit(lambda q, k, v, o, s, d, c, b, cfg=cfg: flash_backward(
                q, k, v, o, s, d, logit_scale=a, query_scale=c, key_bias=b, mask=mask, config=cfg,
                kernels=("dq",), query_scale_grad=False))
            candidates[("dq", name)] = (fn, (q, k, v, out, lse, do, c, b))
    sweeps = stats_configs(D, c is not None, b is not None)
    fma = {f"defaultfma{n}": dataclasses.replace(sweeps["default"], exp2_fma_cols=n)
           for n in fma_cols}
    for name, cfg in [(name, sweeps[name]) for name in stats] + list(fma.items()):
        fn = jax.jit(lambda q, k, c, b, cfg=cfg: flash_stats(
            q, k, logit_scale=a, query_scale=c, key_bias=b, mask=mask, config=cfg,
            query_scale_nonnegative=c is not None))
        candidates[("stats", name)] = (fn, (q, k, c, b))
    if baseline:
        candidates.update(_baseline_candidates(baseline, D, mask, a, (q, k, v, c, b),
                                               (q, k, v, out, lse, do, c, b)))
    results = compare(candidates, rounds=rounds)
    rows, refs = [], {}
    for (kernel, config), (t, outs, err) in results.items():
        outs = None if outs is None else [x for x in jax.tree.leaves(outs) if x is not None]
        refs.setdefault(kernel, outs)
        flops = {"fwd": 1.0, "stats": 1.0, "dq+dkv": 2.5}.get(kernel, 1.25) * fwd_flops
        rows.append(dict(D=D, N=N, causal=causal, flags=flags, kernel=kernel, config=config,
                         ms=None if t is None else t * 1e3,
                         tflops=None if t is None else flops / t / 1e12, error=err,
                         rel_diff_to_first=_rel_diff(outs, refs[kernel])))
        print(rows[-1], flush=True)
    return rows


def _table(rows):
    print("\nms per kernel (TFLOP/s); dq and dkv counted at 1.25 x fwd FLOPs each")
    keys = list(dict.fromkeys((r["D"], r["N"], r["causal"], r["flags"]) for r in rows))
    cols = list(dict.fromkeys((r["kernel"], r["config"]) for r in rows))
    print(f"{'D':>4} {'N':>6} {'c':>2} {'flags':<6} " + " ".join(f"{k + ':' + c:>17}" for k, c in cols))
    by = {(r["D"], r["N"], r["causal"], r["flags"], r["kernel"], r["config"]): r for r in rows}
    for key in keys:
        cells = []
        for kernel, config in cols:
            r = by.get((*key, kernel, config))
            cells.append(f"{'-':>17}" if r is None or r["ms"] is None
                         else f"{r['ms']:8.3f} ({r['tflops']:4.0f})")
        print(f"{key[0]:4d} {key[1]:6d} {int(key[2]):2d} {key[3]:<6} " + " ".join(cells))
    worst = max((r["rel_diff_to_first"] or 0.0 for r in rows), default=0.0)
    print(f"largest relative difference of a config's outputs to the first config's: {worst:.2e}")
    for r in rows:
        if r["error"]:
            print("error:", r["D"], r["N"], r["causal"], r["flags"], r["kernel"], r["config"], r["error"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--causal", default="0,1")
    parser.add_argument("--flags", default="plain,c,b")
    parser.add_argument("--bwd-configs", default="default,first,edge,kv64")
    parser.add_argument("--stats-configs", default="",
                        help="statistics-sweep configs to time too (stats_configs)")
    parser.add_argument("--fma-cols", default="",
                        help="exp2_fma_cols values to time the forward, the fixed-max forward, "
                             "the default statistics sweep and backward kernels with (e.g. 16,32)")
    parser.add_argument("--no-forward", action="store_true", help="time the backward kernels only")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (benchmarks/timing.py)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="B * N")
    parser.add_argument("--out", default=None)
    parser.add_argument("--baseline", default=None,
                        help="importable name of an older copy of pallas_kernels to time beside "
                             "this one (e.g. made by `git archive`; its imports renamed)")
    args = parser.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    configs = [x for x in args.bwd_configs.split(",") if x]
    for name in configs:
        if name not in bwd_configs(64):
            parser.error(f"--bwd-configs: unknown {name!r}; choose from {sorted(bwd_configs(64))}")
    stats = [x for x in args.stats_configs.split(",") if x]
    for name in stats:
        if name not in stats_configs(64):
            parser.error(f"--stats-configs: unknown {name!r}; choose from {sorted(stats_configs(64))}")
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    if jax.default_backend() == "gpu":
        warm_device()
    rows = []
    for D in ints(args.dims):
        for N in ints(args.lengths):
            for causal in ints(args.causal):
                for flags in args.flags.split(","):
                    rows += measure(D, N, bool(causal), flags, args.rounds, configs, args.tokens,
                                    args.baseline, stats, not args.no_forward,
                                    ints(args.fma_cols))
                    if args.out:
                        with open(args.out, "w") as f:
                            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                                           rows=rows), f, indent=1)
    _table(rows)


if __name__ == "__main__":
    if not {"-h", "--help"} & set(sys.argv[1:]):
        require_gpu("benchmarks/kernels.py")
    main()
