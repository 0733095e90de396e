"""Hardmax on the fused forward kernel (:func:`pallas_kernels.flash_hardmax`), in the interpreter.

The kernel keeps each row's argmax set in one sweep: the online max empties the set where it
grows, ``d = z - m`` is 0 exactly at the max. The oracle is :func:`pallas_kernels.flash_reference`
with ``hardmax=True`` (float32 logits of the same 16-bit inputs). Inputs are small dyadic numbers,
so every logit is exact in float32 on both sides (products of halves, sums far below 2^24, scales
that are powers of two) and ties are real and frequent; one case draws normal inputs instead.

Error model (elementwise): the output is the mean of the ``count`` tied 16-bit values, summed in
float32 (each add within 2^-24 relative, so <= count 2^-24 max|v| in all; count stays far below
256 here), scaled by ``1 / count`` and rounded once to the input dtype (unit roundoff u: 2^-8 bf16,
2^-11 f16). So ``|out - ref| <= u |ref| + 2^-16 max|v|``. The statistics are float32 from the row
max and the count (``log2`` and the reciprocal in approximate math, ~2^-22 relative):
``rtol = atol = 1e-5``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
import pallas_kernels.ops as _ops
from pallas_kernels import BlockSizes, MaskSpec, flash_reference
from tests.interpreter import blocking, needs_interpreter_threads

pytestmark = needs_interpreter_threads

flash_hardmax = blocking(_ops.flash_hardmax)
BLOCKS = BlockSizes(block_q=64, block_kv=64, max_concurrent_steps=2)
OVERLAP = dataclasses.replace(BLOCKS, pingpong=False, intra_overlap=True)
UNIT_ROUNDOFF = {jnp.dtype(jnp.bfloat16): 2.0**-8, jnp.dtype(jnp.float16): 2.0**-11}
STAT_TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(seed, B, T, S, N, K, H, dtype, dyadic=True):
    rng = np.random.default_rng(seed)
    draw = (lambda *s: rng.integers(-2, 3, s) / 2.0) if dyadic else (
        lambda *s: rng.standard_normal(s))
    q = jnp.asarray(draw(B, T, N, H), dtype)
    k = jnp.asarray(draw(B, S, K, H), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
    return q, k, v


def _check(q, k, v, spec, a=0.25, c=None, cap=None, config=None):
    kw = dict(logit_scale=a, query_scale=c, mask=spec, logits_soft_cap=cap)
    if config is None:
        got = flash_hardmax(q, k, v, return_stats=True, **kw)
    else:  # the kernel with chosen tiles (the op picks the defaults)
        got = blocking(_ops.flash_forward)(q, k, v, return_stats=True, hardmax=True,
                                           config=config, **kw)
    # float32 copies of the same values: the oracle's output is then not rounded to 16 bits
    f32 = lambda x: x.astype(jnp.float32)
    want = flash_reference(f32(q), f32(k), f32(v), return_stats=True, hardmax=True, **kw)
    out, ref = np.asarray(got[0], np.float32), np.asarray(want[0])
    assert not np.isnan(out).any(), "an output the kernel did not write (interpreter NaN)"
    bound = UNIT_ROUNDOFF[q.dtype] * np.abs(ref) + 2.0**-16 * float(np.abs(v).max())
    err = np.abs(out - ref)
    assert np.all(err <= bound), f"output error {err.max()} above its bound at {np.argmax(err - bound)}"
    for name, x, y in zip(("logsumexp", "entropy", "max_weight"), got[1:], want[1:], strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=name, **STAT_TOL)
    return got, want


# (B, T, S, N, K, H, dtype, mask kwargs, registers, config)
CASES = {
    "plain_gqa": (1, 128, 128, 4, 2, 64, jnp.bfloat16, {}, 0, BLOCKS),
    "causal_registers_lengths": (2, 136, 200, 2, 1, 64, jnp.bfloat16,
                                 dict(is_causal=True, kv_lengths=jnp.array([0, 150]),
                                      q_lengths=jnp.array([136, 100])), 2, BLOCKS),
    "window_segments_f16": (1, 128, 192, 2, 2, 64, jnp.float16,
                            dict(local_window_size=(40, 7)), 1, BLOCKS),
    "overlap_causal": (1, 128, 128, 2, 1, 64, jnp.bfloat16, dict(is_causal=True), 0, OVERLAP),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name):
    B, T, S, N, K, H, dtype, mask_kw, R, config = CASES[name]
    q, k, v = _inputs(0, B, T, S + R, N, K, H, dtype)
    if name == "window_segments_f16":
        rng = np.random.default_rng(1)
        mask_kw = dict(mask_kw, q_segment_ids=jnp.asarray(np.sort(rng.integers(0, 3, (B, T))), jnp.int32),
                       kv_segment_ids=jnp.asarray(np.sort(rng.integers(0, 3, (B, S))), jnp.int32))
    spec = MaskSpec(num_registers=R, **mask_kw)
    got, want = _check(q, k, v, spec, config=config)
    ties = np.asarray(want[3])
    assert ((ties > 0) & (ties < 1)).any(), "the case must hold ties (rows with count > 1)"
    if "kv_lengths" in mask_kw:  # batch 0 sees only its registers; padded query rows nothing
        np.testing.assert_array_equal(np.asarray(got[0][1, 100:], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(got[1][1, :, 100:]), 0.0)


def test_normal_inputs_scale_and_cap():
    """Fresh normal inputs (no ties), a per-query scale of either sign (a traced logit scale's
    path) and a soft cap, which is monotone: the argmax set is that of the capped logits."""
    q, k, v = _inputs(2, 1, 128, 192, 2, 1, 64, jnp.bfloat16, dyadic=False)
    c = jnp.asarray(np.random.default_rng(3).uniform(-2.0, 2.0, (1, 2, 128)), jnp.float32)
    _check(q, k, v, MaskSpec(is_causal=True), a=0.125, c=c, config=BLOCKS)
    _check(q, k, v, MaskSpec(), a=0.125, cap=1.5, config=BLOCKS)


def test_duplicated_key_ties_exactly():
    """A key copied to another position ties with it on every row: both carry weight 1/2 where
    they hold the max (the online max meets the tie in another tile, 64 keys on)."""
    q, k, v = _inputs(4, 1, 64, 128, 1, 1, 64, jnp.bfloat16, dyadic=False)
    k = k.at[:, 100].set(k[:, 3])
    q = q.at[:, :32].set(k[:, 3:4])  # rows whose max is surely at keys 3 and 100
    out, _, _, mw = flash_hardmax(q, k, v, logit_scale=0.125, return_stats=True)
    z = np.einsum("th,sh->ts", np.asarray(q[0, :, 0], np.float32), np.asarray(k[0, :, 0], np.float32))
    rows = np.argmax(z, axis=1) == 3
    assert rows.any()
    np.testing.assert_array_equal(np.asarray(mw)[0, 0, rows], 0.5)
    mean = (np.asarray(v[0, 3, 0], np.float32) + np.asarray(v[0, 100, 0], np.float32)) / 2
    np.testing.assert_allclose(np.asarray(out[0, rows, 0], np.float32),
                               np.broadcast_to(mean, (rows.sum(), 64)), rtol=2.0**-8, atol=1e-6)


def test_forward_only_and_bad_input():
    q, k, v = _inputs(5, 1, 64, 64, 1, 1, 64, jnp.bfloat16)
    with pytest.raises(TypeError, match="forward-only"):
        jax.grad(lambda v: _ops.flash_hardmax(q, k, v, logit_scale=0.25)[0].astype(
            jnp.float32).sum())(v)
    with pytest.raises(ValueError, match="row_max"):
        _ops.flash_forward(q, k, v, logit_scale=0.25, hardmax=True,
                           row_max=jnp.zeros((1, 1, 64), jnp.float32))
    with pytest.raises(NotImplementedError, match="bfloat16 or float16"):
        _ops.flash_hardmax(q.astype(jnp.float32), k, v, logit_scale=0.25)


def test_api_fused_hardmax_and_value_gradient():
    """``jaxattn.attention(variant="hardmax", implementation="pallas")``: output and statistics
    as the float32 reference's, the value and register-value gradients as its (through the
    chunked sweep's VJP: the same argmax sets on exact logits), and the query gradient raising
    as the reference's does."""
    rng = np.random.default_rng(6)
    B, T, S, N, K, H = 2, 40, 72, 2, 1, 64
    q, k, v = _inputs(6, B, T, S, N, K, H, jnp.bfloat16)
    rk = jnp.asarray(rng.integers(-2, 3, (2, K, H)) / 2.0, jnp.bfloat16)
    rv = jnp.asarray(rng.standard_normal((2, K, H)), jnp.bfloat16)
    opts = dict(variant="hardmax", is_causal=True, scale=0.25,
                key_value_seq_lengths=jnp.array([0, 50]))
    f32 = lambda x: x.astype(jnp.float32)
    ct = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)

    def loss(impl, cast, ct):
        def f(v, rv):
            out, stats = jaxattn.attention(cast(q), cast(k), v, registers=(cast(rk), rv),
                                           implementation=impl, return_stats=True, **opts)
            return jnp.sum(f32(out) * ct), (out, stats)
        return f

    (_, (out, stats)), grads = jax.value_and_grad(loss("pallas", lambda x: x, ct), (0, 1),
                                                  has_aux=True)(v, rv)
    (_, (r_out, r_stats)), r_grads = jax.value_and_grad(loss("xla", f32, ct), (0, 1),
                                                        has_aux=True)(f32(v), f32(rv))
    u = UNIT_ROUNDOFF[jnp.dtype(jnp.bfloat16)]
    # The output: exact weights times bf16 values summed in float32, rounded once.
    got, want = np.asarray(f32(out)), np.asarray(r_out)
    assert np.all(np.abs(got - want) <= u * np.abs(want) + 1e-5 * np.abs(want).max())
    # The value gradients W^T dO: dO rounded to bf16 (u per term), summed in float32 and rounded
    # once (u): |error| <= u W^T |dO| + u |ref|, with W^T |dO| the reference's gradient for |ct|.
    abs_terms = jax.grad(lambda v, rv: loss("xla", f32, jnp.abs(ct))(v, rv)[0], (0, 1))(
        f32(v), f32(rv))
    for got, want, terms in zip(grads, r_grads, abs_terms, strict=True):
        got, want, terms = (np.asarray(f32(x)) for x in (got, want, terms))
        assert np.all(np.abs(got - want) <= u * (terms + np.abs(want)) + 1e-6 * terms.max())
    for x, y in zip(stats, r_stats, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **STAT_TOL)
    with pytest.raises(TypeError, match="forward-only"):
        jax.grad(lambda q: jaxattn.attention(q, k, v, implementation="pallas", **opts).astype(
            jnp.float32).sum())(q)
