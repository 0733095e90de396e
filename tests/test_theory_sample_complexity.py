"""Tests for theory.sample_complexity: exact limits, Bessel ratios, estimators and fits.

The rate studies themselves (slopes against -1/2, moment exponents) are asserted through their
rows in ``tests/test_theory_check.py``, so the claim table and the tests share one computation.
"""

import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sps

from theory import sample_complexity as sc

ORDERS = (0.0, 0.5, 1.0, 1.5, 4.0, 24.0)


@hypothesis.given(nu=st.sampled_from(ORDERS), seed=st.integers(0, 2**31 - 1),
                  log_hi=st.floats(-4.0, math.log10(2000.0)))
def test_bessel_ratio_matches_scipy(nu, seed, log_hi):
    x = 10.0 ** np.random.default_rng(seed).uniform(-4.0, log_hi, 16)
    want = sps.ive(nu + 1, x) / sps.ive(nu, x)
    got = np.asarray(sc.bessel_ratio(jnp.asarray(nu), jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_mean_resultant_closed_forms():
    r = jnp.geomspace(1e-2, 500.0, 64)
    i0e, i1e = jax.scipy.special.i0e, jax.scipy.special.i1e
    np.testing.assert_allclose(sc.mean_resultant(2, r), i1e(r) / i0e(r), rtol=1e-12)
    np.testing.assert_allclose(sc.mean_resultant(3, r), 1 / jnp.tanh(r) - 1 / r, rtol=1e-10)
    assert float(sc.bessel_ratio_over_x(1.0, 0.0)) == 0.25  # 1/(2(nu+1)) at x = 0
    with pytest.raises(ValueError, match="d must be"):
        sc.mean_resultant(1, r)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from((2, 3, 8)),
                  radius=st.floats(0.1, 5.0))
def test_gamma_sphere_properties(seed, d, radius):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((d, d)))
    x = jnp.asarray(rng.standard_normal((4, d)))
    g = sc.gamma_sphere(x, radius, a)
    u = np.asarray(x @ a.T)
    # Direction of A x, length rho A_d(rho ||Ax||) < rho.
    norms = np.linalg.norm(np.asarray(g), axis=-1)
    np.testing.assert_allclose(np.asarray(g) / norms[:, None], u / np.linalg.norm(u, axis=-1)[:, None],
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(norms, radius * np.asarray(
        sc.mean_resultant(d, radius * np.linalg.norm(u, axis=-1))), rtol=1e-12)
    assert np.all(norms < radius)
    np.testing.assert_array_equal(sc.gamma_sphere(jnp.zeros((1, d)), radius, a), 0.0)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from((1, 5, 64)))
def test_gamma_empirical_is_softmax_attention(seed, n):
    rng = np.random.default_rng(seed)
    d = 3
    x, y = rng.standard_normal((4, d)), rng.standard_normal((n, d))
    a, w_v = rng.standard_normal((d, d)), rng.standard_normal((2, d))
    logits = x @ a.T @ y.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = p @ y @ w_v.T
    got = sc.gamma_empirical(jnp.asarray(x), jnp.asarray(y), jnp.asarray(a), jnp.asarray(w_v))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    reps = sc.gamma_empirical(jnp.asarray(x), jnp.asarray(np.stack([y, y])), jnp.asarray(a),
                              jnp.asarray(w_v))
    np.testing.assert_allclose(reps[1], want, rtol=1e-10, atol=1e-12)


def test_gamma_empirical_rejects_bad_shapes():
    with pytest.raises(ValueError, match="tokens"):
        sc.gamma_empirical(jnp.zeros((2, 3)), jnp.zeros((4, 2)), jnp.eye(3))
    with pytest.raises(ValueError, match="a_matrix"):
        sc.gamma_empirical(jnp.zeros((2, 3)), jnp.zeros((4, 3)), jnp.eye(2))


def test_gaussian_pushforward_moments_match_affine_map():
    rng = np.random.default_rng(0)
    d = 3
    mean, root = rng.standard_normal(d), rng.standard_normal((d, d))
    cov, a, w_v = root @ root.T, rng.standard_normal((d, d)), rng.standard_normal((2, d))
    m, c = sc.gaussian_pushforward_moments(mean, cov, a, w_v)
    lin = w_v @ cov @ a  # Gamma_mu(y) = w_v (mean + cov a y)
    np.testing.assert_allclose(m, lin @ mean + w_v @ mean, rtol=1e-12)
    np.testing.assert_allclose(c, lin @ cov @ lin.T, rtol=1e-12)


@hypothesis.given(slope=st.floats(-3, 3), intercept=st.floats(-5, 5), seed=st.integers(0, 2**31 - 1))
def test_wls_fit_recovers_exact_line(slope, intercept, seed):
    x = np.linspace(0.0, 5.0, 7)
    se = np.random.default_rng(seed).uniform(0.1, 1.0, 7)
    fit = sc.wls_fit(x, intercept + slope * x, se)
    np.testing.assert_allclose([fit.slope, fit.intercept], [slope, intercept], atol=1e-9)
    assert fit.chi2_red < 1e-12
    w = 1 / se**2  # known-variance standard error (chi2 < 1 does not shrink it)
    np.testing.assert_allclose(fit.slope_se, 1 / math.sqrt(np.sum(w * (x - np.sum(w * x) / w.sum()) ** 2)))


def test_wls_fit_standard_error_is_calibrated():
    # 400 noisy lines with known noise: the slope's z-scores have unit spread.
    rng = np.random.default_rng(1)
    x = np.linspace(0.0, 3.0, 8)
    se = rng.uniform(0.05, 0.3, 8)
    z = []
    for _ in range(400):
        fit = sc.wls_fit(x, 1.0 - 0.5 * x + rng.standard_normal(8) * se, se)
        z.append((fit.slope + 0.5) / fit.slope_se)
    # With the max(1, chi2) inflation the spread is a little below 1; a mean-zero check at 3 SE.
    assert abs(np.mean(z)) <= 3 * np.std(z) / math.sqrt(400)
    assert 0.8 <= np.std(z) <= 1.1


def test_wls_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="y_se"):
        sc.wls_fit([0, 1, 2], [0, 1, 2], [1, 0, 1])
    with pytest.raises(ValueError, match="length"):
        sc.wls_fit([0, 1], [0, 1], [1, 1])


@hypothesis.given(sigma2=st.floats(0.01, 4.0), a_scale=st.floats(0.01, 10.0),
                  d=st.sampled_from((2, 4, 8)))
def test_horizon_of_isotropic_setup(sigma2, a_scale, d):
    setup = sc.GaussianSetup(d, sigma2, a_scale)
    np.testing.assert_allclose(setup.horizon(), sigma2 * a_scale, rtol=1e-10)


def test_predicted_moment_exponent():
    np.testing.assert_allclose(sc.predicted_moment_exponent([0.0, 1.0, 3.0]), [0.5, 0.25, 0.05])


def test_estimate_and_within():
    est = sc.estimate(np.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    np.testing.assert_allclose(est.mean, [3.0, 4.0])
    np.testing.assert_allclose(est.se, [2.0 / math.sqrt(3)] * 2)
    assert sc.within(-0.52, -0.5, 0.01, 0.0)
    assert not sc.within(-0.6, -0.5, 0.01, 0.05)
    assert sc.within(-0.54, -0.5, 0.001, 0.05)  # the floor applies when 3 SE is smaller
    with pytest.raises(ValueError, match="replicates"):
        sc.estimate(np.ones((1, 3)))


def test_pointwise_error_is_unbiased_at_one_over_sqrt_n():
    """Small statistical check: sqrt(n) E|error| agrees at n = 256 and 1024 within 3 SE."""
    setup = sc.GaussianSetup(3, 0.5, 1.0)
    st_ = sc.gaussian_sup_study(jax.random.key(0), setup, 1.0, (256, 512, 1024), 64, probes=1)
    c = np.sqrt(st_.ns) * st_.mean
    c_se = np.sqrt(st_.ns) * st_.se
    assert abs(c[2] - c[0]) <= max(3 * math.hypot(c_se[0], c_se[2]), 0.05 * c.mean())


@jax.jit
@chex.assert_max_traces(n=1)
def _sphere_limit_jit(x, radius, a):
    return sc.gamma_sphere(x, radius, a)


@jax.jit
@chex.assert_max_traces(n=1)
def _empirical_jit(x, tokens, a):
    return sc.gamma_empirical(x, tokens, a)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), radius=st.floats(0.1, 5.0))
def test_estimators_jit_without_retracing(seed, radius):
    rng = np.random.default_rng(seed)
    a, x = jnp.asarray(rng.standard_normal((3, 3))), jnp.asarray(rng.standard_normal((4, 3)))
    tokens = jnp.asarray(rng.standard_normal((2, 16, 3)))
    np.testing.assert_allclose(_sphere_limit_jit(x, jnp.asarray(radius), a),
                               sc.gamma_sphere(x, radius, a), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(_empirical_jit(x, tokens, a), sc.gamma_empirical(x, tokens, a),
                               rtol=1e-12, atol=1e-15)
