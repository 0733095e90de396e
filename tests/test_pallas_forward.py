"""The fused forward (:mod:`pallas_kernels.forward`) against the float32 oracle, in the interpreter.

On CPU the kernels run under ``plgpu.InterpretGPUParams`` (chosen automatically), whose uninitialised
memory is NaN: an output element the kernel fails to write shows up as NaN, which every comparison here
rejects. The interpreter runs everything the GPU kernel runs except one step, the register-operand
P @ V wgmma, which it replaces by ``jnp.dot`` (:func:`pallas_kernels.forward._pv`); that step is
checked on the GPU by ``python -m checks.forward``.

Tolerances: the kernel rounds P to the input dtype before P @ V (as every flash kernel does), so the
output differs from the float32 oracle by up to a few ulps of the 16-bit dtype; the statistics are
float32 throughout.
"""


import dataclasses

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.forward as _fwd
from checks.forward import reference_rows
from pallas_kernels.common import MaskSpec, segment_ranks, visible
from pallas_kernels.forward import BlockSizes, count_visible, scale_row_max
from tests.interpreter import blocking, needs_interpreter_threads

flash_forward = blocking(_fwd.flash_forward)
flash_stats = blocking(_fwd.flash_stats)

BLOCKS = BlockSizes(block_q=64, block_kv=64, max_concurrent_steps=2)
OUT_TOL = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 3e-3}
STAT_TOL = 2e-4



pytestmark = needs_interpreter_threads


def _inputs(seed, B, T, S, N, K, H, Hv, dtype, use_c, use_b):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, Hv), jnp.float32).astype(dtype)
    c = jax.random.uniform(ks[3], (B, N, T), jnp.float32, 0.3, 2.0) if use_c else None
    b = jax.random.normal(ks[4], (B, K, S), jnp.float32) if use_b else None
    return q, k, v, c, b


def _compare(q, k, v, c, b, spec, a=0.2, config=BLOCKS):
    out, lse, ent, mw = flash_forward(q, k, v, logit_scale=a, query_scale=c, key_bias=b,
                                      mask=spec, config=config, return_stats=True)
    rows = np.arange(q.shape[1])
    r_out, r_lse, r_ent, r_mw = reference_rows(q, k, v, rows, a=a, c=c, b=b, spec=spec)
    assert out.shape == q.shape[:3] + (v.shape[3],) and out.dtype == q.dtype
    for x in (out, lse, ent, mw):
        assert not np.isnan(np.asarray(x, np.float32)).any()
    np.testing.assert_allclose(np.asarray(out, np.float32), r_out, atol=OUT_TOL[q.dtype], rtol=0)
    np.testing.assert_allclose(lse, r_lse, atol=STAT_TOL, rtol=STAT_TOL)
    np.testing.assert_allclose(ent, r_ent, atol=STAT_TOL, rtol=STAT_TOL)
    np.testing.assert_allclose(mw, r_mw, atol=STAT_TOL, rtol=0)
    return out, lse, ent, mw


# (B, T, S, N, K, H, Hv, dtype, mask kwargs, registers, use_c, use_b)
CASES = {
    "plain_gqa": (1, 128, 128, 4, 2, 64, 64, jnp.bfloat16, {}, 0, False, False),
    "causal_scale_bias_ragged": (1, 200, 136, 2, 1, 64, 64, jnp.bfloat16,
                                 dict(is_causal=True), 0, True, True),
    "window_registers_f16": (1, 128, 200, 2, 2, 64, 64, jnp.float16,
                             dict(local_window_size=(20, 5)), 3, True, False),
    "head_dims_80_48": (1, 72, 96, 2, 1, 80, 48, jnp.float16, {}, 0, False, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name):
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, use_c, use_b = CASES[name]
    q, k, v, c, b = _inputs(0, B, T, S + R, N, K, H, Hv, dtype, use_c, use_b)
    _compare(q, k, v, c, b, MaskSpec(num_registers=R, **mask_kw))


OVERLAP = BlockSizes(block_q=64, block_kv=64, max_concurrent_steps=2, pingpong=False,
                     intra_overlap=True)


@pytest.mark.parametrize("name", ["causal_scale_bias_ragged", "window_registers_f16"])
def test_exp2_fma_cols_matches_reference(name):
    """BlockSizes.exp2_fma_cols: 24 of each tile's 64 columns from the polynomial (relative error
    2.44e-7 a weight, far inside the tolerances): the reference's outputs and statistics, with
    hidden keys (causal, window, ragged S) in those columns and registers."""
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, use_c, use_b = CASES[name]
    q, k, v, c, b = _inputs(2, B, T, S + R, N, K, H, Hv, dtype, use_c, use_b)
    cfg = dataclasses.replace(BLOCKS, exp2_fma_cols=24)
    _compare(q, k, v, c, b, MaskSpec(num_registers=R, **mask_kw), config=cfg)


@pytest.mark.parametrize("name", sorted(CASES))
def test_intra_overlap_matches_reference(name):
    """BlockSizes.intra_overlap (P carried to the next step, V slots released a step late, one
    PV after the loop): the reference's outputs and statistics over masks, skipped tiles, GQA,
    registers, c, a bias and float16; and with the bias on the tensor cores."""
    B, T, S, N, K, H, Hv, dtype, mask_kw, R, use_c, use_b = CASES[name]
    q, k, v, c, b = _inputs(1, B, T, S + R, N, K, H, Hv, dtype, use_c, use_b)
    mma = use_b and dtype == jnp.bfloat16
    cfg = dataclasses.replace(OVERLAP, mma_bias=mma)
    _compare(q, k, v, c, b, MaskSpec(num_registers=R, **mask_kw), config=cfg)


def test_intra_overlap_window_skips_and_fixed_max():
    """A window leaves whole key tiles before and after each warpgroup's range (skipped steps
    around the overlapped loop), and a row with no visible key; the fixed-max forward too."""
    q, k, v, c, _ = _inputs(2, 2, 320, 320, 2, 1, 64, 64, jnp.bfloat16, True, False)
    spec = MaskSpec(local_window_size=(70, 10), kv_lengths=jnp.array([320, 0]))
    _compare(q, k, v, c, None, spec, config=OVERLAP)
    _, _, m = flash_stats(q, k, logit_scale=0.2, query_scale=c, mask=spec, return_row_max=True)
    out, lse = flash_forward(q, k, v, logit_scale=0.2, query_scale=c, mask=spec, config=OVERLAP,
                             row_max=m)
    r_out, r_lse, _, _ = reference_rows(q, k, v, np.arange(320), a=0.2, c=c, b=None, spec=spec)
    np.testing.assert_allclose(np.asarray(out, np.float32), r_out, atol=OUT_TOL[q.dtype], rtol=0)
    np.testing.assert_allclose(lse, r_lse, atol=STAT_TOL, rtol=STAT_TOL)


@pytest.mark.parametrize("window, registers", [((126, 62), 0), ((129, 60), 3)])
def test_window_wider_than_a_tile_takes_full_tiles(window, registers):
    """A window wider than a key tile with no lengths or segments (the usual GPU case): key tiles
    inside every row's band run unmasked (``TileMask.key_tiles``' ``[full_lo, full_hi)``). The windows put
    each band's edges one key inside a tile edge (64-wide tiles, registers shifting the keys), so
    a full range one key too wide takes a tile holding a hidden key as full."""
    q, k, v, c, b = _inputs(4, 1, 256, 256 + registers, 2, 1, 64, 64, jnp.bfloat16, True, True)
    _compare(q, k, v, c, b, MaskSpec(local_window_size=window, num_registers=registers))


def test_heavy_first_same_tiles_reversed():
    """BlockSizes.heavy_first (causal: the last query tiles launch first) gives the reference's
    outputs and statistics, bit for bit those of the usual order; the statistics sweep too.
    T = 320 leaves three forward CTAs (one ragged) and two sweep CTAs."""
    q, k, v, c, b = _inputs(3, 1, 320, 300, 2, 1, 64, 64, jnp.bfloat16, True, True)
    spec = MaskSpec(is_causal=True)
    got = _compare(q, k, v, c, b, spec, config=dataclasses.replace(BLOCKS, heavy_first=True))
    usual = flash_forward(q, k, v, logit_scale=0.2, query_scale=c, key_bias=b, mask=spec,
                          config=dataclasses.replace(BLOCKS, heavy_first=False), return_stats=True)
    for x, y in zip(got, usual, strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    free4 = BlockSizes(block_q=64, block_kv=64, compute_wgs=4, pingpong=False, sweep_skips_v=True)
    sweeps = [flash_stats(q, k, logit_scale=0.2, query_scale=c, key_bias=b, mask=spec,
                          config=dataclasses.replace(free4, heavy_first=h)) for h in (True, False)]
    for x, y in zip(*sweeps, strict=True):
        np.testing.assert_array_equal(x, y)
    _, r_lse, r_ent, _ = reference_rows(q, k, v, np.arange(320), a=0.2, c=c, b=b, spec=spec)
    np.testing.assert_allclose(sweeps[0][0], r_lse, atol=STAT_TOL, rtol=STAT_TOL)
    np.testing.assert_allclose(sweeps[0][1], r_ent, atol=STAT_TOL, rtol=STAT_TOL)


@pytest.mark.parametrize("flags", ["const", "bias", "nonneg_c"])
def test_fold_scale(flags):
    """BlockSizes(fold_scale=True): one FMA per logit on unmasked tiles; same results.

    ``nonneg_c``: a per-query scale declared nonnegative (``query_scale_nonnegative``), with some
    rows at exactly 0 (SSMax's ``log 1``).
    """
    use_b, use_c = flags == "bias", flags == "nonneg_c"
    q, k, v, c, b = _inputs(6, 1, 256, 256, 2, 1, 64, 64, jnp.bfloat16, use_c, use_b)
    if use_c:
        c = jnp.where((jnp.arange(256) % 7 == 0)[None, None, :], 0.0, c)
    spec = MaskSpec(is_causal=True)  # masked diagonal tiles and unmasked ones below
    folded = BlockSizes(block_q=64, block_kv=64, max_concurrent_steps=2, fold_scale=True)
    got = flash_forward(q, k, v, logit_scale=0.3, query_scale=c, key_bias=b, mask=spec,
                        config=folded, return_stats=True, query_scale_nonnegative=use_c)
    rows = np.arange(q.shape[1])
    r_out, r_lse, r_ent, r_mw = reference_rows(q, k, v, rows, a=0.3, c=c, b=b, spec=spec)
    np.testing.assert_allclose(np.asarray(got[0], np.float32), r_out, atol=OUT_TOL[q.dtype], rtol=0)
    for x, y in zip(got[1:], (r_lse, r_ent, r_mw), strict=True):
        np.testing.assert_allclose(x, y, atol=STAT_TOL, rtol=STAT_TOL)
    plain = flash_forward(q, k, v, logit_scale=0.3, query_scale=c, key_bias=b, mask=spec,
                          config=BLOCKS, return_stats=True)
    for x, y in zip(got[1:], plain[1:], strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("a", [0.3, -0.3])
def test_fold_scale_flips_rows_of_either_sign(a):
    """Without ``query_scale_nonnegative`` a per-query scale of either sign is folded as ``|r|``
    with the Q tile's rows negated in shared memory where ``r < 0`` (``_Plan.row_flip``): exact.
    Under a broken promise (no flip) the same fold is wrong, so the flip is what keeps it exact."""
    q, k, v, c, _ = _inputs(8, 1, 128, 128, 2, 1, 64, 64, jnp.bfloat16, True, False)
    # Odd rows: c = -40, sharp logits of either sign. There the folded row max r max_j s_ij is
    # r min_j s_ij, far below the true max: exp2(z - m) overflows. Row 4: c = 0.
    c = jnp.where((jnp.arange(128) % 2 == 1)[None, None, :], -40.0, c).at[:, :, 4].set(0.0)
    folded = BlockSizes(block_q=64, block_kv=64, max_concurrent_steps=2, fold_scale=True)
    plan = _fwd._prepare(q, k, v, a, c, None, MaskSpec(), folded, True, stats=True, pv=True)[0]
    assert plan.row_flip and not plan.row_nonneg
    _compare(q, k, v, c, None, MaskSpec(), a=a, config=folded)
    for nonneg in (False, True):  # a key bias: no flip (it would negate b too), no fold
        plan = _fwd._prepare(q, k, v, a, c, jnp.zeros((1, 1, 128)), MaskSpec(), folded, True,
                             stats=True, pv=True, nonneg=nonneg)[0]
        assert not plan.row_flip
    if a < 0:
        return
    _, lse, _, _ = jax.block_until_ready(flash_forward(  # before queueing XLA work (interpreter)
        q, k, v, logit_scale=0.3, query_scale=c, mask=MaskSpec(), config=folded,
        return_stats=True, query_scale_nonnegative=True))
    r_lse = reference_rows(q, k, v, np.arange(128), a=0.3, c=c, b=None, spec=MaskSpec())[1]
    broken = ~np.isclose(lse, r_lse, atol=STAT_TOL, rtol=STAT_TOL)
    assert broken[..., 1::2].any() and not broken[..., 0::2].any()  # a broken promise shows


def test_default_d256_folds_signed_scale():
    """At D = 256 the default tiles fold a per-query scale (the H200 tune), so a scale of either
    sign takes the row flip there: the reference's outputs and statistics, and the V-less
    statistics sweep (128-key tiles) the reference's lse and entropy. S = 192: full tiles only
    for the forward (64 keys), a ragged one for the sweep."""
    q, k, v, c, _ = _inputs(9, 1, 128, 192, 1, 1, 256, 256, jnp.bfloat16, True, False)
    c = jnp.where((jnp.arange(128) % 3 == 0)[None, None, :], -c, c)
    plan = _fwd._prepare(q, k, v, 0.06, c, None, MaskSpec(), None, True, stats=True, pv=True)[0]
    assert plan.row_flip and plan.blocks.fold_scale
    _compare(q, k, v, c, None, MaskSpec(), a=0.06, config=None)
    lse, ent = flash_stats(q, k, logit_scale=0.06, query_scale=c, mask=MaskSpec())[:2]
    _, r_lse, r_ent, _ = reference_rows(q, k, v, np.arange(128), a=0.06, c=c, b=None, spec=MaskSpec())
    np.testing.assert_allclose(lse, r_lse, atol=STAT_TOL, rtol=STAT_TOL)
    np.testing.assert_allclose(ent, r_ent, atol=STAT_TOL, rtol=STAT_TOL)


def test_lengths_segments_and_empty_rows():
    """Lengths, segment ids, causal and registers at once; batch 1 has no valid key: zeros, lse 0."""
    B, T, S, N, K, H, R = 2, 128, 128, 2, 1, 64, 2
    q, k, v, _, b = _inputs(1, B, T, S + R, N, K, H, H, jnp.bfloat16, False, True)
    q_seg = jnp.sort(jax.random.randint(jax.random.key(2), (B, T), 0, 3), axis=1)
    kv_seg = jnp.sort(jax.random.randint(jax.random.key(3), (B, S), 0, 3), axis=1)
    spec = MaskSpec(q_lengths=jnp.array([100, 128]), kv_lengths=jnp.array([90, 0]),
                    q_segment_ids=q_seg, kv_segment_ids=kv_seg, is_causal=True, num_registers=R)
    out, lse, ent, mw = _compare(q, k, v, None, b, spec)
    np.testing.assert_array_equal(np.asarray(out[0, 100:], np.float32), 0.0)
    np.testing.assert_array_equal(lse[0, :, 100:], 0.0)
    # Batch 1: no sequence key, but the registers stay visible to every valid query.
    assert np.all(np.asarray(mw[1]) >= 0.5 - 1e-6)


def test_fully_masked_rows_give_zeros():
    q, k, v, c, _ = _inputs(4, 1, 128, 64, 2, 1, 64, 64, jnp.bfloat16, True, False)
    spec = MaskSpec(kv_lengths=jnp.array([0]))
    out, lse, ent, mw = flash_forward(q, k, v, logit_scale=0.3, query_scale=c, mask=spec,
                                      config=BLOCKS, return_stats=True)
    for x in (out, lse, ent, mw):
        np.testing.assert_array_equal(np.asarray(x, np.float32), 0.0)


@hypothesis.settings(deadline=None, max_examples=20)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), causal=st.booleans(),
                  segments=st.booleans(), window=st.sampled_from([None, (0, 0), (3, 7), (50, 1)]),
                  registers=st.sampled_from([0, 2]))
def test_count_visible_matches_dense_mask(seed, causal, segments, window, registers):
    B, T, S = 2, 40, 56
    rng = np.random.default_rng(seed)
    q_len = jnp.asarray(rng.integers(0, T + 1, B), jnp.int32)
    kv_len = jnp.asarray(rng.integers(0, S + 1, B), jnp.int32)
    q_seg = jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), axis=1), jnp.int32)
    kv_seg = jnp.asarray(np.sort(rng.integers(0, 4, (B, S)), axis=1), jnp.int32)
    spec = MaskSpec(q_lengths=q_len, kv_lengths=kv_len,
                    q_segment_ids=q_seg if segments else None,
                    kv_segment_ids=kv_seg if segments else None, is_causal=causal,
                    local_window_size=window, num_registers=registers)
    got = count_visible(spec, B, T, S + registers, block=16)
    k_idx = jnp.arange(S + registers)[None, None, :]
    want = jnp.sum(visible(spec, jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None],
                           k_idx), axis=-1)
    np.testing.assert_array_equal(got, want)


@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(q=st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=12),
                  kv=st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=12))
def test_segment_ranks_preserve_equality(q, kv):
    q_ids = jnp.asarray([q], jnp.int32)
    kv_ids = jnp.asarray([kv], jnp.int32)
    rq, rk = segment_ranks(q_ids, kv_ids)
    np.testing.assert_array_equal(np.asarray(rq)[0][:, None] == np.asarray(rk)[0][None, :],
                                  np.asarray(q_ids)[0][:, None] == np.asarray(kv_ids)[0][None, :])
    assert np.all(np.asarray(rq) < len(q) + len(kv)) and np.all(np.asarray(rq) >= 0)


@pytest.mark.parametrize("q_dtype", [np.int32, np.int64])
def test_segment_ranks_mixed_and_wide_ids(q_dtype):
    """int64 key ids equal modulo 2**32 to query ids (int32 or int64 queries): equal ranks
    exactly where the ids are equal (neither side cast to a narrower type)."""
    q = np.array([[0, 1, -(2**31), 5]], q_dtype)
    kv = np.array([[2**32, 1, -(2**31), 2**32 + 1, 0, 2**32 + 5]], np.int64)
    rq, rk = segment_ranks(jnp.asarray(q), jnp.asarray(kv))
    assert rq.dtype == rk.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(rq)[0][:, None] == np.asarray(rk)[0][None, :],
                                  q[0][:, None] == kv[0][None, :])


@hypothesis.settings(deadline=None, max_examples=4)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([jnp.bfloat16, jnp.float16]),
                  causal=st.booleans(), use_c=st.booleans(), use_b=st.booleans(),
                  a=st.floats(0.05, 0.5))
def test_random_flags(seed, dtype, causal, use_c, use_b, a):
    """One fixed shape bucket (GQA, ragged S); values, dtype, scale and flags drawn."""
    q, k, v, c, b = _inputs(seed, 1, 128, 120, 4, 2, 64, 64, dtype, use_c, use_b)
    _compare(q, k, v, c, b, MaskSpec(is_causal=causal), a=a)


# The statistics sweep's warpgroup layouts: ping-pong (the forward's), two or three free-running
# compute warpgroups (3 or 4 x 64 rows: T = 200 leaves a ragged CTA).
STATS_CONFIGS = {
    "pingpong": BLOCKS,
    "free2": BlockSizes(block_q=64, block_kv=64, pingpong=False),
    "free3": BlockSizes(block_q=64, block_kv=64, compute_wgs=3, pingpong=False),
    "free4": BlockSizes(block_q=64, block_kv=64, compute_wgs=4, pingpong=False),
    # without the V stream (BlockSizes.sweep_skips_v)
    "pingpong_skipv": dataclasses.replace(BLOCKS, sweep_skips_v=True),
    "free3_skipv": BlockSizes(block_q=64, block_kv=64, compute_wgs=3, pingpong=False,
                              sweep_skips_v=True),
    # part or all of each tile's exponentials on the FMA pipe (BlockSizes.exp2_fma_cols)
    "free2_fma16": BlockSizes(block_q=64, block_kv=64, pingpong=False, exp2_fma_cols=16),
    "pingpong_fma64": dataclasses.replace(BLOCKS, exp2_fma_cols=64),
}


@pytest.mark.parametrize("name", sorted(STATS_CONFIGS))
def test_stats_sweep(name):
    """flash_stats (P @ V skipped): the lse and exact entropy of softmax(z), as the main kernel's."""
    q, k, v, c, b = _inputs(5, 1, 200, 136, 2, 1, 64, 64, jnp.bfloat16, True, True)
    spec = MaskSpec(is_causal=True, kv_lengths=jnp.array([120]))
    lse, ent = flash_stats(q, k, logit_scale=0.2, query_scale=c, key_bias=b, mask=spec,
                           config=STATS_CONFIGS[name])
    _, r_lse, r_ent, _ = reference_rows(q, k, v, np.arange(200), a=0.2, c=c, b=b, spec=spec)
    np.testing.assert_allclose(lse, r_lse, atol=STAT_TOL, rtol=STAT_TOL)
    np.testing.assert_allclose(ent, r_ent, atol=STAT_TOL, rtol=STAT_TOL)
    _, f_lse, f_ent, _ = flash_forward(q, k, v, logit_scale=0.2, query_scale=c, key_bias=b,
                                       mask=spec, config=BLOCKS, return_stats=True)
    np.testing.assert_allclose(lse, f_lse, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ent, f_ent, atol=1e-6, rtol=1e-6)


def test_unsupported_inputs_raise():
    q, k, v, _, _ = _inputs(0, 1, 64, 64, 1, 1, 64, 64, jnp.bfloat16, False, False)
    with pytest.raises(NotImplementedError, match="bfloat16 or float16 q"):
        flash_forward(q.astype(jnp.float32), k, v, logit_scale=0.1)
    big = jnp.zeros((1, 64, 1, 320), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="head dims above 256"):
        flash_forward(big, big, big, logit_scale=0.1)
    with pytest.raises(TypeError, match="logit_scale must be a python float"):
        flash_forward(q, k, v, logit_scale=jnp.float32(0.1))
    with pytest.raises(TypeError, match="v dtype"):
        flash_forward(q, k, v.astype(jnp.float16), logit_scale=0.1)
    with pytest.raises(ValueError, match="block_kv must be a positive multiple of 64"):
        BlockSizes(block_q=64, block_kv=96)
    with pytest.raises(ValueError, match="max_concurrent_steps"):
        BlockSizes(max_concurrent_steps=1)
    with pytest.raises(ValueError, match="compute_wgs must be one of"):
        BlockSizes(compute_wgs=5, pingpong=False)
    with pytest.raises(ValueError, match="pingpong needs compute_wgs == 2"):
        BlockSizes(compute_wgs=3)
    with pytest.raises(ValueError, match="intra_overlap needs pingpong=False"):
        BlockSizes(intra_overlap=True)
    with pytest.raises(ValueError, match="intra_overlap must be a bool"):
        BlockSizes(intra_overlap=1, pingpong=False)
    for cols in (12, 72, -8, 8.0, True):
        with pytest.raises(ValueError, match=r"exp2_fma_cols must be a multiple of 8 in \[0, block_kv"):
            BlockSizes(block_q=64, block_kv=64, exp2_fma_cols=cols)
    with pytest.raises(ValueError, match=r"row_max must broadcast to \[B, N, T\]"):
        flash_forward(q, k, v, logit_scale=0.1, row_max=jnp.zeros((1, 64, 1)))
    with pytest.raises(TypeError, match="row_max must be a float array"):
        flash_forward(q, k, v, logit_scale=0.1, row_max=jnp.zeros((1, 1, 64), jnp.int32))


def test_default_block_sizes():
    """The tuned table: D = 64 with c takes 128-key tiles (256-key ones spill there); a key bias
    takes mma_bias at D = 64 and 128."""
    from pallas_kernels.forward import DEFAULT_BLOCK_SIZES, default_block_sizes
    assert default_block_sizes(64) == DEFAULT_BLOCK_SIZES[64]
    assert default_block_sizes(64, query_scale=True).block_kv == 128
    assert not default_block_sizes(64, query_scale=True).mma_bias
    # given the row max: 256-key tiles with c at D = 64 unless a mask hides keys
    assert default_block_sizes(64, True, fixed_max=True, masked=False).block_kv == 256
    assert default_block_sizes(64, True, fixed_max=True, masked=True).block_kv == 128
    assert default_block_sizes(64, True, True, fixed_max=True, masked=False).block_kv == 128
    for D in (64, 128):
        assert default_block_sizes(D, key_bias=True).mma_bias
        assert default_block_sizes(D, True, True).mma_bias
        assert not default_block_sizes(D).mma_bias
    for D in (192, 256):
        for c, b in ((False, False), (False, True), (True, True)):
            assert default_block_sizes(D, c, b) == DEFAULT_BLOCK_SIZES[D]
    # D = 256 with c alone folds it into Q (the H200 tune); D = 192 keeps the table
    assert default_block_sizes(256, True) == dataclasses.replace(DEFAULT_BLOCK_SIZES[256], fold_scale=True)
    assert default_block_sizes(192, True) == DEFAULT_BLOCK_SIZES[192]
    # D = 64 causal over <= 2048 keys, no c / b: the 128-key tiles; longer or non-causal: the table
    assert default_block_sizes(64, causal_keys=1024).block_kv == 128
    assert default_block_sizes(64, causal_keys=2048).block_kv == 128
    assert default_block_sizes(64, causal_keys=2049) == DEFAULT_BLOCK_SIZES[64]
    assert default_block_sizes(64, causal_keys=0) == DEFAULT_BLOCK_SIZES[64]
    assert default_block_sizes(64, key_bias=True, causal_keys=1024) == default_block_sizes(64, key_bias=True)
    assert default_block_sizes(128, causal_keys=1024) == DEFAULT_BLOCK_SIZES[128]


def test_prepare_passes_causal_key_count():
    """The forward's plan takes the short-causal tiles from the mask and the key count."""
    from pallas_kernels.common import MaskSpec
    from pallas_kernels.forward import DEFAULT_BLOCK_SIZES, _prepare
    q = jnp.ones((1, 64, 1, 64), jnp.bfloat16)
    for S, causal, block_kv in ((1000, True, 128), (3000, True, DEFAULT_BLOCK_SIZES[64].block_kv),
                                (1000, False, DEFAULT_BLOCK_SIZES[64].block_kv)):
        k = jnp.ones((1, S, 1, 64), jnp.bfloat16)
        plan = _prepare(q, k, k, 0.1, None, None, MaskSpec(is_causal=causal), None, True,
                        stats=True, pv=True)[0]
        assert plan.blocks.block_kv == block_kv


def test_sweep_without_v_refuses_64_key_tiles_above_d128():
    """The V-less statistics sweep with 64-key tiles at D = 256 hit an illegal instruction on the
    H200: it raises NotImplementedError (naming the constraint) before any kernel runs; D = 64
    keeps the 64-key V-less layouts the interpreter tests use."""
    from pallas_kernels.forward import _prepare
    cfg = BlockSizes(block_q=64, block_kv=64, pingpong=False, sweep_skips_v=True)
    q = jnp.ones((1, 128, 1, 256), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="block_kv >= 128, got 64"):
        _prepare(q, q, None, 0.1, None, None, MaskSpec(), cfg, True, stats=True, pv=False)
    q64 = jnp.ones((1, 128, 1, 64), jnp.bfloat16)
    plan = _prepare(q64, q64, None, 0.1, None, None, MaskSpec(), cfg, True, stats=True, pv=False)[0]
    assert plan.blocks.sweep_skips_v and plan.blocks.block_kv == 64


def test_default_stats_block_sizes():
    """The statistics sweep: 4 free-running warpgroups without the V stream at D = 64 and 128
    (any mask), the forward's tiles and bias path otherwise; every choice fits the register
    split."""
    from pallas_kernels.forward import _COMPUTE_REGISTERS, default_block_sizes, default_stats_block_sizes
    for D in (64, 128):
        for c in (False, True):
            for b in (False, True):
                cfg = default_stats_block_sizes(D, c, b)
                assert (cfg.compute_wgs, cfg.pingpong, cfg.block_kv) == (4, False, 128)
                assert cfg.sweep_skips_v
                assert cfg.mma_bias == default_block_sizes(D, c, b).mma_bias
    for c in (False, True):  # D = 256: 2 free warpgroups, 128-key tiles, no V
        cfg = default_stats_block_sizes(256, c)
        assert (cfg.compute_wgs, cfg.pingpong, cfg.block_kv, cfg.sweep_skips_v) == (2, False, 128, True)
        assert cfg.fold_scale == default_block_sizes(256, c).fold_scale
    assert default_stats_block_sizes(192) == default_block_sizes(192)
    assert not default_stats_block_sizes(192).sweep_skips_v
    # setmaxnreg.inc only takes what the TMA warpgroup released: 128 (wgs + 1) threads start with
    # 64 K / threads registers each (rounded down to 8)
    for wgs, regs in _COMPUTE_REGISTERS.items():
        launch = 65536 // (128 * (wgs + 1)) // 8 * 8
        assert regs % 8 == 0 and wgs * (regs - launch) <= launch - 40


MMA = BlockSizes(block_q=64, block_kv=64, max_concurrent_steps=2, fold_scale=True, mma_bias=True)


def _rbf_bias(k, offset=30.0):
    """RBF's ``-||k_j||^2 / sqrt(H)`` plus an offset: |b| ~ 20-40, more than one bf16 term holds."""
    kf = k.astype(jnp.float32)
    return offset - jnp.transpose(jnp.sum(kf * kf, -1), (0, 2, 1)) / np.sqrt(k.shape[-1])


@pytest.mark.parametrize("mask_kw, R, use_c", [({}, 0, False), (dict(is_causal=True), 2, True),
                                               (dict(kv_lengths=np.array([150, 90])), 0, False)])
def test_mma_bias_kernel(mask_kw, R, use_c):
    """The key bias added by the second wgmma (three bf16 parts) matches the reference: output
    and every statistic, with and without a per-query scale, under masks."""
    from pallas_kernels import forward
    B, T, S, N, K, H = 2, 128, 200, 4, 2, 64
    q, k, v, c, _ = _inputs(9, B, T, S + R, N, K, H, H, jnp.bfloat16, use_c, False)
    b = _rbf_bias(k)
    spec = MaskSpec(num_registers=R, **mask_kw)
    plan, _ = forward._prepare(q, k, v, 0.2, c, b, spec, MMA, None, stats=True, pv=True)
    assert plan.mma_bias and not plan.has_bias
    _compare(q, k, v, c, b, spec, config=MMA)
    lse, ent = flash_stats(q, k, logit_scale=0.2, query_scale=c, key_bias=b, mask=spec, config=MMA)
    _, r_lse, r_ent, _ = reference_rows(q, k, v, np.arange(T), a=0.2, c=c, b=b, spec=spec)
    np.testing.assert_allclose(lse, r_lse, atol=STAT_TOL, rtol=STAT_TOL)
    np.testing.assert_allclose(ent, r_ent, atol=STAT_TOL, rtol=STAT_TOL)


def test_mma_bias_float16_keeps_the_strip():
    """float16 inputs do not take mma_bias (the split could overflow); the result is still right."""
    from pallas_kernels import forward
    q, k, v, _, _ = _inputs(10, 1, 128, 128, 2, 1, 64, 64, jnp.float16, False, False)
    b = _rbf_bias(k)
    spec = MaskSpec(is_causal=True)
    plan, _ = forward._prepare(q, k, v, 0.2, None, b, spec, MMA, None, stats=True, pv=True)
    assert plan.has_bias and not plan.mma_bias
    _compare(q, k, v, None, b, spec, config=MMA)


@hypothesis.settings(deadline=None, max_examples=50)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-20, 20), jit=st.booleans())
def test_split_bias_sums_to_float32(seed, log_scale, jit):
    """Three bf16 parts of a float32 vector sum back to it exactly (eagerly and under jit)."""
    from pallas_kernels.common import MMA_BIAS_TERMS, MMA_BIAS_WIDTH, split_bias
    x = jax.random.normal(jax.random.key(seed), (3, 40), jnp.float32) * np.float32(2.0**log_scale)
    parts = (jax.jit(split_bias) if jit else split_bias)(x)
    assert parts.shape == (3, 40, MMA_BIAS_WIDTH) and parts.dtype == jnp.bfloat16
    assert not np.asarray(parts[..., MMA_BIAS_TERMS:], np.float32).any()
    np.testing.assert_array_equal(np.asarray(parts, np.float64).sum(-1), np.asarray(x, np.float64))


def test_split_bias_non_finite():
    """-inf (a key masked by its bias) stays whole in the first part, the others are 0, no NaN."""
    from pallas_kernels.common import split_bias
    parts = np.asarray(split_bias(jnp.array([-jnp.inf, 3.0, jnp.inf])), np.float32)
    assert parts[0, 0] == -np.inf and parts[2, 0] == np.inf
    assert not np.isnan(parts).any() and not parts[[0, 2], 1:].any()


def test_gpu_check_case_runs_in_the_interpreter(monkeypatch):
    """`python -m checks.forward`'s per-case routine (with --flip-mma-bias) at a tiny size."""
    from checks import forward as check
    monkeypatch.setattr(check, "_poison", lambda: None)  # 2 GiB of NaN: a GPU habit
    case = ("tiny rbf causal", 1, 128, 128, 2, 1, 64, "bfloat16", dict(is_causal=True), False,
            True, 0)
    res = check.check_case(case, flip_mma_bias=True)
    assert res["pass"], res
    assert res["flip_out_rel"] < 1e-2 and res["flip_lse"] < 1e-4
    assert check.parse_overrides("intra_overlap=1,pingpong=0", BlockSizes) == dict(
        intra_overlap=True, pingpong=False)
    # c of either sign without the promise, at a size whose default tiles fold (row_flip)
    case = ("tiny signed c", 1, 256, 256, 2, 2, 64, "bfloat16", {}, "signed", False, 0)
    q, _, v, c, b, _ = check._make(case, 0)
    assert _fwd._blocks(q, v, None, c, b)[1].fold_scale and bool((c < 0).any())
    res = check.check_case(case)
    assert res["pass"], res


@pytest.mark.parametrize("config", [BLOCKS, MMA, dataclasses.replace(BLOCKS, exp2_fma_cols=32)],
                         ids=["strip", "mma_bias", "fma32"])
def test_fixed_row_max(config):
    """The forward given the exact row max (the statistics sweep's, times a per-query factor
    beta >= 0, as adaptive temperature runs it) skips the online max: same results as the
    reference, rows without a visible key zeros; a wrong max changes the statistics."""
    B, T, S, N, K, H = 2, 200, 136, 2, 1, 64
    q, k, v, _, b = _inputs(11, B, T, S, N, K, H, H, jnp.bfloat16, False, True)
    beta = jax.random.uniform(jax.random.key(3), (B, N, T), jnp.float32, 1.0, 3.0)
    spec = MaskSpec(is_causal=True, q_lengths=jnp.array([180, 200]), kv_lengths=jnp.array([120, 0]))
    _, _, m = flash_stats(q, k, logit_scale=0.2, key_bias=b, mask=spec, config=config,
                          return_row_max=True)
    row_max = scale_row_max(m, beta)
    out, lse, ent, mw = flash_forward(q, k, v, logit_scale=0.2, query_scale=beta, key_bias=b,
                                      mask=spec, config=config, return_stats=True, row_max=row_max)
    r_out, r_lse, r_ent, r_mw = reference_rows(q, k, v, np.arange(T), a=0.2, c=beta, b=b, spec=spec)
    np.testing.assert_allclose(np.asarray(out, np.float32), r_out, atol=OUT_TOL[q.dtype], rtol=0)
    for x, r in ((lse, r_lse), (ent, r_ent), (mw, r_mw)):
        np.testing.assert_allclose(x, r, atol=STAT_TOL, rtol=STAT_TOL)
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)  # kv_lengths 0
    off = flash_forward(q, k, v, logit_scale=0.2, query_scale=beta, key_bias=b, mask=spec,
                        config=config, return_stats=True, row_max=row_max - 1.0)[3]
    assert not np.allclose(off, r_mw, atol=STAT_TOL, rtol=STAT_TOL)


@hypothesis.settings(deadline=None, max_examples=2)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), layout=st.sampled_from(sorted(STATS_CONFIGS)),
                  causal=st.booleans(), use_c=st.booleans(), use_b=st.booleans(),
                  lengths=st.booleans())
def test_random_stats_layouts_and_fixed_max(seed, layout, causal, use_c, use_b, lengths):
    """One shape bucket (GQA, ragged T and S); warpgroup layout, flags and values drawn: the
    statistics sweep's lse, entropy and row max, then the forward given that row max, against the
    reference."""
    B, T, S, N, K, H = 2, 136, 120, 4, 2, 64
    q, k, v, c, b = _inputs(seed, B, T, S, N, K, H, H, jnp.bfloat16, use_c, use_b)
    kv_len = jnp.array([S, S // 2]) if lengths else None
    spec = MaskSpec(is_causal=causal, kv_lengths=kv_len)
    lse, ent, m = flash_stats(q, k, logit_scale=0.2, query_scale=c, key_bias=b, mask=spec,
                              config=STATS_CONFIGS[layout], return_row_max=True)
    r_out, r_lse, r_ent, r_mw = reference_rows(q, k, v, np.arange(T), a=0.2, c=c, b=b, spec=spec)
    np.testing.assert_allclose(lse, r_lse, atol=STAT_TOL, rtol=STAT_TOL)
    np.testing.assert_allclose(ent, r_ent, atol=STAT_TOL, rtol=STAT_TOL)
    # the row max: lse - ln(1 / max weight), in base 2
    visible_rows = np.asarray(r_mw) > 0
    want_m = (np.asarray(r_lse) + np.log(np.where(visible_rows, r_mw, 1.0))) / np.log(2.0)
    np.testing.assert_allclose(np.asarray(m)[visible_rows], want_m[visible_rows], atol=1e-3, rtol=1e-5)
    assert np.all(np.asarray(m)[~visible_rows] <= -5e29)
    out, lse2, ent2, mw2 = flash_forward(q, k, v, logit_scale=0.2, query_scale=c, key_bias=b,
                                         mask=spec, config=BLOCKS, return_stats=True, row_max=m)
    np.testing.assert_allclose(np.asarray(out, np.float32), r_out, atol=OUT_TOL[q.dtype], rtol=0)
    for x, r in ((lse2, r_lse), (ent2, r_ent), (mw2, r_mw)):
        np.testing.assert_allclose(x, r, atol=STAT_TOL, rtol=STAT_TOL)


def test_fixed_row_max_default_tiles():
    """The fixed-max forward's own default tiles (256 keys at D = 64 with c, no mask; ragged S)."""
    B, T, S, N, K, H = 1, 130, 300, 2, 1, 64
    q, k, v, _, _ = _inputs(12, B, T, S, N, K, H, H, jnp.bfloat16, False, False)
    beta = jax.random.uniform(jax.random.key(4), (B, N, T), jnp.float32, 1.0, 3.0)
    _, _, m = flash_stats(q, k, logit_scale=0.2, return_row_max=True)
    out, lse = flash_forward(q, k, v, logit_scale=0.2, query_scale=beta, query_scale_nonnegative=True,
                             row_max=scale_row_max(m, beta))
    r_out, r_lse, _, _ = reference_rows(q, k, v, np.arange(T), a=0.2, c=beta, b=None, spec=MaskSpec())
    np.testing.assert_allclose(np.asarray(out, np.float32), r_out, atol=OUT_TOL[q.dtype], rtol=0)
    np.testing.assert_allclose(lse, r_lse, atol=STAT_TOL, rtol=STAT_TOL)


def test_row_max_from_stats():
    """The row max derived from the forward's lse and max weight (adaptive temperature's gradient
    path) is the statistics sweep's, rows without a visible key included."""
    from pallas_kernels.forward import row_max_from_stats
    q, k, v, c, b = _inputs(12, 2, 128, 120, 2, 1, 64, 64, jnp.bfloat16, True, True)
    spec = MaskSpec(is_causal=True, kv_lengths=jnp.array([120, 0]))
    _, lse, _, mw = flash_forward(q, k, v, logit_scale=0.2, query_scale=c, key_bias=b, mask=spec,
                                  config=BLOCKS, return_stats=True)
    _, _, m = flash_stats(q, k, logit_scale=0.2, query_scale=c, key_bias=b, mask=spec,
                          config=BLOCKS, return_row_max=True)
    np.testing.assert_allclose(row_max_from_stats(lse, mw)[0], m[0], atol=1e-4, rtol=1e-5)
    assert np.all(np.asarray(row_max_from_stats(lse, mw)[1]) <= -5e29)
    assert np.all(np.asarray(m[1]) <= -5e29)
