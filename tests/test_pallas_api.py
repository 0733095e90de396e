"""``jaxattn.attention(implementation="pallas")`` against ``implementation="xla"`` for every kernel variant.

Runs the fused kernels in the Mosaic GPU interpreter on CPU (see ``tests/test_pallas_forward.py`` for
what that covers). The XLA side gets the same 16-bit inputs upcast to float32, so the differences are
the kernel's own rounding (P in the input dtype before P @ V, 16-bit gradients).
"""


import importlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import variants
from tests.interpreter import needs_interpreter_threads

B, T, S, N, K, H, R = 1, 128, 120, 4, 2, 64, 2
OUT_TOL = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 3e-3}
STAT_TOL = 2e-4
GRAD_RTOL = 3e-2  # max |g_kernel - g_ref| / max |g_ref|, 16-bit gradients



pytestmark = needs_interpreter_threads

VARIANTS = {
    "temperature": variants.Softmax(0.7),
    "scalable_softmax": variants.ScalableSoftmax(0.43),
    "rbf": variants.RBF(0.05),
    "adaptive_temperature": variants.AdaptiveTemperature(),
}


def _inputs(seed, dtype=jnp.bfloat16, registers=True):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(dtype)
    regs = None
    if registers:
        regs = (jax.random.normal(ks[3], (R, K, H), jnp.float32).astype(dtype),
                jax.random.normal(ks[4], (R, K, H), jnp.float32).astype(dtype))
    return q, k, v, regs


def _ready(x):
    """Waits for an interpreted kernel before queueing other work on the CPU device.

    The interpreter's simulated threads run eager jnp ops from io_callbacks; XLA work queued on
    the same device behind the kernel then waits for the kernel, which waits for those ops: a
    deadlock (py-spy: main thread in the XLA reference, a thread_map callback in apply_primitive).
    """
    return jax.block_until_ready(x)


def _f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


OPTIONS = dict(is_causal=True, query_seq_lengths=np.array([120], np.int32),
               key_value_seq_lengths=np.array([100], np.int32))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_forward_and_stats_match_xla(name):
    variant = VARIANTS[name]
    q, k, v, regs = _inputs(0)
    out, stats = _ready(jaxattn.attention(q, k, v, variant=variant, registers=regs,
                                          return_stats=True, implementation="pallas", **OPTIONS))
    r_out, r_stats = jaxattn.attention(*_f32((q, k, v)), variant=variant, registers=_f32(regs),
                                       return_stats=True, implementation="xla", **OPTIONS)
    assert out.dtype == q.dtype and out.shape == r_out.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), r_out, atol=OUT_TOL[q.dtype], rtol=0)
    for field in ("logsumexp", "entropy", "max_weight"):
        got, want = getattr(stats, field), getattr(r_stats, field)
        assert got.shape == want.shape == (B, N, T) and got.dtype == jnp.float32
        # adaptive: beta(H) sees the exact entropy here, the paper's log(p + 1e-9) one in XLA;
        # they differ by <= n * 1e-9 nats, far below the tolerance.
        np.testing.assert_allclose(got, want, atol=STAT_TOL, rtol=STAT_TOL, err_msg=field)


@hypothesis.settings(deadline=None, max_examples=3)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), temperature=st.floats(0.3, 3.0),
                  dtype=st.sampled_from([jnp.bfloat16, jnp.float16]), window=st.booleans())
def test_softmax_temperature_random(seed, temperature, dtype, window):
    q, k, v, _ = _inputs(seed, dtype, registers=False)
    opts = dict(local_window_size=(30, 10) if window else None)
    variant = variants.Softmax(temperature)
    out = _ready(jaxattn.attention(q, k, v, variant=variant, implementation="pallas", **opts))
    ref = jaxattn.attention(*_f32((q, k, v)), variant=variant, implementation="xla", **opts)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=OUT_TOL[q.dtype], rtol=0)


GRAD_LABELS = ("dq", "dk", "dv", "dregister_k", "dregister_v", "dparam")


def _assert_grads_close(labels, got, want):
    """Each kernel gradient finite and within GRAD_RTOL of the largest entry of XLA's."""
    for label, a, b in zip(labels, got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a)), label
        scale = max(np.abs(b).max(), 1e-6)
        assert np.abs(a - b).max() <= GRAD_RTOL * scale, (label, np.abs(a - b).max(), scale)


def _loss(q, k, v, rk, rv, param, name, impl):
    variant = dict(
        softmax=lambda p: variants.Softmax(p),
        scalable_softmax=lambda p: variants.ScalableSoftmax(p),
        rbf=lambda p: variants.RBF(p),
    )[name](param)
    g = jnp.cos(jnp.arange(H, dtype=jnp.float32))[None, None, None, :]
    out = jaxattn.attention(q, k, v, variant=variant, registers=(rk, rv), implementation=impl,
                            **OPTIONS)
    return jnp.sum(out.astype(jnp.float32) * g)


_grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2, 3, 4, 5)), static_argnames=("name", "impl"))


@pytest.mark.parametrize("name, param", [("softmax", 0.8), ("scalable_softmax", 0.43),
                                         ("rbf", 0.05)])
def test_gradients_match_xla(name, param):
    """dq, dk, dv, the register keys/values and the variant parameter (temperature, s, gamma)."""
    q, k, v, (rk, rv) = _inputs(1)
    p = jnp.float32(param)
    got = _ready(_grad(q, k, v, rk, rv, p, name=name, impl="pallas"))
    want = _grad(*_f32((q, k, v, rk, rv)), p, name=name, impl="xla")
    _assert_grads_close(GRAD_LABELS, got, want)


@pytest.mark.parametrize("variant, g", [(variants.RBF(0.05), -0.05), (variants.RBF(), -1 / np.sqrt(H))])
def test_rbf_key_norm_gradient_in_the_kernel(monkeypatch, variant, g):
    """A constant gamma: the bias ``-gamma ||k||^2`` is formed from ``stop_gradient(k)`` and the
    backward kernel adds its key gradient (``bias_key_grad = -2 gamma``); dk and the register
    keys' gradient still match XLA's."""
    seen = _spy(monkeypatch, "pallas_kernels.backward", "flash_backward",
                lambda kw: kw.get("bias_key_grad"))
    q, k, v, (rk, rv) = _inputs(11)
    cot = jnp.cos(jnp.arange(H, dtype=jnp.float32))[None, None, None, :]

    def loss(q, k, v, rk, rv, impl):
        out = jaxattn.attention(q, k, v, variant=variant, registers=(rk, rv), implementation=impl,
                                **OPTIONS)
        return jnp.sum(out.astype(jnp.float32) * cot)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    got = _ready(grad(q, k, v, rk, rv, "pallas"))
    assert seen == [pytest.approx(2 * g, rel=1e-6)]
    want = grad(*_f32((q, k, v, rk, rv)), "xla")
    for label, a, b in zip(("dq", "dk", "dv", "dregister_k", "dregister_v"), got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= GRAD_RTOL * np.abs(b).max(), (label, np.abs(a - b).max())


def _adaptive_loss(q, k, v, stop_gradient_beta, impl):
    variant = variants.AdaptiveTemperature(stop_gradient_beta=stop_gradient_beta)
    out = jaxattn.attention(q, k, v, variant=variant, implementation=impl, is_causal=True)
    return jnp.sum(out.astype(jnp.float32) * jnp.sin(jnp.arange(H, dtype=jnp.float32))[None, None, None, :])


_adaptive_grad = jax.jit(jax.grad(_adaptive_loss, argnums=(0, 1, 2)),
                         static_argnames=("stop_gradient_beta", "impl"))


@pytest.mark.parametrize("stop_gradient_beta", [True, False])
def test_adaptive_temperature_gradients_match_xla(stop_gradient_beta):
    """Both gradient modes; the beta path must matter at these inputs, else the check is empty."""
    q, k, v, _ = _inputs(3, registers=False)
    got = _ready(_adaptive_grad(q, k, v, stop_gradient_beta=stop_gradient_beta, impl="pallas"))
    want = _adaptive_grad(*_f32((q, k, v)), stop_gradient_beta=stop_gradient_beta, impl="xla")
    other = _adaptive_grad(*_f32((q, k, v)), stop_gradient_beta=not stop_gradient_beta, impl="xla")
    dq_gap = np.abs(np.asarray(other[0]) - np.asarray(want[0])).max() / np.abs(want[0]).max()
    assert dq_gap > 3 * GRAD_RTOL
    for label, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= GRAD_RTOL * np.abs(b).max(), label


def test_entropy_gradient_with_key_bias_raises():
    """The statistics sweep's VJP is not implemented with a per-key bias: it raises, never lies."""
    from pallas_kernels import flash_entropy
    q, k, _, _ = _inputs(6, registers=False)
    b = jnp.zeros((B, K, S), jnp.float32)
    with pytest.raises(NotImplementedError, match="per-key bias"):
        jax.grad(lambda q: jnp.sum(flash_entropy(q, k, logit_scale=0.1, key_bias=b)[0]))(q)


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="hardmax", mask=jnp.ones((1, 1, T, S), bool)), "mask array"),
    (dict(variant=variants.TopK(3)), "softmax and hardmax variants"),
    (dict(bias=jnp.zeros((1, 1, T, S))), "bias array"),
    (dict(mask=jnp.ones((1, 1, T, S), bool)), "mask array"),
])
def test_unsupported_calls_raise_and_fall_back(kwargs, match):
    """implementation="pallas" raises NotImplementedError; None falls back silently: to the chunked
    sweep for hardmax and top-k, else to the reference (the same result, bit for bit)."""
    q, k, v, _ = _inputs(4, registers=False)
    with pytest.raises(NotImplementedError, match=match):
        jaxattn.attention(q, k, v, implementation="pallas", **kwargs)
    out = jaxattn.attention(q, k, v, implementation=None, **kwargs)
    chunked = jaxattn.get_variant(kwargs.get("variant", "softmax")).normalizer != "softmax"
    ref = jaxattn.attention(q, k, v, implementation="xla_chunked" if chunked else "xla", **kwargs)
    np.testing.assert_array_equal(out, ref)


def test_float32_inputs_raise():
    q, k, v, _ = _inputs(5, registers=False)
    with pytest.raises(NotImplementedError, match="bfloat16 or float16"):
        jaxattn.attention(*_f32((q, k, v)), implementation="pallas")


def test_query_scale_gradient_is_exact_with_bf16_output():
    """d/d(temperature) with sharp logits: the kernel's dc must not inherit the bf16 output's error.

    delta = dO . o uses the bf16 output; dc_i = sum_j dZ_ij u_ij multiplied that error by the row mean
    of u (11 % off the reference here before dc was centred; 0.6 % after, the bf16 rounding of dO and
    of the output). The bar is the project's bf16 relative-error bar, 1e-2.
    """
    q, k, v, (rk, rv) = _inputs(2)
    q, k = 2 * q, 2 * k  # exact in bf16
    p = jnp.float32(0.5)
    got = float(_ready(_grad(q, k, v, rk, rv, p, name="softmax", impl="pallas"))[5])
    want = float(_grad(*_f32((q, k, v, rk, rv)), p, name="softmax", impl="xla")[5])
    assert abs(got - want) <= 1e-2 * abs(want), (got, want)


def _spy(monkeypatch, module, name, record):
    """Replaces ``module.name`` by a wrapper that appends ``record(kwargs)`` to the returned list."""
    mod = importlib.import_module(module)
    seen, real = [], getattr(mod, name)

    def spy(*args, **kwargs):
        seen.append(record(kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, name, spy)
    return seen


def test_constant_temperature_takes_the_constant_scale_kernels(monkeypatch):
    """A constant temperature is folded into the logit scale (no per-query row vector, no dc); a
    traced one still goes through the per-query scale, so d/d(temperature) exists."""
    seen = _spy(monkeypatch, "pallas_kernels.ops", "flash_forward",
                lambda kw: (kw["logit_scale"], kw["query_scale"], kw["key_bias"]))
    q, k, v, _ = _inputs(7, registers=False)
    scale = 1.0 / np.sqrt(H)
    f = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, variant=variants.Softmax(0.7),
                                                  implementation="pallas"))
    out = _ready(f(q, k, v))
    (a, c, b), = seen
    assert c is None and b is None and a == pytest.approx(scale / 0.7, rel=1e-12)
    ref = jaxattn.attention(*_f32((q, k, v)), variant=variants.Softmax(0.7), implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=OUT_TOL[q.dtype], rtol=0)

    seen.clear()  # traced: a per-query scale of unknown sign (both fold choices are traced)
    _ready(jax.jit(lambda q, k, v, t: jaxattn.attention(q, k, v, variant=variants.Softmax(t),
                                                        implementation="pallas"))(q, k, v, 0.7))
    assert seen and all(c is not None and a == pytest.approx(scale) for a, c, _ in seen)

    seen.clear()  # RBF: the constant scales the key bias too (z = c (a q.k + b))
    _ready(jaxattn.attention(q, k, v, variant=variants.RBF(0.05), implementation="pallas"))
    (a, c, b), = seen
    assert c is None and b is not None


def _primitives_outside_kernels(jaxpr):
    """Names of the primitives a jaxpr runs outside kernel bodies (it enters jit and custom_vjp
    calls only)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name not in ("jit", "pjit", "closed_call", "custom_vjp_call"):
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives_outside_kernels(inner)
    return names


@pytest.mark.parametrize("variant, promise", [
    (variants.ScalableSoftmax(0.43), True),
    (variants.ScalableSoftmax(np.array([0.4, 0.0, 0.3, 0.5])), True),
    (variants.ScalableSoftmax(np.array([0.4, -0.1, 0.3, 0.5])), False),
    (variants.AdaptiveTemperature(stop_gradient_beta=True), True),
])
def test_nonnegative_query_scale_hint(monkeypatch, variant, promise):
    """The kernel hint ``query_scale_nonnegative`` is given only where c >= 0 is certain."""
    seen = _spy(monkeypatch, "pallas_kernels.ops", "flash_forward",
                lambda kw: kw.get("query_scale_nonnegative", False))
    q, k, v, _ = _inputs(8, registers=False)
    out = _ready(jaxattn.attention(q, k, v, variant=variant, implementation="pallas",
                                   is_causal=True))
    assert seen[-1] is promise
    ref = jaxattn.attention(*_f32((q, k, v)), variant=variant, implementation="xla", is_causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=OUT_TOL[q.dtype], rtol=0)
    # a traced s (a learned parameter) has no sign known at trace time: no promise, one kernel
    # (at D = 64 its tiles fold the scale, negating Q's rows where c < 0), no test of c's values
    if isinstance(variant, variants.ScalableSoftmax):
        k, v = (jnp.concatenate([x, x[:, :8]], axis=1) for x in (k, v))  # S = 128, T = 128:
        # no mask and no padded key, so the 128-key tiles fold
        for s in (0.43, -8.0):  # -8: sharp logits, where a wrong fold overflows
            seen.clear()
            f = jax.jit(lambda s: jaxattn.attention(q, k, v, variant=variants.ScalableSoftmax(s),
                                                    implementation="pallas"))
            out = _ready(f(jnp.float32(s)))
            assert seen == [False]
            assert "cond" not in _primitives_outside_kernels(jax.make_jaxpr(f)(jnp.float32(s)).jaxpr)
            ref = jaxattn.attention(*_f32((q, k, v)), variant=variants.ScalableSoftmax(s),
                                    implementation="xla")
            np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=OUT_TOL[q.dtype],
                                       rtol=0)


@pytest.mark.parametrize("traced_s", [False, True])
def test_query_scale_gradient_only_when_wanted(monkeypatch, traced_s):
    """A constant SSMax s: the backward skips dc (query_scale_grad=False) and dq/dk/dv still match
    XLA; a differentiated s: dc is computed and d/ds matches."""
    seen = _spy(monkeypatch, "pallas_kernels.backward", "flash_backward",
                lambda kw: kw.get("query_scale_grad", True))
    q, k, v, _ = _inputs(11, registers=False)
    g = jnp.cos(jnp.arange(H, dtype=jnp.float32))[None, None, None, :]

    def loss(q, k, v, s, impl):
        s = s if traced_s else 0.43
        out = jaxattn.attention(q, k, v, variant=variants.ScalableSoftmax(s), implementation=impl,
                                is_causal=True)
        return jnp.sum(out.astype(jnp.float32) * g)

    argnums = (0, 1, 2, 3) if traced_s else (0, 1, 2)
    grad = jax.jit(jax.grad(loss, argnums=argnums), static_argnames="impl")
    got = _ready(grad(q, k, v, jnp.float32(0.43), impl="pallas"))
    assert seen == [traced_s]
    want = grad(*_f32((q, k, v)), jnp.float32(0.43), impl="xla")
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= GRAD_RTOL * np.abs(b).max()


def test_api_check_small(monkeypatch, capsys):
    """``python -m checks.api --small`` (the GPU end-to-end check, here in the interpreter):
    the beta-gradient case passes, and the same case fails when the tolerance is below the 16-bit
    rounding (the check compares real differences). The second pass reuses the first one's
    errors: only the verdict against the tolerance is under test there."""
    import functools

    from checks import api as check
    monkeypatch.setattr(check, "run_case", functools.cache(check.run_case))
    args = ["--small", "--cases", "adaptive_beta_grad_d64", "--seed", "0"]
    assert check.main(args) == 0
    monkeypatch.setattr(check, "TOL", 1e-6)
    assert check.main(args) == 1
    assert "FAIL" in capsys.readouterr().out


def test_api_check_rejects_unknown_cases(capsys):
    from checks import api as check
    with pytest.raises(SystemExit):
        check.main(["--small", "--cases", "softmax_causal_gqa_d128,nope"])
    assert "--cases: unknown nope" in capsys.readouterr().err


def test_traced_s_under_vmap():
    """A batch of traced SSMax ``s`` (either sign) under ``vmap``: one folding kernel (Q's rows
    negated where ``c < 0``) serves every ``s``; each result matches XLA's."""
    q, k, v, _ = _inputs(8, registers=False)
    k, v = (jnp.concatenate([x, x[:, :8]], axis=1) for x in (k, v))  # S = 128: the tiles fold
    ss = (0.43, -8.0)

    def f(s):
        return jaxattn.attention(q, k, v, variant=variants.ScalableSoftmax(s),
                                 implementation="pallas")

    out = _ready(jax.jit(jax.vmap(f))(jnp.asarray(ss, jnp.float32)))
    for got, s in zip(out, ss, strict=True):
        ref = jaxattn.attention(*_f32((q, k, v)), variant=variants.ScalableSoftmax(s),
                                implementation="xla")
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=OUT_TOL[q.dtype], rtol=0)



def test_extreme_segment_ids_gradients_match_xla():
    """Segment ids at int32's extremes or past it: the kernels' forward and gradients see the
    segments the ids define (equal ids, nothing else), as the reference does. One row per hazard
    (int32 query ids, int64 key ids: the two dtypes differ on purpose):

    0. every id at int32's minimum (the backward's ``Q_INVALID`` marker as a raw id);
    1. a second segment whose id is the backward's ``K_REGISTER`` marker (a key every query sees);
    2. key ids ``2**32`` and ``2**32 + 1``, equal modulo 2**32 to the query ids 0 and 1 but to no
       query id (queries of those segments see no key).
    """
    i32_min = -(2**31)
    Bs = 3
    half_q, half_k = np.arange(T) >= T // 2, np.arange(S) >= S // 2
    quarter_k = np.arange(S) >= S // 4
    q_ids = np.stack([np.full(T, i32_min), np.where(half_q, i32_min + 2, 0),
                      np.where(half_q, 1, 0)]).astype(np.int32)
    kv_ids = np.stack([np.full(S, i32_min), np.where(half_k, i32_min + 2, 0),
                       np.where(half_k, 2**32 + 1, np.where(quarter_k, 2**32, 0))]).astype(np.int64)
    ks = jax.random.split(jax.random.key(12), 3)
    q = jax.random.normal(ks[0], (Bs, T, N, H), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (Bs, S, K, H), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (Bs, S, K, H), jnp.float32).astype(jnp.bfloat16)
    cot = jnp.cos(jnp.arange(H, dtype=jnp.float32))[None, None, None, :]

    def loss(q, k, v, impl):
        out = jaxattn.attention(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                                implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * cot)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnames="impl")
    got = _ready(grad(q, k, v, impl="pallas"))
    want = grad(*_f32((q, k, v)), impl="xla")
    for label, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a)), label
        row_err = np.abs(a - b).reshape(Bs, -1).max(1) / np.abs(b).max()
        assert np.all(row_err <= GRAD_RTOL), (label, row_err)


def test_adaptive_temperature_traced_scale_gradients_match_xla():
    """A traced logit scale (a learned temperature) with the gradient through beta: the entropy's
    VJP gets ``c = a`` (the scale folded into the statistics sweep's per-query scale), and dq, dk,
    dv and d(scale) match XLA's. The beta path must matter at these inputs (checked), else the
    entropy VJP's share of the gradients would be untested."""
    q, k, v, _ = _inputs(13, registers=False)
    q = 2 * q  # exact in bf16; sharper rows, so beta > 1 on some of them
    cot = jnp.sin(jnp.arange(H, dtype=jnp.float32))[None, None, None, :]

    def loss(q, k, v, scale, stop, impl):
        out = jaxattn.attention(q, k, v, variant=variants.AdaptiveTemperature(stop_gradient_beta=stop),
                                scale=scale, implementation=impl, is_causal=True)
        return jnp.sum(out.astype(jnp.float32) * cot)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnames=("stop", "impl"))
    a = jnp.float32(0.6 / np.sqrt(H))
    got = _ready(grad(q, k, v, a, stop=False, impl="pallas"))
    want = grad(*_f32((q, k, v)), a, stop=False, impl="xla")
    other = grad(*_f32((q, k, v)), a, stop=True, impl="xla")
    for label, a_, b, o in zip(("dq", "dk", "dv", "dscale"), got, want, other, strict=True):
        a_, b, o = (np.asarray(x, np.float32) for x in (a_, b, o))
        assert np.all(np.isfinite(a_)), label
        scale = np.abs(b).max()
        if label in ("dq", "dscale"):  # beta's share must exceed the tolerance to be seen
            assert np.abs(o - b).max() > GRAD_RTOL * scale, (label, "beta path too small")
        assert np.abs(a_ - b).max() <= GRAD_RTOL * scale, (label, np.abs(a_ - b).max(), scale)


def test_default_dispatch_on_gpu_falls_back_on_not_implemented(monkeypatch):
    """implementation=None on a GPU tries the kernel first; a NotImplementedError from it gives
    the XLA reference's result (bit for bit), and implementation="pallas" re-raises it."""
    import jaxattn.api
    calls = []

    def unsupported(query, key, value, plan, **kwargs):
        calls.append(plan.variant)
        raise NotImplementedError("stand-in kernel")

    monkeypatch.setattr(jaxattn.api, "_on_gpu", lambda: True)
    monkeypatch.setattr(jaxattn.api.fused, "attention", unsupported)
    q, k, v, _ = _inputs(14, registers=False)
    out = jaxattn.attention(q, k, v, variant="scalable_softmax", is_causal=True)
    assert len(calls) == 1, "the default dispatch did not try the kernel"
    ref = jaxattn.attention(q, k, v, variant="scalable_softmax", is_causal=True,
                            implementation="xla")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    with pytest.raises(NotImplementedError, match="stand-in kernel"):
        jaxattn.attention(q, k, v, variant="scalable_softmax", implementation="pallas")
    assert len(calls) == 2


def test_default_dispatch_on_gpu_runs_the_kernel(monkeypatch):
    """implementation=None on a GPU runs the fused kernel (here interpreted; the spy sees the
    call, one kernel run) and returns its result, within the 16-bit bar of XLA's."""
    import jaxattn.api
    seen = _spy(monkeypatch, "jaxattn.fused", "attention", lambda kw: kw["return_stats"])
    monkeypatch.setattr(jaxattn.api, "_on_gpu", lambda: True)
    q, k, v, _ = _inputs(15, registers=False)
    out = _ready(jaxattn.attention(q, k, v, is_causal=True))
    assert seen == [False]
    ref = jaxattn.attention(*_f32((q, k, v)), is_causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=OUT_TOL[q.dtype], rtol=0)


@pytest.mark.parametrize("module, flag", [("checks.forward", "--interpret"),
                                          ("checks.backward", "--interpret"),
                                          ("checks.api", "--small"),
                                          ("checks.long", "--cpu")])
def test_gpu_checks_exit_at_once_without_a_gpu(module, flag):
    """The GPU check scripts on a CPU backend: status 2 and a message naming the flag that asks
    for the interpreter, within seconds (they used to start hours of interpreted kernels)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-m", module], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "needs a GPU" in proc.stderr and flag in proc.stderr, proc.stderr[-2000:]


def test_gpu_checks_run_on_request_without_a_gpu(capsys):
    """The explicit flag passes the GPU test (here on cases that run no kernel)."""
    from checks import backward as check_backward
    from checks import forward as check
    assert check.main(["--interpret", "--skip-cases"]) == 0
    assert [c[0] for c in check.select_cases("signed c D256,0")] == ["signed c D256", "softmax"]
    with pytest.raises(ValueError, match="'nope' is neither a case name"):
        check.select_cases("softmax,nope")
    with pytest.raises(SystemExit):
        check.main(["--interpret", "--cases", "99"])
    assert check_backward.main(["--interpret", "--only", "check", "--cases", "nope"]) == 1
    assert "needs a GPU" not in capsys.readouterr().err


def _term_matches_xla(variant, inputs, **term):
    """The fused path with a term of the logit form (``term``: sink logits, a soft cap) against
    XLA in float32: output and the three statistics, with registers, a causal mask and rows past
    their length; and the term must change XLA's output by far more than the tolerance."""
    q, k, v, regs = inputs
    kw = dict(variant=variant, return_stats=True, **OPTIONS)
    out, stats = _ready(jaxattn.attention(q, k, v, registers=regs, implementation="pallas", **kw,
                                          **term))
    r_out, r_stats = jaxattn.attention(*_f32((q, k, v)), registers=_f32(regs),
                                       implementation="xla", **kw, **term)
    np.testing.assert_allclose(np.asarray(out, np.float32), r_out, atol=OUT_TOL[q.dtype], rtol=0)
    for field in ("logsumexp", "entropy", "max_weight"):
        np.testing.assert_allclose(getattr(stats, field), getattr(r_stats, field), atol=STAT_TOL,
                                   rtol=STAT_TOL, err_msg=field)
    plain, _ = jaxattn.attention(*_f32((q, k, v)), registers=_f32(regs), implementation="xla",
                                 **kw)
    assert np.abs(plain - r_out).max() > 10 * OUT_TOL[q.dtype]  # the term matters here


SINKS = jnp.asarray([-1.0, 0.5, 2.0, 4.0], jnp.float32)  # one per query head (N = 4)


@pytest.mark.parametrize("name", ["temperature", "scalable_softmax", "rbf"])
def test_sink_logits_match_xla(name):
    """Sink logits on the fused path (the kernel's attention renormalised with the sink, through
    its logsumexp): output and the three statistics against XLA, with registers, a causal mask
    and query rows past their length (zeros); for RBF the sink meets the logits with the
    ``-gamma ||q||^2`` the kernel drops. The sinks here take 5-99 % of a row's weight."""
    _term_matches_xla(VARIANTS[name], _inputs(2), sink_logits=SINKS)


@pytest.mark.parametrize("name, param", [("softmax", 0.8), ("scalable_softmax", 0.43),
                                         ("rbf", 0.05)])
def test_sink_logits_gradients_match_xla(name, param):
    """dq, dk, dv, the registers, the variant parameter (a traced temperature or s: the dc term
    of the lse cotangent) and the sink logits, against XLA."""
    def loss(q, k, v, rk, rv, p, sinks, impl):
        variant = dict(softmax=variants.Softmax, scalable_softmax=variants.ScalableSoftmax,
                       rbf=variants.RBF)[name](p)
        g = jnp.cos(jnp.arange(H, dtype=jnp.float32))[None, None, None, :]
        out = jaxattn.attention(q, k, v, variant=variant, registers=(rk, rv), sink_logits=sinks,
                                implementation=impl, **OPTIONS)
        return jnp.sum(out.astype(jnp.float32) * g)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(7))), static_argnames="impl")
    q, k, v, (rk, rv) = _inputs(3)
    p = jnp.float32(param)
    got = _ready(grad(q, k, v, rk, rv, p, SINKS, impl="pallas"))
    want = grad(*_f32((q, k, v, rk, rv)), p, SINKS, impl="xla")
    _assert_grads_close(GRAD_LABELS + ("dsinks",), got, want)


CAP_VARIANTS = {
    "temperature": variants.Softmax(0.7),
    "scalable_softmax": variants.ScalableSoftmax(0.43),
    "adaptive_temperature": variants.AdaptiveTemperature(stop_gradient_beta=True),
}


@pytest.mark.parametrize("name", sorted(CAP_VARIANTS))
def test_soft_cap_matches_xla(name):
    """``logits_soft_cap`` on the fused path (the forward, the capped statistics sweep for adaptive
    temperature, both backward kernels): output and statistics against XLA at logits the cap bends
    (q and k of scale 2, cap 3), with registers, a causal mask and rows past their length."""
    q, k, v, regs = _inputs(4)
    q, k = (2 * q).astype(q.dtype), (2 * k).astype(k.dtype)
    _term_matches_xla(CAP_VARIANTS[name], (q, k, v, regs), logits_soft_cap=3.0)


@pytest.mark.parametrize("name, param", [("softmax", 0.8), ("scalable_softmax", 0.43)])
def test_soft_cap_gradients_match_xla(name, param):
    """dq, dk, dv, the registers and the traced variant parameter (temperature, s: the dq kernel's
    dc under the cap) against XLA."""
    def loss(q, k, v, rk, rv, p, impl):
        variant = dict(softmax=variants.Softmax, scalable_softmax=variants.ScalableSoftmax)[name](p)
        g = jnp.cos(jnp.arange(H, dtype=jnp.float32))[None, None, None, :]
        out = jaxattn.attention(q, k, v, variant=variant, registers=(rk, rv), logits_soft_cap=3.0,
                                implementation=impl, **OPTIONS)
        return jnp.sum(out.astype(jnp.float32) * g)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(6))), static_argnames="impl")
    q, k, v, (rk, rv) = _inputs(5)
    q, k = (2 * q).astype(q.dtype), (2 * k).astype(k.dtype)
    p = jnp.float32(param)
    got = _ready(grad(q, k, v, rk, rv, p, impl="pallas"))
    want = grad(*_f32((q, k, v, rk, rv)), p, impl="xla")
    _assert_grads_close(GRAD_LABELS, got, want)
