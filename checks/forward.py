"""GPU check of the fused forward kernels: ``python -m checks.forward [--quick] [--json PATH]``.

Without a GPU it exits at once with status 2, unless ``--interpret`` asks for the CPU interpreter.

Runs :func:`pallas_kernels.forward.flash_forward` (and :func:`flash_stats`) on fresh random inputs
at realistic sizes (up to N = 16384, D = 256) and compares each with a float32 reference computed
on a random subset of query rows (all keys), so the reference never holds a T x S matrix of the
full problem. Before every kernel call an XLA computation runs (leaving shared memory dirty) and
the device allocator is poisoned: a large NaN buffer is allocated and freed, so an output element
the kernel fails to write shows up as NaN.

Prints a pass/fail table: relative error ``||out - ref|| / ||ref||`` over the checked rows (bf16 /
f16 inputs against float32: pass below 1e-2) and max abs errors of lse / entropy / max weight
(pass below 1e-2 after scaling by ``max(1, |ref|)``), for the forward, the statistics sweep
(``st.``) and the forward given the sweep's row max (``fx.``: output, and the worst statistic).
"""

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from checks.common import gpu_missing, parse_overrides
from pallas_kernels.common import MaskSpec, visible
from pallas_kernels.forward import BlockSizes, default_stats_block_sizes, flash_forward, flash_stats
from pallas_kernels.forward import _blocks as forward_blocks

REL_TOL = 1e-2


STAT_TOL = 1e-2
ROWS = 256


def _poison(nbytes=2 << 30):
    """Fills ~nbytes of device memory with NaN and frees it (outputs reuse it next)."""
    x = jnp.full((nbytes // 4,), jnp.nan, jnp.float32)
    x.block_until_ready()
    del x


def reference_rows(q, k, v, rows, *, a, c, b, spec):
    """float32 out / lse / entropy / max weight for query rows ``rows`` (all keys)."""
    B, _, N, _ = q.shape
    K = k.shape[2]
    qs = q[:, rows].astype(jnp.float32)  # [B, r, N, H]
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    kf = jnp.repeat(kf, N // K, axis=2)
    vf = jnp.repeat(vf, N // K, axis=2)
    hi = jax.lax.Precision.HIGHEST
    u = a * jnp.einsum("BTNH,BSNH->BNTS", qs, kf, precision=hi)
    if b is not None:
        u = u + jnp.repeat(b, N // K, axis=1)[:, :, None, :]
    z = u if c is None else c[:, :, rows, None] * u
    S = k.shape[1]
    vis = visible(spec, jnp.arange(B)[:, None, None], jnp.asarray(rows)[None, :, None],
                  jnp.arange(S)[None, None, :])[:, None]
    zm = jnp.where(vis, z, -1e30)
    m = zm.max(-1, keepdims=True)
    e = jnp.where(vis, jnp.exp(zm - m), 0.0)
    tot = e.sum(-1, keepdims=True)
    p = e / jnp.where(tot > 0, tot, 1.0)
    lse = jnp.where(tot > 0, m + jnp.log(jnp.where(tot > 0, tot, 1.0)), 0.0)[..., 0]
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
    out = jnp.einsum("BNTS,BSNH->BTNH", p, vf, precision=hi)
    return out, lse, ent, p.max(-1)


CASES = [
    # name, B, T, S, N, K, H, dtype, mask kwargs, per-query scale (True: in [0.5, 2]; "signed":
    # in [-2, 2], no nonnegative promise), per-key bias (True: N(0, 1); "rbf": RBF-like, see
    # _make), registers
    ("softmax", 2, 4096, 4096, 8, 8, 128, "bfloat16", {}, False, False, 0),
    ("softmax causal", 2, 4096, 4096, 8, 8, 128, "bfloat16", dict(is_causal=True), False, False, 0),
    ("softmax f16 D64", 2, 4096, 4096, 8, 8, 64, "float16", {}, False, False, 0),
    ("softmax D256 causal", 1, 4096, 4096, 8, 8, 256, "bfloat16", dict(is_causal=True), False,
     False, 0),
    ("ssmax+rbf GQA causal", 2, 4096, 4096, 8, 2, 128, "bfloat16", dict(is_causal=True), True,
     True, 0),
    ("ragged lengths D96", 2, 3000, 2900, 4, 4, 96, "bfloat16",
     dict(q_lengths=True, kv_lengths=True), True, False, 0),
    ("window+registers", 1, 4096, 4096, 4, 4, 128, "bfloat16", dict(local_window_size=(500, 20)),
     False, True, 4),
    ("segments causal", 2, 2048, 2048, 4, 4, 64, "bfloat16",
     dict(segments=True, is_causal=True), False, False, 0),
    ("long N=16384 D=256", 1, 16384, 16384, 2, 2, 256, "bfloat16", dict(is_causal=True), True,
     True, 0),
    ("long N=16384 D=128", 1, 16384, 16384, 4, 4, 128, "bfloat16", {}, False, True, 0),
    ("ssmax D64 causal", 2, 4096, 4096, 8, 8, 64, "bfloat16", dict(is_causal=True), True, False,
     0),
    ("rbf D64 segments", 2, 4096, 4096, 8, 4, 64, "bfloat16", dict(segments=True), False, "rbf",
     0),
    ("rbf D64 f16 causal", 2, 4096, 4096, 8, 8, 64, "float16", dict(is_causal=True), False,
     "rbf", 0),
    # c of either sign, no promise: the folding tiles negate Q's rows where c < 0 (row_flip)
    ("signed c D64", 2, 4096, 4096, 8, 8, 64, "bfloat16", {}, "signed", False, 0),
    ("signed c D128 causal", 2, 4096, 4096, 8, 8, 128, "bfloat16", dict(is_causal=True),
     "signed", False, 0),
    # D = 64 causal over <= 2048 keys: the short-causal 128-key tiles; ragged S
    ("softmax D64 causal N1000", 4, 1000, 1000, 8, 8, 64, "bfloat16", dict(is_causal=True),
     False, False, 0),
    # D = 256 with c alone: the folding tiles (row flip) and the V-less 128-key sweep
    ("signed c D256", 1, 4096, 4096, 4, 4, 256, "bfloat16", {}, "signed", False, 0),
]


def select_cases(text: str) -> list:
    """The cases of ``--cases``: comma-separated names (``CASES``' first fields) or indices."""
    by_name = {c[0]: c for c in CASES}
    out = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        if item in by_name:
            out.append(by_name[item])
        elif item.isdigit() and int(item) < len(CASES):
            out.append(CASES[int(item)])
        else:
            raise ValueError(f"--cases: {item!r} is neither a case name ({', '.join(by_name)}) nor "
                             f"an index in [0, {len(CASES)})")
    return out


def _make(case, seed):
    name, B, T, S, N, K, H, dtype, mask_kw, use_c, use_b, R = case
    dtype = jnp.dtype(dtype)
    ks = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S + R, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S + R, K, H), jnp.float32).astype(dtype)
    c = None
    if use_c:  # "signed": either sign
        c = jax.random.uniform(ks[3], (B, N, T), minval=-2.0 if use_c == "signed" else 0.5,
                               maxval=2.0)
    b = jax.random.normal(ks[4], (B, K, S + R)) if use_b else None
    if use_b == "rbf":  # RBF's -gamma ||k_j||^2 (gamma = 1/sqrt(H)), shifted: large |b|, wide spread
        b = 30.0 - jnp.sum(k.astype(jnp.float32) ** 2, axis=-1).transpose(0, 2, 1) / np.sqrt(H)
    kw = dict(mask_kw)
    if kw.pop("q_lengths", False):
        kw["q_lengths"] = jax.random.randint(ks[5], (B,), T // 2, T + 1)
    if kw.pop("kv_lengths", False):
        kw["kv_lengths"] = jax.random.randint(ks[6], (B,), S // 2, S + 1)
    if kw.pop("segments", False):
        kw["q_segment_ids"] = jnp.sort(jax.random.randint(ks[7], (B, T), 0, 5), axis=1)
        kw["kv_segment_ids"] = kw["q_segment_ids"][:, :S]
    spec = MaskSpec(num_registers=R, **kw)
    return q, k, v, c, b, spec


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _stat_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref) / np.maximum(1.0, np.abs(ref))))


def check_case(case, seed=0, flip_mma_bias=False, overrides=None, stats_overrides=None):
    """Runs one case; returns a dict of errors and pass flags.

    ``flip_mma_bias``: for a case with a key bias, also run the forward (with statistics) and the
    statistics sweep with ``BlockSizes.mma_bias`` flipped from the default (the other way of
    adding the bias) and check them too (keys ``flip_*``). ``overrides``: fields of the forward's
    default :class:`BlockSizes` to replace in both forwards (``--set``; the sweep keeps its own).
    ``stats_overrides``: fields of the statistics sweep's default :class:`BlockSizes` to replace
    (``--stats-set``).
    """
    q, k, v, c, b, spec = _make(case, seed)
    a = 1.0 / np.sqrt(q.shape[-1])
    T = q.shape[1]
    rows = np.sort(np.random.default_rng(seed).choice(T, size=min(ROWS, T), replace=False))
    # The reference runs first: the kernels then start on shared memory that XLA's kernels left
    # dirty (a statistics kernel without any V pipeline failed only after such work; docs/kernels.md).
    r_out, r_lse, r_ent, r_mw = reference_rows(q, k, v, rows, a=float(a), c=c, b=b, spec=spec)
    jax.block_until_ready(r_out)
    _poison()
    t0 = time.perf_counter()
    # c > 0 (but for "signed" cases): the forward takes the promise, as the dispatcher does for
    # SSMax / adaptive; the statistics sweep below runs without it (the row flip where it folds).
    nonneg = c is not None and case[9] != "signed"
    config = None
    if overrides:
        config = dataclasses.replace(forward_blocks(q, v, None, c, b)[1], **overrides)
    out, lse, ent, mw = flash_forward(q, k, v, logit_scale=float(a), query_scale=c, key_bias=b,
                                      mask=spec, return_stats=True, config=config,
                                      query_scale_nonnegative=nonneg)
    out.block_until_ready()
    elapsed = time.perf_counter() - t0
    jax.block_until_ready(reference_rows(q, k, v, rows[:8], a=float(a), c=c, b=b, spec=spec))
    _poison()
    stats_config = None
    if stats_overrides:
        stats_config = dataclasses.replace(forward_blocks(
            q, k, None, c, b, default_stats_block_sizes)[1], **stats_overrides)
    lse2, ent2, row_max = flash_stats(q, k, logit_scale=float(a), query_scale=c, key_bias=b,
                                      mask=spec, return_row_max=True, config=stats_config)
    # the forward given the sweep's row max (no online max), as adaptive temperature runs it
    _poison()
    out5, lse5, ent5, mw5 = flash_forward(
        q, k, v, logit_scale=float(a), query_scale=c, key_bias=b, mask=spec, return_stats=True,
        query_scale_nonnegative=nonneg, row_max=row_max, config=config)
    res = dict(
        name=case[0], shape=f"B{q.shape[0]} T{T} S{k.shape[1]} N{q.shape[2]} K{k.shape[2]} "
        f"H{q.shape[3]} {q.dtype}",
        out_rel=_rel(out[:, rows], r_out),
        lse=_stat_err(lse[:, :, rows], r_lse),
        entropy=_stat_err(ent[:, :, rows], r_ent),
        max_weight=_stat_err(mw[:, :, rows], r_mw),
        stats_lse=_stat_err(lse2[:, :, rows], r_lse),
        stats_entropy=_stat_err(ent2[:, :, rows], r_ent),
        fixed_out_rel=_rel(out5[:, rows], r_out),
        fixed_stats=max(_stat_err(x[:, :, rows], ref) for x, ref in (
            (lse5, r_lse), (ent5, r_ent), (mw5, r_mw))),
        nan=bool(any(np.isnan(np.asarray(x, np.float32)).any() for x in (out, out5)) or any(
            np.isnan(np.asarray(x)).any() for x in (lse, ent, mw, lse2, ent2, lse5, ent5, mw5))),
        first_call_s=elapsed,
    )
    res["pass"] = bool(not res["nan"] and max(res["out_rel"], res["fixed_out_rel"]) < REL_TOL
                       and max(res[key] for key in ("lse", "entropy", "max_weight", "stats_lse",
                                                    "stats_entropy", "fixed_stats")) < STAT_TOL)
    if flip_mma_bias and b is not None:
        cfg = forward_blocks(q, v, None, c, b)[1]
        cfg = dataclasses.replace(cfg, mma_bias=not cfg.mma_bias)
        _poison()
        out3, lse3, ent3, mw3 = flash_forward(
            q, k, v, logit_scale=float(a), query_scale=c, key_bias=b, mask=spec, config=cfg,
            return_stats=True, query_scale_nonnegative=nonneg)
        _poison()
        lse4, ent4 = flash_stats(q, k, logit_scale=float(a), query_scale=c, key_bias=b,
                                 mask=spec, config=cfg)
        res["flip_out_rel"] = _rel(out3[:, rows], r_out)
        stats = dict(lse=(lse3, r_lse), entropy=(ent3, r_ent), max_weight=(mw3, r_mw),
                     stats_lse=(lse4, r_lse), stats_entropy=(ent4, r_ent))
        for key, (x, ref) in stats.items():
            res["flip_" + key] = _stat_err(x[:, :, rows], ref)
        res["nan"] = bool(res["nan"] or np.isnan(np.asarray(out3, np.float32)).any())
        res["pass"] = bool(res["pass"] and not res["nan"] and res["flip_out_rel"] < REL_TOL
                           and max(res["flip_" + key] for key in stats) < STAT_TOL)
    return res


def _write(path, results):
    with open(path, "w") as f:
        json.dump(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                       results=results), f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the first three cases")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--skip-cases", action="store_true", help="run no check case")
    parser.add_argument("--flip-mma-bias", action="store_true",
                        help="on the cases with a key bias, also check the forward with "
                             "BlockSizes.mma_bias flipped from its default")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names or 0-based indices to run, default all")
    parser.add_argument("--set", default="",
                        help="forward BlockSizes fields to override, e.g. intra_overlap=1,pingpong=0")
    parser.add_argument("--stats-set", default="",
                        help="statistics-sweep BlockSizes fields to override, e.g. sweep_skips_v=1")
    parser.add_argument("--interpret", action="store_true",
                        help="run without a GPU, in the Mosaic GPU interpreter (hours at these sizes)")
    args = parser.parse_args(argv)
    if gpu_missing(args.interpret, "python -m checks.forward",
                   "pass --interpret to run it in the (very slow) CPU interpreter"):
        return 2
    overrides = parse_overrides(args.set, BlockSizes)
    stats_overrides = parse_overrides(args.stats_set, BlockSizes)
    print(f"devices: {jax.devices()}  jax {jax.__version__}", flush=True)
    cases = [] if args.skip_cases else CASES[:3] if args.quick else CASES
    if args.cases:
        try:
            cases = select_cases(args.cases)
        except ValueError as err:
            parser.error(str(err))
    results = []
    for case in cases:
        try:
            res = check_case(case, flip_mma_bias=args.flip_mma_bias, overrides=overrides,
                             stats_overrides=stats_overrides)
        except Exception as e:  # noqa: BLE001 - report and go on with the other cases
            res = dict(name=case[0], shape="", error=f"{type(e).__name__}: {str(e)[:2000]}",
                       **{"pass": False})
        results.append(res)
        print(json.dumps(res), flush=True)
        if args.json:  # after every case: a cut-off run keeps its results
            _write(args.json, results)
    print(f"\n{'case':<24} {'shape':<40} {'out rel':>9} {'lse':>9} {'entropy':>9} {'maxw':>9} "
          f"{'st.lse':>9} {'st.ent':>9} {'fx.out':>9} {'fx.stat':>9}  result")
    for r in results:
        if "error" in r:
            print(f"{r['name']:<24} {'':<40} ERROR {r['error'][:200]}")
            continue
        print(f"{r['name']:<24} {r['shape']:<40} {r['out_rel']:9.2e} {r['lse']:9.2e} "
              f"{r['entropy']:9.2e} {r['max_weight']:9.2e} {r['stats_lse']:9.2e} "
              f"{r['stats_entropy']:9.2e} {r['fixed_out_rel']:9.2e} {r['fixed_stats']:9.2e}  "
              f"{'PASS' if r['pass'] else 'FAIL'}")
        if "flip_out_rel" in r:
            keys = ("out_rel", "lse", "entropy", "max_weight", "stats_lse", "stats_entropy")
            print(f"{'  mma_bias flipped':<24} {'':<40} "
                  + " ".join(f"{r['flip_' + key]:9.2e}" for key in keys))
    ok = all(r["pass"] for r in results)
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
