"""Attention speed on one GPU, every implementation in one process: ``python benchmarks/attention.py``.

Measures, bf16, ``B * N = 16384`` tokens, ``H = 16`` heads, head dims D and sequence lengths N:

* ours: ``jaxattn.attention(..., implementation="pallas")`` for every variant the kernels run,
  each with its default options (:data:`ROWS` says what each row runs): softmax, temperature
  (``Softmax(temperature=0.7)``, the variant's one option), scalable_softmax, rbf,
  adaptive_temperature (the default: the gradient flows through beta) and hardmax (forward-only:
  forward cells only); rows with a non-default option are named for it: ``adaptive_sg``
  (``stop_gradient_beta=True``, faster backward) and
  ``ssmax_learned`` (scalable_softmax with ``s`` a traced argument, one value per head, as a
  model learns it; forward+backward also differentiates ``s``);
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (no mask array);
* ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``;
* ``mgpu``: jax's ``pallas/ops/gpu/attention_mgpu.attention`` (float16 inputs, its only dtype);
* ``cudnn_rbf``: RBF through cuDNN with the key norm folded into extra head dims
  (``q' = [q, 1, 0..]``, ``k' = [2 gamma k, -gamma ||k||^2, 0..]``, scale 1);
* ``tokamax`` / ``tokamax_rbf``: tokamax 0.0.17's Mosaic GPU kernel
  (``tokamax.dot_product_attention(..., implementation="mosaic")``), softmax and RBF through its
  broadcast ``[B, N, 1, S]`` bias. tokamax is not a dependency: on the GPU machine it is carried
  as wheels (``../shared/tools/gpu-wheels --tokamax``); without it these rows report the
  ImportError.

FLOPs: forward ``4 B H N^2 D`` (halved when causal), forward+backward 3.5x that. Time: every
implementation of one cell (D, N, causal, mode) is compiled and warmed up, then timed in
``--rounds`` interleaved rounds of back-to-back calls (:func:`benchmarks.timing.compare`: steady
clocks, no per-call dispatch latency, the same conditions for every column of a row). Prints
TFLOP/s and the ratios to cuDNN and to our softmax, and writes JSON (device, versions, rows).
"""

import argparse
import functools
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jaxattn  # noqa: E402
from benchmarks import require_gpu  # noqa: E402
from benchmarks.timing import compare, paired_ratio, warm_device  # noqa: E402
from jaxattn import variants  # noqa: E402

HEADS = 16
TOKENS = 16384
OURS = {
    "softmax": variants.Softmax(),
    "temperature": variants.Softmax(temperature=0.7),
    "ssmax": variants.ScalableSoftmax(),
    "rbf": variants.RBF(),
    "adaptive": variants.AdaptiveTemperature(),
    "adaptive_sg": variants.AdaptiveTemperature(stop_gradient_beta=True),
    "hardmax": variants.Hardmax(),  # forward-only: no forward+backward cells
}

# What each row runs, as the summary table shows it; also the table's row order.
ROWS = {
    "softmax": "ours: `Softmax()`",
    "temperature": "ours: `Softmax(temperature=0.7)`",
    "ssmax": "ours: `ScalableSoftmax()` (s = 0.43, a constant)",
    "ssmax_learned": "ours: `ScalableSoftmax(s)`, s a traced `[N]` array (non-default: learned)",
    "rbf": "ours: `RBF()`",
    "adaptive": "ours: `AdaptiveTemperature()` (default: gradient through beta)",
    "adaptive_sg": "ours: `AdaptiveTemperature(stop_gradient_beta=True)` (non-default)",
    "hardmax": "ours: `Hardmax()` (forward only)",
    "cudnn": "`jax.nn.dot_product_attention(implementation=\"cudnn\")`",
    "xla": "`jax.nn.dot_product_attention(implementation=\"xla\")`",
    "mgpu": "jax's Pallas `attention_mgpu` (float16)",
    "tokamax": "tokamax 0.0.17 Mosaic GPU softmax",
    "tokamax_rbf": "tokamax 0.0.17 with the RBF key bias",
    "cudnn_rbf": "cuDNN with RBF folded into extra head dims",
}


# Variants with a learned parameter: (variant from the parameter, the parameter's initial value).
LEARNED = {
    "ssmax_learned": (variants.ScalableSoftmax, lambda: jnp.full((HEADS,), 0.43, jnp.float32)),
}


def _ours_learned(make_variant):
    def f(q, k, v, param, causal):
        return jaxattn.attention(q, k, v, variant=make_variant(param), is_causal=causal,
                                 implementation="pallas")
    return f


def _ours(variant):
    def f(q, k, v, causal):
        return jaxattn.attention(q, k, v, variant=variant, is_causal=causal,
                                 implementation="pallas")
    return f


def _rbf_bias(k, gamma):
    """``-gamma ||k_j||^2``, the RBF logits' per-key term, as a ``[B, N, 1, S]`` float32 bias."""
    kf = k.astype(jnp.float32)
    return (-gamma * jnp.sum(kf * kf, axis=-1)).transpose(0, 2, 1)[:, :, None, :]


def _tokamax(q, k, v, causal):
    import tokamax
    return tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation="mosaic")


def _tokamax_rbf(q, k, v, causal):
    """RBF = softmax(2 gamma q.k - gamma ||k||^2) (the ||q||^2 term cancels), gamma = 1/sqrt(D)."""
    import tokamax
    gamma = 1.0 / math.sqrt(q.shape[-1])
    bias = _rbf_bias(k, gamma)
    return tokamax.dot_product_attention(q, k, v, bias=bias, scale=2 * gamma, is_causal=causal,
                                         implementation="mosaic")


def _cudnn(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def _xla(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


def _cudnn_rbf(q, k, v, causal):
    H = q.shape[-1]
    gamma = 1.0 / math.sqrt(H)
    kf = k.astype(jnp.float32)
    norm = -gamma * jnp.sum(kf * kf, axis=-1, keepdims=True)
    pad = 8
    ones = jnp.ones(q.shape[:-1] + (1,), q.dtype)
    q2 = jnp.concatenate([q, ones, jnp.zeros(q.shape[:-1] + (pad - 1,), q.dtype)], axis=-1)
    k2 = jnp.concatenate([(2 * gamma * kf).astype(k.dtype), norm.astype(k.dtype),
                          jnp.zeros(k.shape[:-1] + (pad - 1,), k.dtype)], axis=-1)
    v2 = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, pad)))
    out = jax.nn.dot_product_attention(q2, k2, v2, scale=1.0, is_causal=causal,
                                       implementation="cudnn")
    return out[..., :H]


def _mgpu(D):
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am
    block_kv = {64: 256, 128: 128, 256: 64}[D]

    def f(q, k, v, causal):
        cfg = am.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=causal,
                              block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
        return am.attention(q.astype(jnp.float16) * (1.0 / math.sqrt(D)), k.astype(jnp.float16),
                            v.astype(jnp.float16), cfg)
    return f


def _random_qkv(seed, B, N, D):
    """Fresh standard-normal bf16 ``q, k, v`` of shape ``[B, N, HEADS, D]``."""
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, (B, N, HEADS, D), jnp.float32).astype(jnp.bfloat16)
                 for kk in ks)


def _fwd_bwd(f, num_args=3):
    def loss(*args, causal):
        return jnp.sum(f(*args, causal=causal).astype(jnp.float32) ** 2)
    grad = jax.grad(loss, argnums=tuple(range(num_args)))
    return grad


def _jitted(f, causal, mode, num_args=3):
    fn = f if mode == "fwd" else _fwd_bwd(f, num_args)
    return jax.jit(functools.partial(fn, causal=causal))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="64,128,256")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--causal", default="0,1")
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--impls", default="softmax,temperature,ssmax,ssmax_learned,rbf,adaptive,"
                                           "adaptive_sg,hardmax,cudnn,cudnn_rbf",
                        help=f"rows to time, from {','.join(ROWS)}")
    parser.add_argument("--rounds", type=int, default=7,
                        help="timed rounds per cell (benchmarks/timing.py)")
    parser.add_argument("--out", default=None, help="raw JSON path (default out/bench/...)")
    parser.add_argument("--summary", default=None,
                        help="also write the summary (benchmarks/summary.py) here at the end")
    parser.add_argument("--warmup-cell", type=int, default=1,
                        help="time the first cell this many extra times first and discard them "
                             "(its first timing ran ~25 %% slow for every column in four sweeps)")
    parser.add_argument("--tune", action="store_true",
                        help="only the forward block-size sweep: flash_forward per BlockSizes "
                             "candidate (see tune_forward) at each --dims / --lengths / --causal")
    parser.add_argument("--tune-flags", default="plain,b",
                        help="--tune problems: plain, b (key bias), c (per-query scale)")
    parser.add_argument("--tune-block-kv", default="64,128,256", help="--tune key tiles")
    parser.add_argument("--tune-stages", default="2,3,4", help="--tune pipeline depths")
    parser.add_argument("--tune-mma", default="0",
                        help="--tune BlockSizes.mma_bias values (0,1 to compare; flag b only)")
    parser.add_argument("--memory", action="store_true",
                        help="only the memory target: B=1, H=16, D=128, N=131072, fwd and fwd+bwd "
                             "of each of our variants, once each")
    args = parser.parse_args(argv)
    if args.warmup_cell < 0:
        parser.error(f"--warmup-cell must be >= 0, got {args.warmup_cell}")
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in ROWS]
    if unknown:
        parser.error(f"--impls: unknown {unknown}; choose from {','.join(ROWS)}")
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, jax {jax.__version__}", flush=True)
    if args.memory:
        return memory_check([i for i in impls if i in OURS])
    if args.tune:
        ints = lambda x: tuple(int(i) for i in x.split(","))
        rows = tune_forward(ints(args.dims), ints(args.lengths),
                            [bool(c) for c in ints(args.causal)], args.rounds,
                            flags=tuple(args.tune_flags.split(",")),
                            block_kvs=ints(args.tune_block_kv), stages=ints(args.tune_stages),
                            mmas=tuple(bool(f) for f in ints(args.tune_mma)))
        if args.out:
            _write(args.out, dev, rows)
        return None
    if jax.default_backend() == "gpu":
        warm_device()
    rows = []
    path = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "out", "bench",
                                    f"speed-{dev.device_kind.replace(' ', '_')}-"
                                    f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    command = "python3 -m benchmarks speed " + " ".join(argv if argv is not None else sys.argv[1:])
    for D in map(int, args.dims.split(",")):
        for N in map(int, args.lengths.split(",")):
            B = max(1, TOKENS // N)
            q, k, v = _random_qkv(N + D, B, N, D)
            for causal in map(bool, map(int, args.causal.split(","))):
                flops = 4 * B * HEADS * N * N * D / (2 if causal else 1)
                for mode in args.modes.split(","):
                    total = flops * (3.5 if mode == "fwdbwd" else 1.0)
                    cands = {impl: c for impl in impls
                             if (c := candidate(impl, D, N, causal, mode, q, k, v)) is not None}
                    if not rows and jax.default_backend() == "gpu":
                        for _ in range(args.warmup_cell):
                            _discarded_cell(cands, args.rounds, total)
                    per_round = {}
                    results = compare(cands, rounds=args.rounds, rounds_out=per_round)
                    for impl, (t, _, err) in results.items():
                        row = dict(D=D, N=N, B=B, causal=causal, mode=mode, impl=impl,
                                   time_s=t, tflops=None if t is None else total / t / 1e12,
                                   error=err, round_times_s=per_round.get(impl))
                        rows.append(row)
                        tf = "-" if t is None else f"{row['tflops']:.0f}"
                        print(f"D={D:<4} N={N:<6} causal={int(causal)} {mode:<7} {impl:<12} "
                              f"{tf:>6} TFLOP/s {'' if err is None else err}", flush=True)
                    _write(path, dev, rows, command)  # after every cell: a cut-off run keeps its rows
    _summary(rows)
    print(f"wrote {path}")
    if args.summary:
        from benchmarks import summary
        with open(path) as f:
            summary.write_summary(args.summary, summary.summarize([json.load(f)], command.strip()))
        print(f"wrote {args.summary}")


def _discarded_cell(cands, rounds, flops):
    """Times a cell and prints it as discarded: the first cell a process times.

    In four H200 sweeps the first cell of the forward process (D = 64, N = 4096,
    non-causal) ran ~25 % slow for every column, cuDNN included, with a round-to-round spread of
    up to 60 % (741-1204 us for one call), after :func:`warm_device`'s 3 s of matmuls; the cells
    after it were steady (spread < 5 %)."""
    results = compare(cands, rounds=rounds)
    tf = {impl: "-" if t is None else f"{flops / t / 1e12:.0f}"
          for impl, (t, _, _) in results.items()}
    print("warm-up timing of the first cell (discarded): "
          + ", ".join(f"{impl} {v}" for impl, v in tf.items()), flush=True)


def candidate(impl, D, N, causal, mode, q, k, v):
    """``(jitted fn, args)`` of one implementation for one cell, or None where it is left out
    (``mgpu`` causal forward+backward; ``xla`` above N = 4096: T x S logits, minutes and tens of
    GB)."""
    if impl in LEARNED:
        make, init = LEARNED[impl]
        return _jitted(_ours_learned(make), causal, mode, num_args=4), (q, k, v, init())
    if impl in OURS:
        if mode == "fwdbwd" and not OURS[impl].differentiable:
            return None
        f = _ours(OURS[impl])
    elif impl == "mgpu":
        if causal and mode == "fwdbwd":
            return None
        f = _mgpu(D)
    else:
        f = dict(cudnn=_cudnn, xla=_xla, cudnn_rbf=_cudnn_rbf, tokamax=_tokamax,
                 tokamax_rbf=_tokamax_rbf)[impl]
    if impl == "xla" and N > 4096:
        return None
    return _jitted(f, causal, mode), (q, k, v)


def _write(path, dev, rows, command=None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(device=dev.device_kind, date=time.strftime("%Y-%m-%d"), command=command,
                       jax=jax.__version__, python=platform.python_version(), heads=HEADS,
                       tokens=TOKENS, rows=rows), f, indent=1)
    os.replace(tmp, path)


def tune_candidates(D, block_kvs=(64, 128, 256), stages=(2, 3, 4), mmas=(False,)):
    """Forward :class:`BlockSizes` worth timing at padded head dim ``D`` (shared memory permitting);
    ``mmas``: the ``mma_bias`` values to try (it only changes problems with a key bias)."""
    from pallas_kernels.forward import BlockSizes
    out = []
    for block_kv in block_kvs:
        for steps in stages:
            for mma in mmas:
                # Q tiles + K/V ring (+ the bias operands), 2 bytes each
                width = D + (16 if mma else 0)
                smem = 2 * (2 * 64 * width + steps * block_kv * (D + width))
                if smem > 226 * 1024:  # the H100/H200 limit is 227 KiB; barriers and the rest
                    continue
                for fold in (False, True):
                    out.append(BlockSizes(block_q=64, block_kv=block_kv,
                                          max_concurrent_steps=steps, fold_scale=fold,
                                          mma_bias=mma))
    return out


def _default(D, flag, N=0, causal=False):
    from pallas_kernels.forward import default_block_sizes
    return default_block_sizes(D, flag == "c", flag == "b", causal_keys=N if causal else 0)


def tune_forward(dims, lengths, causals, rounds, flags=("plain", "b"), block_kvs=(64, 128, 256),
                 stages=(2, 3, 4), mmas=(False,)):
    """Times ``flash_forward`` per :func:`tune_candidates` entry and per problem flag.

    Flags: ``plain``; ``b``, an RBF-like key bias (``-||k||^2 / 2``); ``c``, a positive per-query
    scale declared nonnegative (SSMax / adaptive). Every candidate of one (D, N, causal) is timed
    in the same interleaved rounds; prints TFLOP/s per config and returns the rows.
    """
    from pallas_kernels.common import MaskSpec
    from pallas_kernels.forward import flash_forward
    rows = []
    for D in dims:
        for N in lengths:
            B = max(1, TOKENS // N)
            q, k, v = _random_qkv(N + D, B, N, D)
            bias = jnp.transpose(-0.5 * jnp.sum(k.astype(jnp.float32) ** 2, -1), (0, 2, 1))
            scale = jnp.linspace(0.5, 1.5, B * HEADS * N, dtype=jnp.float32).reshape(B, HEADS, N)
            for causal in causals:
                flops = 4 * B * HEADS * N * N * D / (2 if causal else 1)
                cands = {}
                for cfg in tune_candidates(D, block_kvs, stages, mmas):
                    for flag in flags:
                        if cfg.mma_bias and flag != "b":
                            continue  # the same kernel as without mma_bias
                        c = scale if flag == "c" else None
                        b = bias if flag == "b" else None
                        fn = jax.jit(lambda q, k, v, c, b, cfg=cfg, causal=causal, a=D ** -0.5:
                                     flash_forward(q, k, v, logit_scale=a, query_scale=c,
                                                   key_bias=b, mask=MaskSpec(is_causal=causal),
                                                   config=cfg,
                                                   query_scale_nonnegative=c is not None)[0])
                        cands[(cfg, flag)] = (fn, (q, k, v, c, b))
                for (cfg, flag), (t, _, err) in compare(cands, rounds=rounds).items():
                    rows.append(dict(D=D, N=N, causal=causal, block_kv=cfg.block_kv,
                                     steps=cfg.max_concurrent_steps, fold=cfg.fold_scale,
                                     mma=cfg.mma_bias,
                                     flag=flag, bias=flag == "b", default=cfg == _default(D, flag, N, causal),
                                     tflops=None if t is None else flops / t / 1e12, error=err))
                    res = f"{rows[-1]['tflops']:6.0f} TFLOP/s" if t is not None else err
                    print(f"tune D={D} N={N} causal={int(causal)} block_kv={cfg.block_kv} "
                          f"steps={cfg.max_concurrent_steps} fold={int(cfg.fold_scale)} "
                          f"mma={int(cfg.mma_bias)} "
                          f"flag={flag}: {res}{' (default)' if cfg == _default(D, flag, N, causal) else ''}",
                          flush=True)
    return rows


def memory_check(names, N=131072, D=128):
    """Runs forward and forward+backward once at B=1, H=16, N=131072 (causal) per variant.

    Prints OK with the wall time of the one call (compilation included) and the device's peak
    bytes in use so far, or the error.
    """
    q, k, v = _random_qkv(0, 1, N, D)
    dev = jax.devices()[0]
    for name in names:
        for mode in ("fwd", "fwdbwd") if OURS[name].differentiable else ("fwd",):
            f = _ours(OURS[name])
            fn = f if mode == "fwd" else _fwd_bwd(f)
            try:
                t0 = time.perf_counter()
                jax.block_until_ready(jax.jit(functools.partial(fn, causal=True))(q, k, v))
                stats = dev.memory_stats() or {}
                peak = stats.get("peak_bytes_in_use", 0) / 2**30
                status = f"OK {time.perf_counter() - t0:.1f} s, peak {peak:.2f} GiB"
            except Exception as e:  # noqa: BLE001 - an out-of-memory is the result, not a crash
                status = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"memory B=1 H={HEADS} N={N} D={D} causal {name:<12} {mode:<7} {status}",
                  flush=True)


def speed_ratio(rows_by_key, key, impl, base):
    """How many times faster ``impl`` ran than ``base`` in one cell ``key = (D, N, causal, mode)``:
    the median of the per-round ratios when both rows carry ``round_times_s`` (one ``compare``),
    else the ratio of their TFLOP/s; None when either is missing."""
    a, b = rows_by_key.get((*key, impl)), rows_by_key.get((*key, base))
    if not a or not b or not a.get("tflops") or not b.get("tflops"):
        return None
    ra, rb = a.get("round_times_s"), b.get("round_times_s")
    if ra and rb and len(ra) == len(rb):
        return paired_ratio(rb, ra)
    return a["tflops"] / b["tflops"]


def _summary(rows):
    """Table: TFLOP/s per implementation, then ratios to cuDNN and to our softmax (each the median
    of the per-round ratios)."""
    keys = sorted({(r["D"], r["N"], r["causal"], r["mode"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by_key = {(r["D"], r["N"], r["causal"], r["mode"], r["impl"]): r for r in rows}
    table = {key: r["tflops"] for key, r in by_key.items()}
    print("\nTFLOP/s  (ratio to cuDNN | ratio to our softmax)")
    print(f"{'D':>4} {'N':>6} {'c':>2} {'mode':<7} " + " ".join(f"{i:>18}" for i in impls))
    for key in keys:
        base = table.get((*key, "cudnn"))
        ours = table.get((*key, "softmax"))
        cells = []
        for impl in impls:
            t = table.get((*key, impl))
            if t is None:
                cells.append(f"{'-':>18}")
                continue
            r1 = f"{speed_ratio(by_key, key, impl, 'cudnn'):.2f}" if base else "-"
            r2 = f"{speed_ratio(by_key, key, impl, 'softmax'):.2f}" if ours else "-"
            cells.append(f"{t:6.0f} ({r1}|{r2})".rjust(18))
        print(f"{key[0]:>4} {key[1]:>6} {int(key[2]):>2} {key[3]:<7} " + " ".join(cells))
    peers = [p for p in ("tokamax_rbf", "cudnn_rbf") if p in impls]
    if "rbf" in impls and peers:
        print("\nour RBF speed-up over each RBF workaround (same process)")
        for key in keys:
            ours = table.get((*key, "rbf"))
            cells = [f"{p} {speed_ratio(by_key, key, 'rbf', p):.2f}x" for p in peers
                     if ours and table.get((*key, p))]
            print(f"{key[0]:>4} {key[1]:>6} {int(key[2]):>2} {key[3]:<7} " + "  ".join(cells))


if __name__ == "__main__":
    if not {"-h", "--help"} & set(sys.argv[1:]):
        require_gpu("benchmarks/attention.py")
    main()
