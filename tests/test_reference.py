"""Properties of the pure-jnp reference (``implementation="xla"``) beyond the oracle conformance.

softmax vs ``jax.nn.dot_product_attention``; gradients vs finite differences; rows sum to one; no
retracing; forward-only variants; fully masked rows; low-precision inputs; unbatched input;
``attention_weights``; jit and vmap.
"""

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxattn
from tests.conformance import ALL_VARIANTS, NO_SHRINK, adaptive_kink_rows
from tests.oracle import attention_oracle

# (B, T, S, N, K, H): grouped-query, multi-query with T < S, multi-head with T > S.
SHAPES = ((2, 8, 8, 4, 2, 16), (1, 5, 9, 2, 1, 8), (2, 7, 4, 3, 3, 4))


def _normal(rng, *shape, dtype=jnp.float64, magnitude=1.0):
    return jnp.asarray(magnitude * rng.standard_normal(shape), dtype)


def _variant(name, N=None):
    return {
        "softmax": jaxattn.Softmax(0.7),
        "adaptive_temperature": jaxattn.AdaptiveTemperature(),
        "scalable_softmax": jaxattn.ScalableSoftmax(0.6),
        "rbf": jaxattn.RBF(),
        "hardmax": jaxattn.Hardmax(),
        "topk": jaxattn.TopK(3),
    }[name]


# ---- softmax equals jax.nn.dot_product_attention --------------------------------------------

_NN_STATIC = ("is_causal", "local_window_size", "scale")


@functools.partial(jax.jit, static_argnames=_NN_STATIC)
def _jax_nn(q, k, v, bias, mask, q_len, kv_len, *, is_causal, local_window_size, scale):
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal, query_seq_lengths=q_len,
        key_value_seq_lengths=kv_len, local_window_size=local_window_size, implementation="xla")


@functools.partial(jax.jit, static_argnames=_NN_STATIC)
def _ours_softmax(q, k, v, bias, mask, q_len, kv_len, *, is_causal, local_window_size, scale):
    return jaxattn.attention(
        q, k, v, variant="softmax", bias=bias, mask=mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=q_len, key_value_seq_lengths=kv_len, local_window_size=local_window_size,
        implementation="xla")


@hypothesis.settings(NO_SHRINK, max_examples=15)  # two compilations per example
@hypothesis.given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1),
                  use_mask=st.booleans(), use_bias=st.booleans(), is_causal=st.booleans(),
                  use_q_len=st.booleans(), use_kv_len=st.booleans(),
                  window=st.sampled_from([None, (1, 0), (2, 3), (0, 0)]),
                  scale=st.sampled_from([None, 0.3]))
def test_softmax_matches_jax_nn(shape, seed, use_mask, use_bias, is_causal, use_q_len, use_kv_len,
                                window, scale):
    B, T, S, N, K, H = shape
    rng = np.random.default_rng(seed)
    q, k, v = (_normal(rng, B, L, h, H, dtype=jnp.float32) for L, h in ((T, N), (S, K), (S, K)))
    mask = jnp.asarray(rng.random((B, 1, T, S)) < 0.7) if use_mask else None
    bias = _normal(rng, 1, N, T, S, dtype=jnp.float32) if use_bias else None
    q_len = jnp.asarray(rng.integers(1, T + 1, B), jnp.int32) if use_q_len else None
    kv_len = jnp.asarray(rng.integers(1, S + 1, B), jnp.int32) if use_kv_len else None
    kw = dict(is_causal=is_causal, local_window_size=window, scale=scale)
    ours = np.asarray(_ours_softmax(q, k, v, bias, mask, q_len, kv_len, **kw))
    theirs = np.asarray(_jax_nn(q, k, v, bias, mask, q_len, kv_len, **kw))
    # jax.nn averages all values on a row with no visible key (and zeroes padded query rows); we
    # return zeros there. Compare every row except valid queries that see no key.
    vis = attention_oracle(q, k, v, mask=mask, is_causal=is_causal, query_seq_lengths=q_len,
                           key_value_seq_lengths=kv_len, local_window_size=window).visible
    valid = np.ones((B, T), bool) if q_len is None else np.arange(T)[None] < np.asarray(q_len)[:, None]
    compare = vis.any(-1).transpose(0, 2, 1) | ~valid[:, :, None]  # [B, T, N]
    np.testing.assert_allclose(ours[compare], theirs[compare], rtol=2e-5, atol=2e-6)
    assert np.all(ours[~compare] == 0.0)


# ---- gradients vs finite differences --------------------------------------------------------

GRAD_SHAPE = (2, 4, 5, 2, 1, 4)  # B, T, S, N, K, H


@functools.partial(jax.jit, static_argnames=("make_variant", "masked"))
def _grad_loss(q, k, v, param, bias, ct, *, make_variant, masked):
    T, S = q.shape[1], k.shape[1]
    options = {}
    if masked:
        options = dict(is_causal=True, bias=bias,
                       query_seq_lengths=jnp.asarray([T, T - 1], jnp.int32),
                       key_value_seq_lengths=jnp.asarray([S - 2, S], jnp.int32),
                       mask=jnp.arange(S)[None, :] != jnp.arange(T)[:, None] + 1)
    out = jaxattn.attention(q, k, v, variant=make_variant(param), implementation="xla", **options)
    return jnp.sum(out * ct)


def _adaptive(param):
    del param
    return jaxattn.AdaptiveTemperature()


def _adaptive_stop_gradient(param):
    del param
    return jaxattn.AdaptiveTemperature(stop_gradient_beta=True)


# name -> (variant from its hyper-parameter, the hyper-parameter or None). The hyper-parameter is
# an argument of the differentiated function: gradients wrt temperature, s and gamma are checked.
GRAD_VARIANTS = {
    "softmax": (jaxattn.Softmax, 0.6),
    "adaptive_temperature": (_adaptive, None),
    "scalable_softmax": (jaxattn.ScalableSoftmax, 0.7),
    "scalable_softmax_per_head": (jaxattn.ScalableSoftmax, np.array([0.4, 1.2])),
    "rbf": (jaxattn.RBF, 0.35),
}


def _oracle_options(masked, T, S):
    if not masked:
        return {}
    return dict(is_causal=True, query_seq_lengths=np.asarray([T, T - 1]),
                key_value_seq_lengths=np.asarray([S - 2, S]),
                mask=np.arange(S)[None, :] != np.arange(T)[:, None] + 1)


def _grad_problem(seed, magnitude, variant, masked):
    """Inputs and an output cotangent; adaptive-temperature rows near a kink of beta get none."""
    B, T, S, N, K, H = GRAD_SHAPE
    rng = np.random.default_rng(seed)
    q, k, v = (_normal(rng, B, L, h, H, magnitude=magnitude) for L, h in ((T, N), (S, K), (S, K)))
    bias = _normal(rng, B, N, T, S, magnitude=0.5)
    ct = rng.standard_normal((B, T, N, H))
    expected = attention_oracle(q, k, v, variant=variant, bias=bias if masked else None,
                                **_oracle_options(masked, T, S))
    if isinstance(variant, jaxattn.AdaptiveTemperature):
        # beta(H) has kinks (at the threshold and where polyval = 1): rows near them get no
        # cotangent, so the loss is smooth where the finite differences probe it.
        kink = adaptive_kink_rows(expected.base_entropy, variant, margin=0.05)
        ct = np.where(kink.transpose(0, 2, 1)[..., None], 0.0, ct)
    return (q, k, v, bias), jnp.asarray(ct), expected, rng


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", list(GRAD_VARIANTS))
@hypothesis.settings(NO_SHRINK, max_examples=3)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), magnitude=st.sampled_from([0.7, 1.5]),
                  order=st.sampled_from([1, 2]))
def test_gradients_match_finite_differences(name, masked, seed, magnitude, order):
    """check_grads (float64, rev mode) wrt q, k, v, the hyper-parameter and (masked) the bias."""
    make_variant, param = GRAD_VARIANTS[name]
    (q, k, v, bias), ct, _, _ = _grad_problem(seed, magnitude, make_variant(param), masked)
    param = None if param is None else jnp.asarray(param)

    def loss(q, k, v, param=None, bias=None):
        return _grad_loss(q, k, v, param, bias, ct, make_variant=make_variant, masked=masked)

    args = (q, k, v) + ((param,) if param is not None else ())
    if masked:
        args = (q, k, v, param, bias)
    check_grads(loss, args, order=order, modes=["rev"])


@pytest.mark.parametrize("masked", [False, True])
@hypothesis.settings(NO_SHRINK, max_examples=3)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), magnitude=st.sampled_from([0.7, 1.5]))
def test_adaptive_temperature_stop_gradient_freezes_beta(masked, seed, magnitude):
    """With stop_gradient_beta, gradients are those of the oracle with beta frozen at its value.

    (They are not the derivative of the forward function, so check_grads does not apply.)
    """
    variant = jaxattn.AdaptiveTemperature(stop_gradient_beta=True)
    (q, k, v, bias), ct, expected, rng = _grad_problem(seed, magnitude, variant, masked)
    T, S = q.shape[1], k.shape[1]
    args = (q, k, v, None, bias)
    grads = jax.grad(lambda *a: _grad_loss(*a, ct, make_variant=_adaptive_stop_gradient,
                                           masked=masked), argnums=(0, 1, 2, 4))(*args)
    options = _oracle_options(masked, T, S)
    h = 1e-4
    for index, grad in zip((0, 1, 2, 4), grads, strict=True):
        if index == 4 and not masked:
            assert np.all(np.asarray(grad) == 0.0)
            continue
        direction = rng.standard_normal(args[index].shape)

        def at(t, index=index, direction=direction):
            moved = list(args)
            moved[index] = np.asarray(args[index]) + t * direction
            res = attention_oracle(*moved[:3], variant=variant, bias=moved[4] if masked else None,
                                   fixed_beta=expected.beta, **options)
            return np.sum(res.out * np.asarray(ct))

        fd = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
        analytic = float(np.sum(np.asarray(grad) * direction))
        assert abs(analytic - fd) <= 1e-6 * (1.0 + np.sum(np.abs(np.asarray(grad) * direction)))
    # And they differ from the full gradient where some beta > 1 carries a cotangent.
    full = jax.grad(lambda *a: _grad_loss(*a, ct, make_variant=_adaptive, masked=masked))(*args)
    adapts = (expected.beta > 1.0).transpose(0, 2, 1) & (np.asarray(ct) != 0).any(-1)
    if adapts.any():
        assert not np.allclose(full, grads[0], rtol=1e-6, atol=1e-9)


def test_variant_objects_survive_jax_transformations():
    """jax.grad wrt a variant object returns a variant holding the cotangent, which may be <= 0.

    Validation in ``__post_init__`` must not reject such pytrees (nor the perturbations that
    ``check_grads`` and optimisers build from them).
    """
    rng = np.random.default_rng(7)
    q, k, v = _normal(rng, 1, 3, 1, 4), _normal(rng, 1, 4, 1, 4), _normal(rng, 1, 4, 1, 4)

    def loss(variant):
        return -jnp.sum(jaxattn.attention(q, k, v, variant=variant) ** 2)

    for variant in (jaxattn.RBF(jnp.asarray(0.5)), jaxattn.Softmax(jnp.asarray(0.8))):
        grad = jax.grad(loss)(variant)
        assert type(grad) is type(variant)
        negated = jax.tree.map(lambda x: -x, variant)
        assert np.all(np.asarray(jax.tree.leaves(negated)[0]) < 0)


def test_adaptive_temperature_uses_numpy_polyval_order():
    """beta(H) = max(1, polyval(coeffs, H)) for H > 0.5 with the highest power first."""
    variant = jaxattn.AdaptiveTemperature()
    h = np.array([0.1, 0.5, 0.6, 0.9, 1.3, 2.0, 3.5])
    expected = np.where(h > 0.5, np.maximum(1.0, np.polyval(variant.coeffs, h)), 1.0)
    reversed_order = np.where(h > 0.5, np.maximum(1.0, np.polyval(variant.coeffs[::-1], h)), 1.0)
    got = np.asarray(variant.beta(jnp.asarray(h)))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert not np.allclose(got, reversed_order)
    np.testing.assert_allclose(expected[4], -0.037 * 1.3**4 + 0.481 * 1.3**3 - 2.3 * 1.3**2
                               + 4.917 * 1.3 - 1.791, rtol=1e-12)


# ---- rows sum to one; attention_weights equals the oracle -----------------------------------

def _draw_masking(data, rng, B, T, S, N, K, H):
    options = dict(is_causal=data.draw(st.booleans(), label="is_causal"))
    if data.draw(st.booleans(), label="kv_len"):
        options["key_value_seq_lengths"] = jnp.asarray(rng.integers(0, S + 1, B), jnp.int32)
    if data.draw(st.booleans(), label="q_len"):
        options["query_seq_lengths"] = jnp.asarray(rng.integers(0, T + 1, B), jnp.int32)
    if data.draw(st.booleans(), label="segments"):
        options["q_segment_ids"] = jnp.asarray(rng.integers(0, 2, (B, T)), jnp.int32)
        options["kv_segment_ids"] = jnp.asarray(rng.integers(0, 2, (B, S)), jnp.int32)
    if data.draw(st.booleans(), label="mask"):
        options["mask"] = jnp.asarray(rng.random((B, N, T, S)) < 0.6)
    if data.draw(st.booleans(), label="window"):
        options["local_window_size"] = (data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)))
    if data.draw(st.booleans(), label="bias"):
        options["bias"] = _normal(rng, 1, N, T, S, magnitude=0.5)
    if data.draw(st.booleans(), label="registers"):
        options["registers"] = (_normal(rng, 2, K, H), _normal(rng, 2, K, H))
    return options


def _quantized(rng, *shape):
    return jnp.asarray(rng.integers(-2, 3, shape) / 2.0)


@pytest.mark.parametrize("name", ALL_VARIANTS)
@hypothesis.settings(NO_SHRINK, max_examples=10)
@hypothesis.given(data=st.data())
def test_weights_match_oracle_and_rows_sum_to_one(name, data):
    B, T, S, N, K, H = data.draw(st.sampled_from(SHAPES), label="shape")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    make = _quantized if name in ("hardmax", "topk") else _normal
    q, k = make(rng, B, T, N, H), make(rng, B, S, K, H)
    options = _draw_masking(data, rng, B, T, S, N, K, H)
    variant = _variant(name) if name != "topk" else jaxattn.TopK(data.draw(st.integers(1, S)))
    weights, stats = jaxattn.attention_weights(q, k, variant=variant, return_stats=True, **options)
    expected = attention_oracle(q, k, jnp.zeros_like(k), variant=variant, **options)
    np.testing.assert_allclose(weights, expected.weights, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.entropy, expected.entropy, rtol=1e-10, atol=1e-12)
    sums = np.asarray(weights).sum(-1)
    np.testing.assert_allclose(sums, expected.visible.any(-1).astype(float), rtol=0, atol=1e-12)
    assert np.all(np.asarray(weights)[~expected.visible] == 0.0), "weight on a hidden key"


def test_hardmax_is_uniform_over_ties():
    q = jnp.ones((1, 1, 1, 2))
    k = jnp.asarray([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [2.0, 0.0], [2.0, -1.0]])[None, :, None]
    w = np.asarray(jaxattn.attention_weights(q, k, variant="hardmax"))[0, 0, 0]
    np.testing.assert_array_equal(w, [0.0, 0.5, 0.0, 0.5, 0.0])


def test_topk_breaks_ties_by_lower_index_registers_first():
    q = jnp.ones((1, 1, 1, 2))
    k = jnp.ones((1, 4, 1, 2))  # all logits equal
    w = np.asarray(jaxattn.attention_weights(q, k, variant=jaxattn.TopK(2)))[0, 0, 0]
    np.testing.assert_allclose(w, [0.5, 0.5, 0.0, 0.0], rtol=1e-12)
    regs = (jnp.ones((1, 1, 2)), jnp.ones((1, 1, 2)))
    w = np.asarray(jaxattn.attention_weights(q, k, variant=jaxattn.TopK(2), registers=regs))[0, 0, 0]
    np.testing.assert_allclose(w, [0.5, 0.5, 0.0, 0.0, 0.0], rtol=1e-12)


# ---- no retracing ---------------------------------------------------------------------------

@jax.jit
@chex.assert_max_traces(n=1)
def _traced_once(q, k, v, variant, kv_len, bias):
    return jaxattn.attention(q, k, v, variant=variant, bias=bias, key_value_seq_lengths=kv_len,
                             is_causal=True, implementation="xla", return_stats=True)


RETRACE_VARIANTS = {
    "softmax": lambda x: jaxattn.Softmax(x),
    "scalable_softmax": lambda x: jaxattn.ScalableSoftmax(x),
    "rbf": lambda x: jaxattn.RBF(x),
    "adaptive_temperature": lambda x: jaxattn.AdaptiveTemperature(),
    "hardmax": lambda x: jaxattn.Hardmax(),
    "topk": lambda x: jaxattn.TopK(2),
}


@pytest.mark.parametrize("name", list(RETRACE_VARIANTS))
def test_no_retracing_on_fixed_shapes(name):
    """New values (inputs, lengths, bias, hyper-parameter) of the same shapes reuse one trace."""
    chex.clear_trace_counter()
    rng = np.random.default_rng(0)
    for param in (0.5, 0.9, 1.7):
        q, k, v = _normal(rng, 2, 6, 2, 8), _normal(rng, 2, 6, 1, 8), _normal(rng, 2, 6, 1, 8)
        kv_len = jnp.asarray(rng.integers(1, 7, 2), jnp.int32)
        bias = _normal(rng, 2, 2, 6, 6)
        out, _ = _traced_once(q, k, v, RETRACE_VARIANTS[name](jnp.asarray(param)), kv_len, bias)
        assert np.all(np.isfinite(out))


# ---- forward-only variants ------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("wrt",))
def _forward_only_grad(q, k, v, variant, *, wrt):
    def loss(*args):
        return jnp.sum(jaxattn.attention(*args, variant=variant, implementation="xla") ** 2)
    return jax.grad(loss, argnums=wrt)(q, k, v)


@pytest.mark.parametrize("variant", [jaxattn.Hardmax(), jaxattn.TopK(2)], ids=["hardmax", "topk"])
@pytest.mark.parametrize("wrt", [0, 1])
def test_forward_only_variants_raise_when_differentiated(variant, wrt):
    rng = np.random.default_rng(1)
    q, k, v = _normal(rng, 1, 4, 2, 4), _normal(rng, 1, 5, 2, 4), _normal(rng, 1, 5, 2, 4)
    with pytest.raises(TypeError, match=f"{variant.name!r} attention variant is forward-only"):
        _forward_only_grad(q, k, v, variant, wrt=wrt)


@pytest.mark.parametrize("variant", [jaxattn.Hardmax(), jaxattn.TopK(2)], ids=["hardmax", "topk"])
def test_forward_only_variants_differentiate_wrt_value(variant):
    """d/dv of sum(out^2) is p^T (2 out), with p the oracle weights."""
    rng = np.random.default_rng(2)
    q, k, v = _quantized(rng, 1, 4, 2, 4), _quantized(rng, 1, 5, 1, 4), _normal(rng, 1, 5, 1, 4)
    dv = np.asarray(_forward_only_grad(q, k, v, variant, wrt=2))
    expected = attention_oracle(q, k, v, variant=variant)
    want = np.einsum("bnts,btnh->bsh", expected.weights, 2 * expected.out)[:, :, None]
    np.testing.assert_allclose(dv, want, rtol=1e-10, atol=1e-12)


# ---- fully masked rows ----------------------------------------------------------------------

@jax.jit
def _masked_value_and_grads(q, k, v, variant, mask, kv_len):
    def loss(q, k, v):
        out, stats = jaxattn.attention(q, k, v, variant=variant, mask=mask, key_value_seq_lengths=kv_len,
                                       implementation="xla", return_stats=True)
        total = jnp.sum(out.astype(jnp.float32)) + sum(jnp.sum(s) for s in stats)
        return total, (out, stats)
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_fully_masked_rows_zero_forward_and_backward(name, dtype):
    rng = np.random.default_rng(3)
    q, k, v = (_normal(rng, 2, 4, 2, 8, dtype=dtype), _normal(rng, 2, 5, 1, 8, dtype=dtype),
               _normal(rng, 2, 5, 1, 8, dtype=dtype))
    mask = jnp.asarray(np.arange(4)[:, None] != np.full((1, 5), 2))  # query 2 sees no key
    kv_len = jnp.asarray([0, 5], jnp.int32)  # batch 0 sees no key at all
    variant = _variant(name)
    if variant.differentiable:
        grads, (out, stats) = _masked_value_and_grads(q, k, v, variant, mask, kv_len)
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g, np.float64)))
        assert np.all(np.asarray(grads[0], np.float64)[0] == 0.0)
        assert np.all(np.asarray(grads[0], np.float64)[1, 2] == 0.0)
        assert np.all(np.asarray(grads[1], np.float64)[0] == 0.0)
    else:
        out, stats = jaxattn.attention(q, k, v, variant=variant, mask=mask, key_value_seq_lengths=kv_len,
                                       return_stats=True)
    out = np.asarray(out, np.float64)
    assert np.all(np.isfinite(out))
    assert np.all(out[0] == 0.0) and np.all(out[1, 2] == 0.0)
    assert np.any(out[1, 1] != 0.0)
    for s in stats:
        s = np.asarray(s)
        assert np.all(np.isfinite(s)) and np.all(s[0] == 0.0) and np.all(s[1, :, 2] == 0.0)


@jax.jit
def _biased_value_and_grads(q, k, v, bias, variant):
    def loss(q, k, v, bias):
        out, stats = jaxattn.attention(q, k, v, variant=variant, bias=bias, implementation="xla",
                                       return_stats=True)
        total = jnp.sum(out.astype(jnp.float32)) + sum(jnp.sum(s) for s in stats)
        return total, (out, stats)
    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("name", ("plain",) + ALL_VARIANTS)
def test_minus_inf_bias_hides_keys(name, dtype):
    """A -inf bias on every key of a row gives the zeros promised for a query with no visible key
    (not NaN), with finite gradients; partly -inf rows equal the same keys hidden by the mask."""
    rng = np.random.default_rng(4)
    q, k, v = (_normal(rng, 2, 4, 2, 8, dtype=dtype), _normal(rng, 2, 5, 1, 8, dtype=dtype),
               _normal(rng, 2, 5, 1, 8, dtype=dtype))
    bias = np.asarray(rng.standard_normal((2, 2, 4, 5)), dtype)
    hidden = np.zeros(bias.shape, bool)
    hidden[0, :, 1, :] = True  # query 1 of batch 0: every key biased -inf, both heads
    hidden[1, 1, 2, :] = True  # query 2 of batch 1, head 1 only
    hidden[1, 0, 0, :3] = True  # partly hidden rows
    hidden[0, 1, 3, 1::2] = True
    bias = jnp.asarray(np.where(hidden, -np.inf, bias), dtype)
    variant = jaxattn.Softmax() if name == "plain" else _variant(name)
    if variant.differentiable:
        grads, (out, stats) = _biased_value_and_grads(q, k, v, bias, variant)
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g, np.float64)))
        assert np.all(np.asarray(grads[0], np.float64)[0, 1] == 0.0)
        assert np.all(np.asarray(grads[3], np.float64)[hidden] == 0.0)
    else:
        out, stats = jaxattn.attention(q, k, v, variant=variant, bias=bias, return_stats=True)
    out = np.asarray(out, np.float64)
    assert np.all(np.isfinite(out))
    assert np.all(out[0, 1] == 0.0) and np.all(out[1, 2, 1] == 0.0)
    assert np.any(out[1, 2, 0] != 0.0)
    for s in stats:
        s = np.asarray(s)
        assert np.all(np.isfinite(s)) and np.all(s[0, :, 1] == 0.0) and s[1, 1, 2] == 0.0
    want, want_stats = jaxattn.attention(q, k, v, variant=variant, bias=jnp.where(hidden, 0, bias),
                                         mask=jnp.asarray(~hidden), implementation="xla",
                                         return_stats=True)
    # jit against eager: sums may reassociate, so one rounding of the output dtype
    tol = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2}[dtype]
    np.testing.assert_allclose(out, np.asarray(want, np.float64), rtol=tol, atol=tol)
    for got, ref in zip(stats, want_stats, strict=True):
        np.testing.assert_allclose(got, ref, rtol=min(tol, 1e-5), atol=min(tol, 1e-5))
    assert all(s.dtype == (jnp.float64 if dtype == "float64" else jnp.float32) for s in stats)


# ---- low-precision inputs -------------------------------------------------------------------

LOW_TOL = {"bfloat16": dict(rtol=2e-2, atol=2e-2), "float16": dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ALL_VARIANTS)
@hypothesis.settings(NO_SHRINK, max_examples=5)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), is_causal=st.booleans())
def test_low_precision_matches_float32_reference(name, dtype, seed, is_causal):
    rng = np.random.default_rng(seed)
    make = _quantized if name in ("hardmax", "topk") else _normal
    q, k, v = make(rng, 2, 8, 4, 16), make(rng, 2, 8, 2, 16), _normal(rng, 2, 8, 2, 16)
    low = [x.astype(dtype) for x in (q, k, v)]
    high = [x.astype(jnp.float32) for x in low]
    kw = dict(variant=_variant(name), is_causal=is_causal, key_value_seq_lengths=jnp.asarray([5, 8]),
              implementation="xla", return_stats=True)
    out, stats = jaxattn.attention(*low, **kw)
    ref_out, ref_stats = jaxattn.attention(*high, **kw)
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, **LOW_TOL[dtype])
    for got, want in zip(stats, ref_stats, strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, **LOW_TOL[dtype])


@pytest.mark.parametrize("dtype, stats_dtype", [("float64", "float64"), ("float32", "float32"),
                                                ("bfloat16", "float32"), ("float16", "float32")])
def test_output_and_stats_dtypes(dtype, stats_dtype):
    rng = np.random.default_rng(4)
    q, k, v = (_normal(rng, 1, 3, 2, 4, dtype=dtype) for _ in range(3))
    out, stats = jaxattn.attention(q, k, v, variant="adaptive_temperature", return_stats=True)
    assert out.dtype == jnp.dtype(dtype)
    assert all(s.dtype == jnp.dtype(stats_dtype) for s in stats)


# ---- unbatched input, jit, vmap -------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_unbatched_equals_batched(name):
    rng = np.random.default_rng(5)
    B, T, S, N, K, H = 1, 5, 6, 4, 2, 8
    make = _quantized if name in ("hardmax", "topk") else _normal
    q, k, v = make(rng, B, T, N, H), make(rng, B, S, K, H), _normal(rng, B, S, K, H)
    regs = (_normal(rng, 2, K, H), _normal(rng, 2, K, H))
    seg_q, seg_kv = rng.integers(0, 2, (B, T)), rng.integers(0, 2, (B, S))
    common = dict(variant=_variant(name), is_causal=True, local_window_size=(3, 1), registers=regs,
                  bias=_normal(rng, N, T, S), mask=jnp.asarray(rng.random((N, T, S)) < 0.8),
                  return_stats=True)
    batched = jaxattn.attention(q, k, v, query_seq_lengths=jnp.asarray([4]),
                                key_value_seq_lengths=jnp.asarray([5]), q_segment_ids=jnp.asarray(seg_q),
                                kv_segment_ids=jnp.asarray(seg_kv), **common)
    single = jaxattn.attention(q[0], k[0], v[0], query_seq_lengths=jnp.asarray(4),
                               key_value_seq_lengths=jnp.asarray(5), q_segment_ids=jnp.asarray(seg_q[0]),
                               kv_segment_ids=jnp.asarray(seg_kv[0]), **common)
    for got, want in zip(jax.tree.leaves(single), jax.tree.leaves(batched), strict=True):
        np.testing.assert_array_equal(got, want[0])


@jax.jit
def _jitted(q, k, v, variant, kv_len):
    return jaxattn.attention(q, k, v, variant=variant, key_value_seq_lengths=kv_len, is_causal=True)


_vmapped = jax.jit(jax.vmap(_jitted.__wrapped__, in_axes=(0, 0, 0, None, 0)))
_vmapped_unbatched = jax.jit(jax.vmap(
    lambda q, k, v, variant: jaxattn.attention(q, k, v, variant=variant, is_causal=True),
    in_axes=(0, 0, 0, None)))


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_jit_and_vmap_agree_with_eager_and_oracle(name):
    rng = np.random.default_rng(6)
    make = _quantized if name in ("hardmax", "topk") else _normal
    q, k, v = make(rng, 3, 2, 5, 2, 8), make(rng, 3, 2, 6, 1, 8), _normal(rng, 3, 2, 6, 1, 8)
    kv_len = jnp.asarray(rng.integers(1, 7, (3, 2)), jnp.int32)
    variant = _variant(name)
    stacked = _vmapped(q, k, v, variant, kv_len)
    for i in range(3):
        eager = jaxattn.attention(q[i], k[i], v[i], variant=variant, key_value_seq_lengths=kv_len[i],
                                  is_causal=True)
        np.testing.assert_allclose(_jitted(q[i], k[i], v[i], variant, kv_len[i]), eager, rtol=1e-12,
                                   atol=1e-14)
        np.testing.assert_allclose(stacked[i], eager, rtol=1e-12, atol=1e-14)
        expected = attention_oracle(q[i], k[i], v[i], variant=variant, is_causal=True,
                                    key_value_seq_lengths=kv_len[i])
        np.testing.assert_allclose(eager, expected.out, rtol=1e-10, atol=1e-10)
    # vmap over unbatched [T, N, H] problems equals the batched call.
    np.testing.assert_allclose(_vmapped_unbatched(q[0], k[0], v[0], variant),
                               jaxattn.attention(q[0], k[0], v[0], variant=variant, is_causal=True),
                               rtol=1e-12, atol=1e-14)
