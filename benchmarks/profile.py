"""Where the time of one attention call goes, kernel by kernel: ``python benchmarks/profile.py``.

:mod:`benchmarks.attention` times whole calls; this traces ``--steps`` back-to-back calls of each
implementation with ``jax.profiler`` and sums the GPU events of the trace by kernel name, so a gap
between two variants' totals can be read as kernels (the forward, dq, dk/dv, the XLA glue around
them) or as idle time between them. Prints, per implementation, the microseconds per call of each
kernel (largest first; a kernel that runs several times per call split by its order, ``#1``,
``#2``), their sum, and the wall time per call measured around the traced loop.

  PYTHONPATH=. python3 benchmarks/profile.py --impls softmax,ssmax,ssmax_learned --dims 64 \
      --lengths 4096 --causal 1 --modes fwdbwd
"""

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import attention as bench  # noqa: E402
from benchmarks import require_gpu  # noqa: E402
from benchmarks.timing import warm_device  # noqa: E402


def gpu_events(data, steps):
    """``{name: (total_ns, count)}`` over the GPU stream events of a ``jax.profiler.ProfileData``
    that holds ``steps`` calls. A name that runs several times per call (the backward's dq and
    dk/dv kernels are both ``kernel_mosaic_gpu_kernel``) is split by its order within the call:
    ``name#1``, ``name#2``."""
    starts = collections.defaultdict(list)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for ev in line.events:
                starts[ev.name].append((ev.start_ns, ev.duration_ns))
    if not starts:  # say what the trace holds instead
        print("no GPU stream events; planes and lines:",
              [(p.name, [ln.name for ln in p.lines][:6]) for p in data.planes], flush=True)
    totals = collections.defaultdict(lambda: [0.0, 0])
    for name, events in starts.items():
        events.sort()
        per_call = len(events) // steps if len(events) % steps == 0 else 1
        for i, (_, ns) in enumerate(events):
            key = f"{name}#{i % per_call + 1}" if per_call > 1 else name
            totals[key][0] += ns
            totals[key][1] += 1
    return totals


def profile(fn, args, steps):
    """Per-call microseconds of each GPU kernel of ``fn(*args)`` and the wall time per call."""
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        out = None
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        wall = (time.perf_counter() - t0) / steps
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        totals = gpu_events(jax.profiler.ProfileData.from_file(files[0]), steps) if files else {}
    per_call = {name: (ns / steps / 1e3, n / steps) for name, (ns, n) in totals.items()}
    return per_call, wall * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", default="softmax,ssmax,ssmax_learned")
    parser.add_argument("--dims", default="64")
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--causal", default="0,1")
    parser.add_argument("--modes", default="fwdbwd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=8, help="kernels listed per implementation")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    if jax.default_backend() == "gpu":
        warm_device()
    rows = []
    for D in map(int, args.dims.split(",")):
        for N in map(int, args.lengths.split(",")):
            B = bench.TOKENS // N
            q, k, v = bench._random_qkv(0, B, N, D)
            for causal in (bool(int(c)) for c in args.causal.split(",")):
                for mode in args.modes.split(","):
                    for impl in args.impls.split(","):
                        cand = bench.candidate(impl, D, N, causal, mode, q, k, v)
                        if cand is None:
                            continue
                        fn, call_args = cand
                        try:
                            kernels, wall = profile(fn, call_args, args.steps)
                        except Exception as e:  # noqa: BLE001 - a row per failure
                            print(f"{impl} D={D} N={N} causal={causal} {mode}: "
                                  f"{type(e).__name__}: {str(e)[:200]}", flush=True)
                            continue
                        total = sum(us for us, _ in kernels.values())
                        print(f"\n{impl} D={D} N={N} causal={int(causal)} {mode}: wall "
                              f"{wall:8.1f} us/call, kernels {total:8.1f} us/call "
                              f"({len(kernels)} names)", flush=True)
                        ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])
                        for name, (us, n) in ranked[:args.top]:
                            print(f"  {us:8.1f} us  x{n:4.1f}  {name[:90]}")
                        rest = sum(us for _, (us, _) in ranked[args.top:])
                        if rest:
                            print(f"  {rest:8.1f} us  (other {len(ranked) - args.top} names)")
                        rows.append(dict(impl=impl, D=D, N=N, causal=causal, mode=mode,
                                         wall_us=wall, kernel_us=total,
                                         kernels={n: us for n, (us, _) in ranked}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    if not {"-h", "--help"} & set(sys.argv[1:]):
        require_gpu("benchmarks/profile.py")
    main()
