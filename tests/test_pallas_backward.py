"""The fused backward (:mod:`pallas_kernels.backward`) against ``jax.vjp`` of the float32 oracle.

On CPU the two kernels run under the Mosaic GPU interpreter (``plgpu.InterpretGPUParams``, chosen
automatically), whose uninitialised memory -- outputs included, see
:func:`test_interpreter_poisons_unwritten_outputs` -- is NaN: an output element the kernels fail to
write shows up as NaN, which every comparison here rejects. The interpreter runs everything the GPU
kernels run except the three register-operand wgmma products (dq += dZ K, dv += P^T dO,
dk += dZ^T Q), which :func:`pallas_kernels.backward._mma_acc` replaces by ``jnp.dot``; those are
checked on the GPU by ``python -m checks.backward``.

Tolerances (relative Frobenius error per output): the kernels round P and dZ to the 16-bit input dtype
before the products (as every flash backward does); measured errors are about 3e-3 (bf16) and 5e-4
(f16), the bounds are 1e-2 and 3e-3. dc and db are float32 sums of the same float32 dZ as the oracle's.

The interpreter runs each simulated warpgroup as an XLA CPU computation that blocks in barrier
callbacks; with a CPU thread pool smaller than the number of blocked warpgroups it deadlocks (seen
on a 2-core machine). Eight CPU devices (a bigger pool) avoid that, so this module asks for them
when the backend has not started yet.
"""

import dataclasses

import hypothesis
import hypothesis.strategies as st
import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backward
from pallas_kernels.backward import BackwardBlockSizes, default_backward_block_sizes
from pallas_kernels.common import MaskSpec, flash_reference, visible
from tests.interpreter import blocking, needs_interpreter_threads

flash_backward = blocking(backward.flash_backward)

pytestmark = needs_interpreter_threads

TOL = {jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 3e-3}
NAMES = ("dq", "dk", "dv", "dc", "db")


def _inputs(seed, B, T, S, N, K, H, Hv, dtype, use_c, use_b):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, Hv), jnp.float32).astype(dtype)
    dout = jax.random.normal(ks[3], (B, T, N, Hv), jnp.float32).astype(dtype)
    c = jax.random.uniform(ks[4], (B, N, T), jnp.float32, 0.3, 2.0) if use_c else None
    b = jax.random.normal(ks[5], (B, K, S), jnp.float32) if use_b else None
    return q, k, v, dout, c, b


def _reference(q, k, v, dout, c, b, spec, a):
    """Oracle residuals (float32 out, lse) and float32 gradients of all five inputs.

    ``out`` stays float32 so that kernel and oracle see the same ``delta = dO . o``; in training the
    forward's 16-bit output feeds ``delta``, off by its rounding: the kernel's ``dc`` centers that
    error away (``test_dc_centered_with_16bit_out`` runs a bf16 ``out``).
    """
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]

    def f(q, k, v, c, b):
        out, lse = flash_reference(q, k, v, logit_scale=a, query_scale=c, key_bias=b, mask=spec)
        return out, lse

    (out, lse), vjp = jax.vjp(f, *f32, c, b)
    grads = vjp((dout.astype(jnp.float32), jnp.zeros_like(lse)))
    return out, lse, grads


@jax.jit(static_argnames=("a", "config"))
def _backward_jit(q, k, v, out, lse, dout, c, b, spec, a, config):
    return flash_backward(q, k, v, out, lse, dout, logit_scale=a, query_scale=c, key_bias=b,
                          mask=spec, config=config)


def _compare(q, k, v, dout, c, b, spec, a=0.3, config=None, jit=False):
    out, lse, refs = _reference(q, k, v, dout, c, b, spec, a)
    if jit:  # called under an outer jit (as a custom_vjp rule is), with x64 on around it
        got = _backward_jit(q, k, v, out, lse, dout, c, b, spec, a=a, config=config)
    else:
        got = flash_backward(q, k, v, out, lse, dout, logit_scale=a, query_scale=c, key_bias=b,
                             mask=spec, config=config)
    tol = TOL[jnp.dtype(q.dtype)]
    for name, g, r, x in zip(NAMES, got, refs, (q, k, v, c, b), strict=True):
        if x is None:
            assert g is None, f"{name} must be None when its input is None"
            continue
        assert g.shape == x.shape, name
        want_dtype = jnp.float32 if name in ("dc", "db") else x.dtype
        assert g.dtype == want_dtype, (name, g.dtype)
        g = np.asarray(g, np.float64)
        r = np.asarray(r, np.float64)
        assert not np.isnan(g).any(), f"{name} has NaN (unwritten or bad arithmetic)"
        err = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    return got


def _no_key_rows(spec, B, T, S):
    vis = visible(spec, jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None],
                  jnp.arange(S)[None, None, :])
    return ~np.asarray(vis.any(-1))  # [B, T]


# (B, T, S, N, K, H, Hv, dtype, mask kwargs, registers, use_c, use_b)
CASES = {
    "plain_mqa4_scale_bias": (1, 128, 128, 4, 1, 64, 64, jnp.bfloat16, {}, 0, True, True),
    "causal_ragged_gqa2": (1, 200, 200, 4, 2, 64, 64, jnp.bfloat16, dict(is_causal=True), 0, True, True),
    "window_registers_f16": (1, 128, 128, 2, 2, 64, 64, jnp.float16,
                             dict(local_window_size=(20, 5)), 3, True, False),
    "d128_causal_ragged_kv": (1, 128, 136, 2, 1, 128, 128, jnp.bfloat16, dict(is_causal=True), 0, False,
                              True),
    "head_dims_80_48_f16": (1, 72, 96, 2, 1, 80, 48, jnp.float16, {}, 0, False, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name):
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, use_c, use_b = CASES[name]
    q, k, v, dout, c, b = _inputs(0, B, T, S + R, N, K, H, Hv, dtype, use_c, use_b)
    _compare(q, k, v, dout, c, b, MaskSpec(num_registers=R, **mask_kw))


@hypothesis.settings(deadline=None, max_examples=4)
@hypothesis.given(
    seed=st.integers(0, 2**16),
    causal=st.booleans(),
    registers=st.sampled_from([0, 2]),
    use_c=st.booleans(),
    use_b=st.booleans(),
    dtype=st.sampled_from([jnp.bfloat16, jnp.float16]),
    empty_batch=st.booleans(),
)
def test_lengths_segments_gqa(seed, causal, registers, use_c, use_b, dtype, empty_batch):
    """Lengths (incl. a batch with no valid query or key), segment ids, GQA 2, with drawn flags."""
    B, T, S, N, K, H = 2, 128, 128, 4, 2, 64
    R = registers
    q, k, v, dout, c, b = _inputs(seed, B, T, S + R, N, K, H, H, dtype, use_c, use_b)
    rng = np.random.default_rng(seed)
    q_len = rng.integers(1, T + 1, B)
    kv_len = rng.integers(1, S + 1, B)
    if empty_batch:
        q_len[1], kv_len[0] = 0, 0
    q_seg = np.sort(rng.integers(0, 3, (B, T)), axis=1)
    kv_seg = np.sort(rng.integers(0, 3, (B, S)), axis=1)
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    spec = MaskSpec(q_lengths=i32(q_len), kv_lengths=i32(kv_len), q_segment_ids=i32(q_seg),
                    kv_segment_ids=i32(kv_seg), is_causal=causal, num_registers=R)
    dq, dk, dv, dc, db = _compare(q, k, v, dout, c, b, spec)
    empty = _no_key_rows(spec, B, T, S + R)
    np.testing.assert_array_equal(np.asarray(dq, np.float32)[empty], 0.0)
    if dc is not None:
        np.testing.assert_array_equal(np.asarray(dc)[:, :, :][np.broadcast_to(empty[:, None], dc.shape)], 0.0)


@pytest.mark.parametrize("mma_db", [False, True])
def test_bias_paths_with_codes(mma_db):
    """mma_bias (and mma_db) with length and segment codes and registers: the codes' strip, the
    bias operand and the ones tile share the pipeline (their consumed barriers in order)."""
    B, T, S, N, K, H, R = 2, 128, 128, 4, 2, 64, 2
    q, k, v, dout, c, _ = _inputs(13, B, T, S + R, N, K, H, H, jnp.bfloat16, True, False)
    kf = k.astype(jnp.float32)
    b = 30.0 - jnp.transpose(jnp.sum(kf * kf, -1), (0, 2, 1)) / np.sqrt(H)
    rng = np.random.default_rng(13)
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    seg = np.sort(rng.integers(0, 3, (B, T)), axis=1)
    spec = MaskSpec(q_lengths=i32([100, 128]), kv_lengths=i32([128, 90]), q_segment_ids=i32(seg),
                    kv_segment_ids=i32(seg[:, :S]), is_causal=True, num_registers=R)
    cfg = dataclasses.replace(default_backward_block_sizes(H, True), mma_bias=True, mma_db=mma_db)
    _compare(q, k, v, dout, c, b, spec, config=cfg)


def test_gqa_equals_repeated_heads():
    """GQA dK/dV equal the sum over the group of the MHA gradients with repeated kv heads."""
    B, T, S, N, K, H = 1, 128, 128, 4, 1, 64
    q, k, v, dout, c, b = _inputs(7, B, T, S, N, K, H, H, jnp.float16, True, True)
    spec = MaskSpec(is_causal=True)
    out, lse, _ = _reference(q, k, v, dout, c, b, spec, 0.3)
    g = flash_backward(q, k, v, out, lse, dout, logit_scale=0.3, query_scale=c, key_bias=b, mask=spec)
    rep = [jnp.repeat(x, N, axis=2) for x in (k, v)]
    m = flash_backward(q, *rep, out, lse, dout, logit_scale=0.3, query_scale=c,
                       key_bias=jnp.repeat(b, N, axis=1), mask=spec)
    for got, mha, axis in ((g[1], m[1], 2), (g[2], m[2], 2), (g[4], m[4], 1)):
        summed = np.asarray(mha, np.float32).sum(axis=axis, keepdims=True)
        np.testing.assert_allclose(np.asarray(got, np.float32), summed, atol=3e-2, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(g[0], np.float32), np.asarray(m[0], np.float32), atol=1e-2)


def test_window_skips_tiles():
    """A window without registers: both kernels skip key/query tiles outside the band (64-wide tiles)."""
    q, k, v, dout, c, b = _inputs(5, 1, 256, 256, 2, 1, 64, 64, jnp.bfloat16, True, True)
    cfg = BackwardBlockSizes(block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64)
    _compare(q, k, v, dout, c, b, MaskSpec(local_window_size=(20, 5)), config=cfg)


def test_causal_one_register():
    """Causal with one register: the dkv kernel's second key tile (keys 128..255, positions
    127..254) is seen by query 127 alone, in the query tile before the one its first key index
    points at (``TileMask.query_tiles`` must start there). T = 128 makes that pair key 128's whole gradient;
    key 128 is built to take about half of query 127's weight (head 0: a logit of 8, near the
    log-sum of the row's other logits) and a value along dO, so that its dk / dv rows are ~10 %
    of the arrays' norms (a skipped tile is seen far above the tolerance)."""
    q, k, v, dout, _, _ = _inputs(15, 1, 128, 257, 2, 1, 64, 64, jnp.bfloat16, False, False)
    q127, do127 = (x[0, 127, 0].astype(jnp.float32) for x in (q, dout))
    k = k.at[0, 128, 0].set((8.0 / 0.3 * q127 / jnp.sum(q127 * q127)).astype(k.dtype))
    v = v.at[0, 128, 0].set((3.0 * do127 / jnp.linalg.norm(do127)).astype(v.dtype))
    _compare(q, k, v, dout, None, None, MaskSpec(is_causal=True, num_registers=1))


@pytest.mark.parametrize("name", ["causal_ragged_gqa2", "window_registers_f16", "d128_causal_ragged_kv"])
def test_edge_masks_match_reference(name):
    """Edge-only masks in both kernels: masks only on edge tiles (64-wide tiles, several per row)."""
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, use_c, use_b = CASES[name]
    q, k, v, dout, c, b = _inputs(1, B, T, S + R, N, K, H, Hv, dtype, use_c, use_b)
    cfg = BackwardBlockSizes(block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
                         dq_edge_masks=True, dkv_edge_masks=True)
    _compare(q, k, v, dout, c, b, MaskSpec(num_registers=R, **mask_kw), config=cfg)


@pytest.mark.parametrize("name, cols, edge", [("causal_ragged_gqa2", 16, True),
                                             ("window_registers_f16", 64, False),
                                             ("plain_mqa4_scale_bias", 24, False)])
def test_exp2_fma_cols_match_reference(name, cols, edge):
    """``BackwardBlockSizes.exp2_fma_cols``: the first ``cols`` columns of each recomputed tile
    (dq's keys, dk/dv's queries; 64 = all of them) take ``p`` from the polynomial (relative error
    2.4e-7 at most, far below the bf16 / f16 tolerance), with causal, window, register and
    ragged-length entries in the split columns, with and without edge-only masks."""
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, use_c, use_b = CASES[name]
    q, k, v, dout, c, b = _inputs(11, B, T, S + R, N, K, H, Hv, dtype, use_c, use_b)
    cfg = BackwardBlockSizes(block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
                             dq_edge_masks=edge, dkv_edge_masks=edge, exp2_fma_cols=cols)
    _compare(q, k, v, dout, c, b, MaskSpec(num_registers=R, **mask_kw), config=cfg)


@pytest.mark.parametrize("name, mma, mma_db", [
    (name, mma, mma_db) for name in ("plain_mqa4_scale_bias", "causal_ragged_gqa2",
                                     "d128_causal_ragged_kv")
    for mma, mma_db in ((False, False), (True, False), (True, True))] + [
    ("causal_ragged_gqa2", False, True)])
def test_bias_paths_match_reference(name, mma, mma_db):
    """Both ways of adding the key bias (a float32 strip, or mma_bias's second wgmma with three
    bf16 parts) and of summing db (float32 row sums, or mma_db's wgmma against ones) against the
    reference, with an RBF-like bias (|b / a| ~ 100: one bf16 part would be off by ~0.2 in the
    logits)."""
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, use_c, _ = CASES[name]
    q, k, v, dout, c, _ = _inputs(4, B, T, S + R, N, K, H, Hv, dtype, use_c, False)
    kf = k.astype(jnp.float32)
    b = 30.0 - jnp.transpose(jnp.sum(kf * kf, -1), (0, 2, 1)) / np.sqrt(H)
    cfg = dataclasses.replace(default_backward_block_sizes(max(H, Hv), use_c), mma_bias=mma, mma_db=mma_db)
    _compare(q, k, v, dout, c, b, MaskSpec(num_registers=R, **mask_kw), config=cfg)


@pytest.mark.parametrize("name, mma_bias, mma_db", [
    ("plain_mqa4_scale_bias", True, True), ("causal_ragged_gqa2", False, False),
    ("window_registers_f16", False, False), ("d128_causal_ragged_kv", True, False)])
def test_overlap_matches_reference(name, mma_bias, mma_db):
    """``BackwardBlockSizes.overlap`` (each tile's math traced between a wgmma's issue and its wait)
    gives the reference's gradients, with ``c`` (the dc sums) and both ways of adding the bias."""
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, use_c, use_b = CASES[name]
    q, k, v, dout, c, b = _inputs(6, B, T, S + R, N, K, H, Hv, dtype, use_c, use_b)
    cfg = dataclasses.replace(default_backward_block_sizes(max(H, Hv), use_c), overlap=True,
                              mma_bias=mma_bias, mma_db=mma_db)
    _compare(q, k, v, dout, c, b, MaskSpec(num_registers=R, **mask_kw), config=cfg)


@pytest.mark.parametrize("name, use_b, overlap", [
    ("plain_mqa4_scale_bias", True, False), ("causal_ragged_gqa2", True, True),
    ("causal_ragged_gqa2", False, False), ("window_registers_f16", False, True)])
def test_dc_mma_matches_reference(name, use_b, overlap):
    """``BackwardBlockSizes.dc_mma`` (dc's dZ sums from the dq accumulator and a wgmma against the
    bias parts and ones): the reference's dc at the same tolerance as dq, with an mma_bias key bias
    (a ones column beside its parts) and without one (a ones tile; float16 too)."""
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, use_c, _ = CASES[name]
    assert use_c
    q, k, v, dout, c, b = _inputs(8, B, T, S + R, N, K, H, Hv, dtype, True, use_b)
    cfg = dataclasses.replace(default_backward_block_sizes(max(H, Hv), True), dc_mma=True, mma_bias=True,
                              overlap=overlap)
    _compare(q, k, v, dout, c, b, MaskSpec(num_registers=R, **mask_kw), config=cfg)


@pytest.mark.parametrize("dc_mma, center_lse", [(False, False), (True, False), (False, True), (True, True)])
def test_dc_centered_with_16bit_out(dc_mma, center_lse):
    """With the forward's bf16 output (as in training) ``delta`` is off by its rounding, and an
    uncentered ``sum_j dZ_ij u_ij`` inherits that error times the row mean of ``u`` (1e-2 and up
    on sharp rows); both dc paths center on ``sum_j p_ij u_ij`` (or, ``dc_center_lse``, on
    ``lse_i / c_i``) and stay within dq's tolerance."""
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, _, _ = CASES["causal_ragged_gqa2"]
    q, k, v, dout, c, _ = _inputs(9, B, T, S, N, K, H, Hv, dtype, True, False)
    c = 3.0 * c + 2.0  # sharp rows: SSMax's s log n of a few units
    spec = MaskSpec(**mask_kw)
    out, lse, refs = _reference(q, k, v, dout, c, None, spec, 0.3)
    cfg = dataclasses.replace(default_backward_block_sizes(H, True), dc_mma=dc_mma, dc_center_lse=center_lse)
    dc = flash_backward(q, k, v, out.astype(dtype), lse, dout, logit_scale=0.3, query_scale=c,
                        mask=spec, config=cfg)[3]
    err = np.linalg.norm(np.asarray(dc - refs[3])) / np.linalg.norm(np.asarray(refs[3]))
    assert err < TOL[jnp.dtype(dtype)], err


def test_dq_heavy_first_same_tiles_reversed():
    """BackwardBlockSizes.dq_heavy_first (causal: the dq kernel's last query tiles launch first):
    the reference's gradients, bit for bit those of the usual order (T = 200: two dq CTAs, one
    ragged)."""
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, _, _ = CASES["causal_ragged_gqa2"]
    q, k, v, dout, c, b = _inputs(10, B, T, S, N, K, H, Hv, dtype, True, True)
    spec = MaskSpec(**mask_kw)
    cfg = default_backward_block_sizes(H, True)
    got = _compare(q, k, v, dout, c, b, spec, config=dataclasses.replace(cfg, dq_heavy_first=True))
    out, lse, _ = _reference(q, k, v, dout, c, b, spec, 0.3)
    usual = flash_backward(q, k, v, out, lse, dout, logit_scale=0.3, query_scale=c, key_bias=b,
                           mask=spec, config=dataclasses.replace(cfg, dq_heavy_first=False))
    for x, y in zip(got, usual, strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("name, overlap, mma_bias, mma_db", [
    ("plain_mqa4_scale_bias", True, True, True), ("causal_ragged_gqa2", False, False, False),
    ("window_registers_f16", True, False, False), ("head_dims_80_48_f16", False, False, False),
    ("d128_causal_ragged_kv", True, True, False)])
def test_dkv_split_matches_reference(name, overlap, mma_bias, mma_db):
    """``BackwardBlockSizes.dkv_split`` (dk / db and dv from two kernels): the reference's gradients,
    bit for bit those of the fused dkv kernel (the same P, dP and dZ tiles), over both bias paths,
    both db sums, overlap on and off, registers, GQA, ragged tails, and H != Hv (the dv kernel
    then keeps a V-sized staging buffer)."""
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, use_c, use_b = CASES[name]
    q, k, v, dout, c, b = _inputs(14, B, T, S + R, N, K, H, Hv, dtype, use_c, use_b)
    spec = MaskSpec(num_registers=R, **mask_kw)
    cfg = dataclasses.replace(default_backward_block_sizes(max(H, Hv), use_c), overlap=overlap,
                              mma_bias=mma_bias, mma_db=mma_db)
    got = _compare(q, k, v, dout, c, b, spec, config=dataclasses.replace(cfg, dkv_split=True))
    out, lse, _ = _reference(q, k, v, dout, c, b, spec, 0.3)
    fused = flash_backward(q, k, v, out, lse, dout, logit_scale=0.3, query_scale=c, key_bias=b,
                           mask=spec, config=cfg)
    for x, y, n in zip(got, fused, NAMES, strict=True):
        if x is not None:
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                          err_msg=n)


@pytest.mark.parametrize("wgs", [1, 3])
def test_compute_warpgroup_configs(wgs):
    """Non-default configs (1 or 3 compute warpgroups, 3 stages, 128-key dkv tiles; T = 200 leaves
    ragged tiles) give the reference's gradients."""
    q, k, v, dout, c, b = _inputs(3, 1, 200, 256, 2, 1, 64, 64, jnp.bfloat16, True, True)
    cfg = BackwardBlockSizes(block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=128,
                         compute_wgs=wgs, max_concurrent_steps=3)
    _compare(q, k, v, dout, c, b, MaskSpec(is_causal=True), config=cfg, jit=True)


def test_interpreter_poisons_unwritten_outputs():
    """The NaN checks above mean something: an output the kernel does not write comes back NaN."""

    def kernel(x_ref, o_ref, smem, bar):
        @pl.when(jax.lax.axis_index("i") == 0)
        def _():
            plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, 64)], smem, bar)
            plgpu.barrier_wait(bar)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, o_ref.at[pl.ds(0, 64)])
            plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((128,), jnp.float32),
                        scratch_types=[plgpu.SMEM((64,), jnp.float32), plgpu.Barrier()],
                        grid=(2,), grid_names=("i",), interpret=plgpu.InterpretGPUParams())
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=1)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        out = np.asarray(call(jnp.arange(128, dtype=jnp.float32) + 1.0))
    np.testing.assert_array_equal(out[:64], np.arange(64) + 1.0)
    assert np.isnan(out[64:]).all()


def _bad_call(**overrides):
    q, k, v, dout, c, b = _inputs(0, 1, 64, 64, 2, 1, 64, 64, jnp.bfloat16, True, True)
    args = dict(q=q, k=k, v=v, out=dout, lse=jnp.zeros((1, 2, 64)), dout=dout, logit_scale=0.3,
                query_scale=c, key_bias=b, mask=MaskSpec())
    args.update(overrides)
    return flash_backward(**args)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(k=jnp.ones((1, 64, 3, 64), jnp.bfloat16), v=jnp.ones((1, 64, 3, 64), jnp.bfloat16),
          key_bias=None), ValueError, "multiple of kv heads"),
    (dict(lse=jnp.zeros((1, 64, 2))), ValueError, "lse must have shape"),
    (dict(query_scale=jnp.ones((1, 64, 2))), ValueError, "query_scale"),
    (dict(key_bias=jnp.ones((1, 2, 64))), ValueError, "key_bias"),
    (dict(q=jnp.ones((1, 64, 2, 64), jnp.float32)), TypeError, "share a dtype"),
    (dict(logit_scale=jnp.float32(0.3)), TypeError, "logit_scale"),
    (dict(mask=MaskSpec(q_segment_ids=jnp.zeros((1, 64), jnp.int32))), ValueError, "together"),
    (dict(mask=MaskSpec(kv_lengths=jnp.ones((2,), jnp.int32))), ValueError, "kv_lengths"),
    (dict(mask={"is_causal": True}), TypeError, "MaskSpec"),
    (dict(config=dataclasses.replace), TypeError, "BackwardBlockSizes"),
    (dict(interpret="yes"), TypeError, "interpret"),
    (dict(k=jnp.ones((1, 0, 1, 64), jnp.bfloat16), v=jnp.ones((1, 0, 1, 64), jnp.bfloat16),
          key_bias=None), ValueError, "S > 0"),
])
def test_bad_input_raises(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**overrides)


def test_unsupported_raises_not_implemented():
    x32 = jnp.ones((1, 64, 2, 64), jnp.float32)
    with pytest.raises(NotImplementedError, match="bfloat16/float16"):
        _bad_call(q=x32, k=jnp.ones((1, 64, 1, 64), jnp.float32), v=jnp.ones((1, 64, 1, 64), jnp.float32))
    big = jnp.ones((1, 64, 2, 320), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="head dim"):
        _bad_call(q=big, k=jnp.ones((1, 64, 1, 320), jnp.bfloat16))


@pytest.mark.parametrize("kwargs", [dict(block_q_dq=96), dict(compute_wgs=4), dict(max_concurrent_steps=1),
                                    dict(dq_edge_masks=1), dict(dkv_edge_masks=None),
                                    dict(overlap=0), dict(dc_mma=None),
                                    dict(dkv_split=1), dict(exp2_fma_cols=12),
                                    dict(exp2_fma_cols=72), dict(exp2_fma_cols=True)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError, match="BackwardBlockSizes"):
        BackwardBlockSizes(**kwargs)


def test_default_config_per_head_dim():
    assert default_backward_block_sizes(48) == default_backward_block_sizes(64)
    assert default_backward_block_sizes(256).compute_wgs == 1
    assert default_backward_block_sizes(256).dkv_split and not default_backward_block_sizes(128).dkv_split
    assert default_backward_block_sizes(128, query_scale=True).block_kv_dq == 64
    assert default_backward_block_sizes(128, query_scale=True, masked=False).block_kv_dq == 128
    # without the dc sums (a constant SSMax s, a stopped beta) the masked dq kernel keeps 128 keys
    assert default_backward_block_sizes(128, query_scale=True, query_scale_grad=False).block_kv_dq == 128
    dflt = default_backward_block_sizes
    assert dflt(64, True, query_scale_grad=False) == dflt(64, True)
    assert dflt(64, query_scale=True, masked=False) == dflt(64, True)
    assert dflt(128).dkv_edge_masks and not dflt(128).dq_edge_masks
    with pytest.raises(NotImplementedError):
        default_backward_block_sizes(257)


@pytest.mark.parametrize("mma_db, dkv_split", [(False, False), (True, False), (False, True)])
def test_bias_key_grad_adds_the_norm_term_to_dk(mma_db, dkv_split):
    """``bias_key_grad=2g`` (the key bias is ``g ||k_j||^2``): dk gains ``2 g db_j k_j`` in the
    kernel's epilogue (GQA: db summed over the group first), the other outputs are unchanged;
    also when the dk kernel runs apart from the dv kernel (``dkv_split``)."""
    q, k, v, dout, c, _ = _inputs(13, 1, 128, 136, 4, 2, 64, 64, jnp.bfloat16, True, False)
    g = -0.125
    b = jnp.transpose(g * jnp.sum(k.astype(jnp.float32) ** 2, axis=-1), (0, 2, 1))  # [B, K, S]
    spec = MaskSpec(is_causal=True)
    out, lse, _ = _reference(q, k, v, dout, c, b, spec, 0.3)
    cfg = dataclasses.replace(default_backward_block_sizes(64, True), mma_db=mma_db, dkv_split=dkv_split)
    run = lambda grad: flash_backward(q, k, v, out, lse, dout, logit_scale=0.3, query_scale=c,
                                      key_bias=b, mask=spec, config=cfg, bias_key_grad=grad)
    plain, fused = run(None), run(2 * g)
    db = jnp.transpose(plain[4], (0, 2, 1))[..., None]  # [B, S, K, 1]
    want = plain[1].astype(jnp.float32) + 2 * g * db * k.astype(jnp.float32)
    err = np.linalg.norm(np.asarray(fused[1].astype(jnp.float32) - want)) / np.linalg.norm(
        np.asarray(want))
    assert err < 4e-3, err  # two bf16 roundings of dk apart
    for i in (0, 2, 3, 4):
        np.testing.assert_array_equal(np.asarray(fused[i], np.float32), np.asarray(plain[i], np.float32))
    with pytest.raises(ValueError, match="bias_key_grad"):
        flash_backward(q, k, v, out, lse, dout, logit_scale=0.3, bias_key_grad=1.0)


def test_query_scale_grad_off_skips_dc_only():
    """query_scale_grad=False: dc is None, and dq / dk / dv are the same arrays as with dc."""
    q, k, v, dout, c, b = _inputs(12, 1, 128, 136, 2, 1, 64, 64, jnp.bfloat16, True, True)
    spec = MaskSpec(is_causal=True)
    out, lse, _ = _reference(q, k, v, dout, c, b, spec, 0.3)
    full = _compare(q, k, v, dout, c, b, spec)
    got = flash_backward(q, k, v, out, lse, dout, logit_scale=0.3, query_scale=c, key_bias=b,
                         mask=spec, query_scale_grad=False)
    assert got[3] is None
    for name, x, y in zip(("dq", "dk", "dv", "db"), (*got[:3], got[4]), (*full[:3], full[4]),
                          strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                      err_msg=name)


@pytest.mark.parametrize("flip_mma_db, overrides", [(False, None), (True, None),
                                                     (False, dict(overlap=False))])
def test_gpu_check_case_runs_in_the_interpreter(monkeypatch, flip_mma_db, overrides):
    """`python -m checks.backward`'s per-case routine (and --flip-mma-db, --set) at
    a tiny size."""
    from checks import backward as check_backward
    tiny = (1, 128, 128, 2, 1, 64, dict(is_causal=True), 0, False, "rbf")
    monkeypatch.setitem(check_backward.CHECKS, "tiny_rbf", tiny)
    errs = check_backward.check_case("tiny_rbf", 0, flip_mma_db=flip_mma_db, overrides=overrides)
    assert set(errs) == {"dq", "dk", "dv", "db", "dk+bias"}
    assert all(e < check_backward.TOL for e in errs.values()), errs


@pytest.mark.parametrize("use_c, use_b, causal", [(True, False, True), (True, True, False),
                                                  (False, False, True)])
def test_logsumexp_cotangent(use_c, use_b, causal):
    """``flash_attention``'s lse is differentiable: with cotangents on both the output and the
    logsumexp, dq, dk, dv, dc and db match ``jax.vjp`` of the float32 oracle (the dq kernel's dc
    leaves out ``dlse_i sum_j p_ij u_ij``, which the op adds; a ``q_lengths`` mask leaves fully
    masked rows). The oracle's gradients with the lse cotangent dropped differ by far more than the
    tolerance (dv aside: the lse does not depend on v), so the term is seen."""
    from pallas_kernels import flash_attention
    B, T, S, N, K, H = 1, 64, 64, 2, 1, 64
    q, k, v, dout, c, b = _inputs(21, B, T, S, N, K, H, H, jnp.bfloat16, use_c, use_b)
    dlse = jax.random.normal(jax.random.key(22), (B, N, T), jnp.float32)
    spec = MaskSpec(is_causal=causal, q_lengths=jnp.asarray([T - 5], jnp.int32))
    a = 0.3

    def ours(q, k, v, c, b):
        out, lse = flash_attention(q, k, v, logit_scale=a, query_scale=c, key_bias=b, mask=spec)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)) + jnp.sum(lse * dlse)

    def oracle(q, k, v, c, b, with_lse=True):
        out, lse = flash_reference(q, k, v, logit_scale=a, query_scale=c, key_bias=b, mask=spec)
        return jnp.sum(out * dout.astype(jnp.float32)) + (jnp.sum(lse * dlse) if with_lse else 0)

    argnums = (0, 1, 2) + ((3,) if use_c else ()) + ((4,) if use_b else ())
    got = jax.block_until_ready(jax.grad(ours, argnums)(q, k, v, c, b))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(oracle, argnums)(*f32, c, b)
    without = jax.grad(lambda *x: oracle(*x, with_lse=False), argnums)(*f32, c, b)
    for name, g, w, w0 in zip([NAMES[i] for i in argnums], got, want, without, strict=True):
        g, w, w0 = (np.asarray(x, np.float64) for x in (g, w, w0))
        assert np.all(np.isfinite(g)), name
        err = np.linalg.norm(g - w) / np.linalg.norm(w)
        assert err <= TOL[jnp.dtype(jnp.bfloat16)], (name, err)
        if name != "dv":
            assert np.linalg.norm(w0 - w) / np.linalg.norm(w) > 5 * TOL[jnp.dtype(jnp.bfloat16)], name


@pytest.mark.parametrize("use_c, use_b, causal, cap", [(False, False, True, 2.0),
                                                        (True, False, False, 2.0),
                                                        (True, True, True, 8.0),
                                                        (False, True, False, 8.0)])
def test_soft_cap(use_c, use_b, causal, cap):
    """``logits_soft_cap`` through the forward and both backward kernels: out, lse and dq, dk, dv,
    dc, db against the float32 oracle's ``cap tanh(z / cap)`` (``jax.vjp`` of it), at logits
    large enough (q, k of scale 3) that the cap bends most of them. The same gradients without
    the cap differ by far more than the tolerance, so the cap's derivative is seen."""
    from pallas_kernels import flash_attention
    B, T, S, N, K, H = 1, 64, 64, 2, 1, 64
    q, k, v, dout, c, b = _inputs(31, B, T, S, N, K, H, H, jnp.float32, use_c, use_b)
    q, k = (3 * q).astype(jnp.bfloat16), (3 * k).astype(jnp.bfloat16)
    v, dout = v.astype(jnp.bfloat16), dout.astype(jnp.bfloat16)
    spec = MaskSpec(is_causal=causal, q_lengths=jnp.asarray([T - 3], jnp.int32))
    a = 0.125

    def ours(q, k, v, c, b):
        out, lse = flash_attention(q, k, v, logit_scale=a, query_scale=c, key_bias=b, mask=spec,
                                   logits_soft_cap=cap)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), (out, lse)

    def oracle(q, k, v, c, b, cap=cap):
        out, lse = flash_reference(q, k, v, logit_scale=a, query_scale=c, key_bias=b, mask=spec,
                                   logits_soft_cap=cap)
        return jnp.sum(out * dout.astype(jnp.float32)), (out, lse)

    argnums = (0, 1, 2) + ((3,) if use_c else ()) + ((4,) if use_b else ())
    got, (out, lse) = jax.block_until_ready(jax.grad(ours, argnums, has_aux=True)(q, k, v, c, b))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want, (r_out, r_lse) = jax.grad(oracle, argnums, has_aux=True)(*f32, c, b)
    uncapped, _ = jax.grad(lambda *x: oracle(*x, cap=None), argnums, has_aux=True)(*f32, c, b)
    tol = TOL[jnp.dtype(jnp.bfloat16)]
    np.testing.assert_allclose(np.asarray(out, np.float32), r_out, atol=2e-2, rtol=0)
    np.testing.assert_allclose(lse, r_lse, atol=1e-4, rtol=1e-5)
    for name, g, w, w0 in zip([NAMES[i] for i in argnums], got, want, uncapped, strict=True):
        g, w, w0 = (np.asarray(x, np.float64) for x in (g, w, w0))
        assert np.all(np.isfinite(g)), name
        err = np.linalg.norm(g - w) / np.linalg.norm(w)
        assert err <= tol, (name, err)
        assert np.linalg.norm(w0 - w) / np.linalg.norm(w) > 5 * tol, name
