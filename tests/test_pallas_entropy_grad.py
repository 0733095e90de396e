"""The fused gradient through an entropy-dependent query scale (adaptive temperature's beta).

:func:`pallas_kernels.flash_backward` with a :class:`~pallas_kernels.BaseEntropy` and the op
:func:`pallas_kernels.flash_entropy_scaled` against ``jax.grad`` of the float32 oracle composed the
same way: ``H0 = entropy(softmax(a q.k))``, ``c = f(H0)``, ``out = attention(c a q.k)``, with the
gradient flowing through ``f``. On CPU the kernels run in the Mosaic GPU interpreter (NaN-poisoned
outputs: an unwritten element fails every comparison).

Error model (relative Frobenius error per gradient): the kernels round ``dZ`` and the entropy
term's ``p0 (s - m)`` to the 16-bit input dtype before their products (relative error 2^-8 in
bf16, 2^-11 in f16 per element, as every flash backward's dZ), accumulate in float32, and form
``g_i = f'(H_i) dc_i`` from float32 row sums; measured errors are 5e-3 to 7e-3 (bf16), the bounds
the same as the plain backward's: 1e-2 (bf16) and 3e-3 (f16). Each test also checks that the
entropy term is larger than the bound (the oracle with ``stop_gradient(c)`` is farther than 5x the
tolerance), so dropping or mis-scaling the term fails it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import backward
from pallas_kernels.backward import BackwardBlockSizes
from pallas_kernels.common import BaseEntropy, MaskSpec, flash_reference
from tests.interpreter import blocking, needs_interpreter_threads

pytestmark = needs_interpreter_threads

TOL = {jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 3e-3}
A = 0.3


def _scale(h):
    """A smooth, nonlinear, positive ``f(H)`` whose derivative varies by row."""
    return 1.0 + 0.1 * h * h * h


def _inputs(seed, B, T, S, N, K, H, dtype):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(dtype)
    dout = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)
    dlse = jax.random.normal(ks[4], (B, N, T), jnp.float32)
    return q, k, v, dout, dlse


def _oracle(q, k, v, spec, scale=_scale, stop=False):
    """float32 ``(out, lse)`` with ``c = scale(H0)`` (``stop``: no gradient through ``c``)."""
    _, lse0, ent0, _ = flash_reference(q, k, v, logit_scale=A, mask=spec, return_stats=True)
    c = scale(ent0)
    c = jax.lax.stop_gradient(c) if stop else c
    out, lse = flash_reference(q, k, v, logit_scale=A, query_scale=c, mask=spec)
    return out, lse, lse0, ent0, c


def _check(got, want, without, dtype, names="qkv"):
    tol = TOL[jnp.dtype(dtype)]
    for name, g, w, w0 in zip(names, got, want, without, strict=True):
        g, w, w0 = (np.asarray(x, np.float64) for x in (g, w, w0))
        assert np.all(np.isfinite(g)), f"d{name} has NaN or inf"
        err = np.linalg.norm(g - w) / np.linalg.norm(w)
        assert err < tol, f"d{name}: relative error {err:.2e} >= {tol:.0e}"
        if name in "qk":  # the entropy term is seen: far above the tolerance
            assert np.linalg.norm(w0 - w) / np.linalg.norm(w) > 5 * tol, name


# (B, T, S, N, K, H, dtype, mask kwargs, registers, config overrides)
CASES = {
    "plain_gqa2": (1, 128, 128, 4, 2, 64, jnp.bfloat16, {}, 0, {}),
    "causal_lengths_registers": (2, 128, 130, 2, 1, 64, jnp.bfloat16, "lengths", 2, {}),
    "window_f16": (1, 128, 128, 2, 1, 64, jnp.float16, dict(local_window_size=(30, 4)), 0, {}),
    "d128_causal": (1, 128, 128, 2, 1, 128, jnp.bfloat16, dict(is_causal=True), 0, {}),
    "dc_mma_overlap": (1, 128, 128, 2, 1, 64, jnp.bfloat16, dict(is_causal=True), 0,
                       dict(dc_mma=True, overlap=True)),
    "overlap_edge_masks": (1, 128, 128, 2, 1, 64, jnp.bfloat16, dict(is_causal=True), 0,
                           dict(overlap=True, dkv_edge_masks=True, dq_edge_masks=True)),
    "serial_dkv_split": (1, 128, 128, 2, 1, 64, jnp.bfloat16, dict(is_causal=True), 0,
                         dict(dkv_split=True)),
    # p and p0 of the first 24 columns of each tile from the FMA pipe's polynomial
    "fma24_lengths": (2, 128, 130, 2, 1, 64, jnp.bfloat16, "lengths", 2, dict(exp2_fma_cols=24)),
}


def _spec(kind, B, T, S, R):
    if kind == "lengths":  # batch 1's last queries see nothing: fully masked rows
        return MaskSpec(q_lengths=jnp.asarray([T, T - 9], jnp.int32),
                        kv_lengths=jnp.asarray([S - R - 7, S - R], jnp.int32), is_causal=True,
                        num_registers=R)
    return MaskSpec(num_registers=R, **kind)


@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_backward_base_entropy(name):
    """dq, dk, dv of ``flash_backward(base_entropy=)`` against the oracle's gradient through
    ``c = f(H0)``; each dq / dk / dv kernel path (serial, overlap, dc_mma, edge masks, split dk/dv)."""
    B, T, S, N, K, H, dtype, mask_kw, R, overrides = CASES[name]
    q, k, v, dout, _ = _inputs(1, B, T, S, N, K, H, dtype)
    spec = _spec(mask_kw, B, T, S, R)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out, lse, lse0, ent0, c = _oracle(*f32, spec)
    scale_grad = jax.vmap(jax.grad(_scale))(ent0.ravel()).reshape(ent0.shape)
    base = BaseEntropy(lse0, ent0, scale_grad)
    config = None
    if overrides:
        config = BackwardBlockSizes(**{**dict(block_q_dq=64, block_kv_dq=64, block_q_dkv=64,
                                              block_kv_dkv=64), **overrides})
    got = blocking(backward.flash_backward)(q, k, v, out, lse, dout.astype(dtype), logit_scale=A,
                                            query_scale=c, mask=spec, base_entropy=base,
                                            config=config)

    def loss(q, k, v, stop=False):
        return jnp.sum(_oracle(q, k, v, spec, stop=stop)[0] * dout.astype(dtype).astype(jnp.float32))

    want = jax.grad(loss, (0, 1, 2))(*f32)
    without = jax.grad(lambda *x: loss(*x, stop=True), (0, 1, 2))(*f32)
    _check(got[:3], want, without, dtype)
    if mask_kw == "lengths":  # rows with no visible key: zero dq
        np.testing.assert_array_equal(np.asarray(got[0], np.float32)[1, T - 9:], 0.0)


def test_entropy_scaled_op_with_lse_cotangent_and_operand():
    """:func:`pallas_kernels.flash_entropy_scaled` under jit and grad: the output, and dq, dk, dv
    and the scale operand's gradient with cotangents on both the output and the logsumexp (the
    lse term reaches ``c``'s cotangent, hence ``g``), against the oracle."""
    B, T, S, N, K, H = 1, 128, 128, 2, 1, 64
    q, k, v, dout, dlse = _inputs(2, B, T, S, N, K, H, jnp.bfloat16)
    spec = MaskSpec(is_causal=True)
    t0 = jnp.asarray([[[0.4], [0.7]]], jnp.float32)  # [1, N, 1]: one slope per head

    def scale(h, t):
        return 1.0 + t * h

    def ours(q, k, v, t):
        out, lse = pk.flash_entropy_scaled(q, k, v, logit_scale=A, scale_fn=scale,
                                           scale_operands=(t,), mask=spec,
                                           query_scale_nonnegative=True)
        return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(lse * dlse), out

    def oracle(q, k, v, t, stop=False):
        out, lse, *_ = _oracle(q, k, v, spec, scale=lambda h: scale(h, t), stop=stop)
        return jnp.sum(out * dout) + jnp.sum(lse * dlse), out

    (_, out), got = jax.block_until_ready(
        jax.jit(jax.value_and_grad(ours, (0, 1, 2, 3), has_aux=True))(q, k, v, t0))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, out_ref), want = jax.value_and_grad(oracle, (0, 1, 2, 3), has_aux=True)(*f32, t0)
    without = jax.grad(lambda *x: oracle(*x, stop=True)[0], (0, 1, 2, 3))(*f32, t0)
    err = np.linalg.norm(np.asarray(out, np.float64) - out_ref) / np.linalg.norm(out_ref)
    assert err < TOL[jnp.dtype(jnp.bfloat16)], err
    _check(got[:3], want[:3], without[:3], jnp.bfloat16)
    # the operand's gradient: f's VJP of c's cotangent (float32 sums; the oracle's exact)
    np.testing.assert_allclose(np.asarray(got[3]), np.asarray(want[3]), rtol=1e-2)
    assert np.all(np.asarray(without[3]) == 0.0)


def test_library_adaptive_temperature_takes_the_fused_op(monkeypatch):
    """``jaxattn.attention(variant=AdaptiveTemperature(), implementation="pallas")`` with its
    default (gradient through beta) runs :func:`pallas_kernels.flash_entropy_scaled`, and its
    gradient matches the XLA path's."""
    import jaxattn
    from jaxattn import variants
    calls = []
    real = pk.flash_entropy_scaled
    monkeypatch.setattr(pk, "flash_entropy_scaled", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, dout, _ = _inputs(3, 1, 128, 128, 2, 1, 64, jnp.bfloat16)
    variant = variants.AdaptiveTemperature()

    def loss(q, k, v, impl):
        out = jaxattn.attention(q, k, v, variant=variant, is_causal=True, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * dout)

    got = jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(
        q, k, v, "pallas"))
    assert calls, "the fused op was not called"
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(loss, (0, 1, 2))(*f32, "xla")
    for name, g, w in zip("qkv", got, want, strict=True):
        err = np.linalg.norm(np.asarray(g, np.float64) - w) / np.linalg.norm(w)
        assert err < TOL[jnp.dtype(jnp.bfloat16)], (name, err)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(query_scale=None), ValueError, "needs the query_scale"),
    (dict(query_scale_grad=False), ValueError, "query_scale_grad=True"),
    (dict(key_bias=True), NotImplementedError, "key_bias or a soft cap"),
    (dict(kernels=("dq",)), ValueError, "both kernels"),
    (dict(base_entropy="lse"), TypeError, "BaseEntropy"),
    (dict(bad_shape=True), ValueError, r"base_entropy.entropy must have shape"),
])
def test_base_entropy_bad_input(kwargs, error, match):
    B, T, N, H = 1, 64, 2, 64
    q, k, v, dout, _ = _inputs(4, B, T, T, N, N, H, jnp.bfloat16)
    rows = jnp.zeros((B, N, T), jnp.float32)
    base = BaseEntropy(rows, jnp.zeros((B, N, T + 1)) if kwargs.pop("bad_shape", False) else rows,
                       rows)
    args = dict(logit_scale=A, query_scale=rows + 1, base_entropy=base)
    if kwargs.pop("key_bias", False):
        args["key_bias"] = jnp.zeros((B, N, T), jnp.float32)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        backward.flash_backward(q, k, v, dout.astype(q.dtype), rows, dout.astype(q.dtype), **args)


def test_library_keeps_two_passes_where_tuning_says_fused_is_slower(monkeypatch):
    """Where :func:`pallas_kernels.fuses_entropy_grad` is False (D = 128 with a mask on sm90),
    the library runs the statistics sweep's own VJP instead of the fused op."""
    import jaxattn
    from jaxattn import variants
    assert not pk.fuses_entropy_grad(128, True) and pk.fuses_entropy_grad(128, False)
    monkeypatch.setattr(pk, "fuses_entropy_grad", lambda head_dim, masked: False)
    calls = []
    monkeypatch.setattr(pk, "flash_entropy_scaled", lambda *a, **kw: calls.append(1))
    q, k, v, _, _ = _inputs(5, 1, 64, 64, 2, 1, 64, jnp.bfloat16)
    out = jax.block_until_ready(jax.jit(lambda q, k, v: jaxattn.attention(
        q, k, v, variant=variants.AdaptiveTemperature(), implementation="pallas"))(q, k, v))
    assert not calls and out.shape == q.shape


def test_entropy_scaled_rejects_a_scale_that_is_not_callable():
    q, k, v, _, _ = _inputs(6, 1, 64, 64, 2, 1, 64, jnp.bfloat16)
    with pytest.raises(TypeError, match="scale_fn must be a callable"):
        pk.flash_entropy_scaled(q, k, v, logit_scale=A, scale_fn=2.0)
