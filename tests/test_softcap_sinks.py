"""Logit soft-capping and sink logits: two terms of the logit form that compose with every variant.

The reference (``implementation="xla"``) against the float64 loop oracle of ``tests/oracle.py``
(written from the definitions: ``cap tanh(z / cap)`` of the variant's logits, ``e^{s_h}`` in every
softmax normaliser), their gradients against finite differences, their limits, the errors, the
module parameters and the fused backend's fallback.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxattn
from tests.conformance import NO_SHRINK
from tests.oracle import attention_oracle

B, T, S, N, K, H, R = 2, 6, 7, 4, 2, 8, 1
VARIANTS = {
    "softmax": jaxattn.Softmax(0.7),
    "adaptive_temperature": jaxattn.AdaptiveTemperature(),
    "scalable_softmax": jaxattn.ScalableSoftmax(0.6),
    "rbf": jaxattn.RBF(0.3),
    "hardmax": jaxattn.Hardmax(),
    "topk": jaxattn.TopK(3),
}
SOFTMAX_NORMALISED = ("softmax", "adaptive_temperature", "scalable_softmax", "rbf")
# float64 throughout: the logits differ from the oracle's by their summation order, a few ulp
# (u = 1.1e-16) of |z| <= ~30 (magnitude-2 inputs, H = 8); exp, tanh and the normalisation
# multiply relative errors by O(|z|) at most. 1e-11 is ~3000 ulp of O(1) outputs: a slack for
# that amplification, far below any error of the formula (the tests below see 1e-2 changes).
TOL = 1e-11


def _problem(seed, magnitude=2.0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(magnitude * rng.standard_normal((B, T, N, H)))
    k = jnp.asarray(magnitude * rng.standard_normal((B, S, K, H)))
    v = jnp.asarray(rng.standard_normal((B, S, K, H)))
    regs = (jnp.asarray(rng.standard_normal((R, K, H))), jnp.asarray(rng.standard_normal((R, K, H))))
    sinks = jnp.asarray(rng.uniform(-2.0, 3.0, N))
    return q, k, v, regs, sinks


def _masking(masked):
    if not masked:
        return {}
    # row T - 1 of batch 1 is past its length: a fully masked row
    return dict(is_causal=True, query_seq_lengths=np.asarray([T, T - 1]),
                key_value_seq_lengths=np.asarray([S, S - 2]))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cap, with_sinks", [(None, True), (0.5, False), (4.0, False), (4.0, True)])
@pytest.mark.parametrize("name", list(VARIANTS))
@hypothesis.settings(NO_SHRINK, max_examples=2)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), with_registers=st.booleans())
def test_reference_matches_oracle(name, cap, with_sinks, masked, seed, with_registers):
    """Output, weights and all three statistics, every variant and both terms in combination."""
    variant = VARIANTS[name]
    if with_sinks and name not in SOFTMAX_NORMALISED:
        return  # sinks need a softmax normaliser (tested to raise below)
    q, k, v, regs, sinks = _problem(seed)
    opts = dict(variant=variant, logits_soft_cap=cap, sink_logits=sinks if with_sinks else None,
                registers=regs if with_registers else None, **_masking(masked))
    out, stats = jaxattn.attention(q, k, v, implementation="xla", return_stats=True, **opts)
    weights = jaxattn.attention_weights(q, k, **opts)
    expected = attention_oracle(q, k, v, **opts)
    np.testing.assert_allclose(out, expected.out, atol=TOL, rtol=0)
    np.testing.assert_allclose(weights, expected.weights, atol=TOL, rtol=0)
    np.testing.assert_allclose(stats.logsumexp, expected.logsumexp, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(stats.entropy, expected.entropy, atol=TOL, rtol=0)
    np.testing.assert_allclose(stats.max_weight, expected.max_weight, atol=TOL, rtol=0)
    if masked:  # the fully masked row: zeros everywhere, sink or not
        assert not np.any(out[1, T - 1]) and not np.any(stats.logsumexp[1, :, T - 1])


def test_the_terms_change_the_result():
    """The oracle comparison above would pass for an implementation that ignored both terms only
    if the terms did nothing: here each changes the output by far more than the tolerance."""
    q, k, v, _, sinks = _problem(3)
    plain = jaxattn.attention(q, k, v, implementation="xla")
    capped = jaxattn.attention(q, k, v, implementation="xla", logits_soft_cap=0.5)
    sunk = jaxattn.attention(q, k, v, implementation="xla", sink_logits=sinks)
    assert np.abs(capped - plain).max() > 1e-2 and np.abs(sunk - plain).max() > 1e-2


@pytest.mark.parametrize("name", SOFTMAX_NORMALISED)
def test_limits(name):
    """A cap far above every logit changes nothing (tanh(x) = x - x^3/3: relative change
    (z / cap)^2 / 3 <= 1e-12 at |z| <= 30, cap = 3e7); a sink far below every logit neither
    (weight e^{-700} relative); a sink far above takes all the weight (output -> 0); weights and
    the sink's weight sum to one."""
    variant = VARIANTS[name]
    q, k, v, _, sinks = _problem(5)
    base = jaxattn.attention(q, k, v, variant=variant, implementation="xla")
    far = jaxattn.attention(q, k, v, variant=variant, implementation="xla", logits_soft_cap=3e7)
    np.testing.assert_allclose(far, base, atol=1e-10, rtol=0)
    low = jaxattn.attention(q, k, v, variant=variant, implementation="xla",
                            sink_logits=jnp.full((N,), -700.0))
    np.testing.assert_allclose(low, base, atol=1e-12, rtol=0)
    high = jaxattn.attention(q, k, v, variant=variant, implementation="xla",
                             sink_logits=jnp.full((N,), 700.0))
    assert np.abs(high).max() < 1e-200
    w, stats = jaxattn.attention_weights(q, k, variant=variant, sink_logits=sinks,
                                         return_stats=True)
    p_sink = np.exp(np.asarray(sinks)[None, :, None] - np.asarray(stats.logsumexp))
    np.testing.assert_allclose(np.sum(w, axis=-1) + p_sink, 1.0, atol=1e-12)
    assert p_sink.max() > 0.1  # the sinks here carry weight


@pytest.mark.parametrize("name", SOFTMAX_NORMALISED)
@hypothesis.settings(NO_SHRINK, max_examples=2)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), cap=st.sampled_from([None, 1.5]))
def test_gradients_match_finite_differences(name, seed, cap):
    """check_grads (float64, reverse mode, second order) wrt q, k, v and the sink logits."""
    variant = VARIANTS[name]
    q, k, v, _, sinks = _problem(seed, magnitude=0.7)
    ct = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((B, T, N, H)))
    # Adaptive temperature's beta has kinks at the threshold (0.5 nats) and where its polynomial
    # is 1; unmasked rows over 7 keys at magnitude 0.7 have entropies in about [1, 1.95] nats,
    # where the polynomial is > 1.2 and smooth. Causal rows (1 or 2 keys) would sit near kinks.
    causal = name != "adaptive_temperature"

    def loss(q, k, v, sinks):
        out = jaxattn.attention(q, k, v, variant=variant, implementation="xla", is_causal=causal,
                                logits_soft_cap=cap, sink_logits=sinks)
        return jnp.sum(out * ct)

    check_grads(loss, (q, k, v, sinks), order=2, modes=["rev"])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap must be finite and > 0"),
    (dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap must be finite and > 0"),
    (dict(logits_soft_cap=float("inf")), ValueError, "logits_soft_cap must be finite and > 0"),
    (dict(logits_soft_cap=True), TypeError, "logits_soft_cap must be a static python float"),
    (dict(logits_soft_cap="3"), TypeError, "logits_soft_cap must be a static python float"),
    (dict(sink_logits=jnp.zeros((N + 1,))), ValueError, r"sink_logits must have shape \[N\]"),
    (dict(sink_logits=jnp.zeros((N,), jnp.int32)), TypeError, "sink_logits must have dtype"),
    (dict(sink_logits=jnp.full((N,), jnp.nan)), ValueError, "sink_logits must be finite"),
    (dict(sink_logits=jnp.zeros((N,)), variant="hardmax"), ValueError,
     "sink_logits need a softmax normaliser"),
])
def test_bad_arguments_raise(kwargs, error, match):
    q, k, v, _, _ = _problem(0)
    with pytest.raises(error, match=match):
        jaxattn.attention(q, k, v, **kwargs)


def test_traced_soft_cap_raises():
    q, k, v, _, _ = _problem(0)
    with pytest.raises(TypeError, match="logits_soft_cap must be a static python float"):
        jax.jit(lambda cap: jaxattn.attention(q, k, v, logits_soft_cap=cap))(2.0)


@pytest.mark.parametrize("kwargs, what", [
    (dict(logits_soft_cap=2.0, variant="rbf"), "per-query logit offset"),
    (dict(logits_soft_cap=2.0, sink_logits=True), "soft cap with sink logits"),
    (dict(logits_soft_cap=2.0, variant="adaptive_temperature"), "through the statistics sweep"),
    (dict(sink_logits=True, variant="adaptive_temperature"), "sink logits with a statistics"),
])
def test_fused_backend_falls_back(kwargs, what):
    """What the fused backend does not run raises NotImplementedError naming it under
    implementation="pallas", so the default dispatch falls back (the fused soft cap and sinks are
    tested in tests/test_pallas_api.py)."""
    q, k, v, _, sinks = _problem(1)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    if kwargs.get("sink_logits") is True:
        kwargs = dict(kwargs, sink_logits=sinks)
    with pytest.raises(NotImplementedError, match=what):
        jaxattn.attention(q16, k16, v16, implementation="pallas", **kwargs)


def test_module_learns_sink_logits_and_caps():
    """MultiHeadAttention(sink_logits=True) owns a zero-initialised [N] parameter that receives a
    gradient; logits_soft_cap reaches the call (a tight cap changes the output)."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    mha = jaxattn.MultiHeadAttention(4, 16, sink_logits=True, rngs=nnx.Rngs(0))
    assert mha.sink_logits[...].shape == (4,) and not np.any(mha.sink_logits[...])
    grads = nnx.grad(lambda m: jnp.sum(m(x, is_causal=True) ** 2))(mha)
    assert np.all(np.abs(grads.sink_logits[...]) > 0)
    plain = jaxattn.MultiHeadAttention(4, 16, rngs=nnx.Rngs(0))
    capped = jaxattn.MultiHeadAttention(4, 16, logits_soft_cap=0.05, rngs=nnx.Rngs(0))
    assert np.abs(capped(x) - plain(x)).max() > 1e-3
    with pytest.raises(TypeError, match="sink_logits must be a bool"):
        jaxattn.MultiHeadAttention(4, 16, sink_logits=1, rngs=nnx.Rngs(0))
