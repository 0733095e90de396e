"""A/B of two checkouts of the library in one process on one card: ``python3 -m benchmarks ab``.

Loads ``jaxattn`` (and the ``pallas_kernels`` it calls) twice, once from this tree and once from
``--base`` (another checkout, e.g. ``git worktree add /tmp/base <commit>``), and times each of our
variants with its default options, cell by cell, both builds in the same interleaved rounds of
:func:`benchmarks.timing.compare`. Prints each cell's paired ratio ``new / base`` (median over
rounds of the per-round ratio: > 1 is slower) and its round-to-round spread (the range of the
per-round ratios), which is what a ratio must leave to count as a change. ``--variants`` also
takes the option cells (``softcap``, ``sinks``, ``hardmax``: the soft cap, sink
logits and hardmax on the fused path), which the default grid leaves out.

Why one process: two processes on one card see different clocks and thermal states (a 2-5 % drift
between runs on the H100), which is larger than what the A/B must resolve.

How the two builds coexist: each is imported with its own ``sys.modules`` entries, and every call
is compiled (traced, with the build's lazy imports resolved) while that build's modules are the
ones installed; the timed rounds then hit the jit caches only, so no call runs the other build's
code.
"""

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import compare, paired_ratio, warm_device  # noqa: E402

PACKAGES = ("jaxattn", "pallas_kernels")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# variant name -> how to build its default spec from a build's `jaxattn.variants`
VARIANTS = {
    "softmax": lambda v: v.Softmax(),
    "temperature": lambda v: v.Softmax(temperature=0.7),
    "ssmax": lambda v: v.ScalableSoftmax(),
    "rbf": lambda v: v.RBF(),
    "adaptive": lambda v: v.AdaptiveTemperature(),
}
# cells of the options every variant composes with: not in the default grid (the GPU A/B times
# the variants' defaults), named with --variants to check a change of the shared tile step
OPTION_CELLS = {
    "softcap": (lambda v: v.Softmax(), lambda: dict(logits_soft_cap=30.0)),
    # one sink logit per query head
    "sinks": (lambda v: v.Softmax(), lambda: dict(sink_logits=jnp.full((HEADS,), 0.5, jnp.float32))),
    "hardmax": (lambda v: v.Hardmax(), dict),  # forward only (the fused path has no backward)
}
HEADS, TOKENS = 16, 16384


def _purge():
    for name in list(sys.modules):
        if name.split(".")[0] in PACKAGES:
            del sys.modules[name]


@contextlib.contextmanager
def installed(root, modules):
    """``root``'s packages as the importable ones: ``modules`` (a dict, filled on first use) keeps
    them across uses."""
    _purge()
    if modules:
        sys.modules.update(modules)
    else:
        sys.path.insert(0, root)
        try:
            importlib.import_module("jaxattn")
            importlib.import_module("jaxattn.variants")
            importlib.import_module("pallas_kernels")
        finally:
            sys.path.remove(root)
        modules.update({n: m for n, m in sys.modules.items() if n.split(".")[0] in PACKAGES})
        got = os.path.dirname(os.path.dirname(os.path.abspath(modules["jaxattn"].__file__)))
        if os.path.realpath(got) != os.path.realpath(root):
            raise RuntimeError(f"imported jaxattn from {got}, not {root}")
    try:
        yield modules["jaxattn"]
    finally:
        _purge()


def _fn(jaxattn, name, causal, mode):
    make, options = (VARIANTS[name], dict) if name in VARIANTS else OPTION_CELLS[name]
    variant, options = make(sys.modules["jaxattn.variants"]), options()

    def fwd(q, k, v):
        return jaxattn.attention(q, k, v, variant=variant, is_causal=causal,
                                 implementation="pallas", **options)

    if mode == "fwd":
        return jax.jit(fwd)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32) ** 2),
                            argnums=(0, 1, 2)))


def cell_parser(prog, description):
    """The argument parser of the A/B's cells (``--base`` and the grid), shared with
    :mod:`benchmarks.same_kernels`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--base", required=True, help="the other checkout's root")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dims", default="64,128,256")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--causal", default="0,1")
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--out", default=None, help="JSON of the rows")
    return parser


def parse_cells(parser, argv):
    """``(args, cells)``: the parsed arguments and the grid's cells ``(D, N, B, causal, mode,
    variant)`` in the order they are run (head dim, length, causal, mode, variant)."""
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS and n not in OPTION_CELLS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from "
                     f"{','.join([*VARIANTS, *OPTION_CELLS])}")
    cells = [(D, N, max(1, TOKENS // N), causal, mode, name)
             for D in map(int, args.dims.split(",")) for N in map(int, args.lengths.split(","))
             for causal in map(bool, map(int, args.causal.split(",")))
             for mode in args.modes.split(",") for name in names
             if not (name == "hardmax" and mode != "fwd")]
    return args, cells


def main(argv=None):
    parser = cell_parser("python3 -m benchmarks ab", __doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args, cells = parse_cells(parser, argv)
    builds = {"new": (HERE, {}), "base": (os.path.abspath(args.base), {})}
    print(f"device {jax.devices()[0].device_kind}, new {HERE}, base {builds['base'][0]}", flush=True)
    if jax.default_backend() == "gpu":
        warm_device()
    rows, inputs = [], {}
    for D, N, B, causal, mode, name in cells:
        if (D, N) not in inputs:
            inputs.clear()
            ks = jax.random.split(jax.random.key(N + D), 3)
            inputs[(D, N)] = tuple(jax.random.normal(x, (B, N, HEADS, D), jnp.float32)
                                   .astype(jnp.bfloat16) for x in ks)
        q, k, v = inputs[(D, N)]
        cands = {}
        for build, (root, modules) in builds.items():
            with installed(root, modules) as jaxattn:
                fn = _fn(jaxattn, name, causal, mode)
                jax.block_until_ready(fn(q, k, v))  # traced and compiled here
            cands[build] = (fn, (q, k, v))
        per_round = {}
        res = compare(cands, rounds=args.rounds, rounds_out=per_round)
        errs = {b: r[2] for b, r in res.items() if r[2]}
        row = dict(variant=name, D=D, N=N, B=B, causal=causal, mode=mode,
                   new_s=res["new"][0], base_s=res["base"][0], errors=errs)
        if not errs:
            ratios = [n / b for n, b in zip(per_round["new"], per_round["base"],
                                            strict=True)]
            row.update(ratio=paired_ratio(per_round["new"], per_round["base"]),
                       spread=max(ratios) - min(ratios),
                       round_ratios=ratios)
        rows.append(row)
        text = (f"ratio {row['ratio']:.3f} spread {row['spread']:.3f}" if not errs
                else f"error {errs}")
        print(f"{name:<12} D={D:<4} N={N:<6} causal={int(causal)} {mode:<7} {text}",
              flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f,
                          indent=1)
    ok = [r for r in rows if "ratio" in r]
    if ok:
        worst = max(ok, key=lambda r: r["ratio"] - r["spread"])
        print(f"\n{len(ok)} cells: new/base {min(r['ratio'] for r in ok):.3f}-"
              f"{max(r['ratio'] for r in ok):.3f}, median {statistics.median(r['ratio'] for r in ok):.3f}; "
              f"spread median {statistics.median(r['spread'] for r in ok):.3f}; slower beyond its "
              f"spread: {sum(r['ratio'] - 1 > r['spread'] for r in ok)} "
              f"(worst {worst['variant']} D={worst['D']} N={worst['N']} causal={int(worst['causal'])} "
              f"{worst['mode']}: {worst['ratio']:.3f} +- {worst['spread']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
