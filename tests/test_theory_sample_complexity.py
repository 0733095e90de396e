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


def _anisotropic(seed, d=3, eigs=(1.5, 0.6, 0.25), a_scale=0.6):
    """Anisotropic ``Sigma = Q diag(eigs) Q^T`` (its root), a non-symmetric ``A``, ``W_v [2, d]``, ``m``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    root = (q * np.sqrt(np.asarray(eigs))) @ q.T
    return (rng.standard_normal(d) * 0.4, root, a_scale * rng.standard_normal((d, d)),
            rng.standard_normal((2, d)))


def test_pointwise_mse_matches_its_constant():
    # n E||Gamma_n(x) - Gamma(x)||^2 -> e^{||Sigma^(1/2) A x||^2} (tr(W_v Sigma W_v^T) + ||W_v Sigma A x||^2)
    # (the delta method; sc.pointwise_mse_constant). At n = 2048 the O(1/n) correction (from
    # below) is under 1 SE (4 %); the same constant at Sigma scaled by 1.1 (10-25 % higher) must be
    # rejected by the same acceptance rule.
    mean, root, a, w_v = _anisotropic(0)
    cov = root @ root.T
    x = np.random.default_rng(1).standard_normal((4, 3))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    with jax.enable_x64(True):
        est = sc.pointwise_mse_study(jax.random.key(0), x, jnp.asarray(mean), jnp.asarray(root), a,
                                     2048, 768, w_v)

    def accepts(constant):
        return bool(np.all(np.abs(est.mean - constant) <= 3 * est.se))

    assert np.all(np.einsum("mi,ij,mj->m", x @ a.T, cov, x @ a.T) > 0.15)  # the tilt matters
    assert accepts(sc.pointwise_mse_constant(x, mean, cov, a, w_v)), est
    assert not accepts(sc.pointwise_mse_constant(x, mean, 1.1 * cov, a, w_v)), est
    # A = 0: the plain sample mean, n MSE = tr(W_v Sigma W_v^T) exactly.
    np.testing.assert_allclose(sc.pointwise_mse_constant(x, mean, cov, 0 * a, w_v),
                               np.trace(w_v @ cov @ w_v.T), rtol=1e-12)


def test_pushforward_moments_match_exact_gaussian():
    # (Gamma_mu)_# N(m, Sigma) for the affine Gamma_mu(y) = W_v (m + Sigma A y): mean
    # W_v (m + Sigma A m), covariance W_v Sigma A Sigma A^T Sigma W_v^T. The relative scale error
    # t = <E cov_n - C, C>/||C||^2 of the estimator is within 3 SE (plus the O(1/n) bias, under 1 %
    # at n = 1024, H = 0.45); a covariance estimator off by 10 % fails by more than 5 SE.
    mean, root, a, w_v = _anisotropic(3, a_scale=0.35)
    cov = root @ root.T
    assert 0.3 < sc.horizon(a, cov) < 0.6
    m, c = (np.asarray(v) for v in sc.gaussian_pushforward_moments(mean, cov, a, w_v))
    with jax.enable_x64(True):
        tokens = sc.sample_gaussian(jax.random.key(1), (64, 1024), jnp.asarray(mean), jnp.asarray(root))
        mu, cv = (np.asarray(v) for v in sc.pushforward_moments(tokens, jnp.asarray(a), jnp.asarray(w_v)))
    t = sc.estimate(np.einsum("rij,ij->r", cv - c, c) / np.sum(c * c))
    assert abs(t.mean) <= 3 * t.se + 0.01, t
    assert 0.1 > 5 * t.se, t  # the test can see a 10 % scale error
    z_cov = np.abs(sc.estimate(cv).mean - c) / sc.estimate(cv).se
    z_mean = np.abs(sc.estimate(mu).mean - m) / sc.estimate(mu).se
    assert np.all(z_cov <= 4) and np.all(z_mean <= 4), (z_cov, z_mean)


def test_gaussian_pushforward_moments_by_sampling_the_exact_map():
    # The closed form against 2e5 draws pushed through gamma_gaussian itself (not the residual
    # map y + Gamma_mu(y), whose covariance W_v (I + Sigma A) Sigma (I + Sigma A)^T W_v^T differs).
    mean, root, a, w_v = _anisotropic(4)
    cov = root @ root.T
    y = np.random.default_rng(5).standard_normal((200_000, 3)) @ root.T + mean
    g = np.asarray(sc.gamma_gaussian(jnp.asarray(y), mean, cov, a, w_v))
    m, c = sc.gaussian_pushforward_moments(mean, cov, a, w_v)
    se = np.sqrt(np.diag(c) / y.shape[0])
    assert np.all(np.abs(g.mean(0) - np.asarray(m)) <= 4 * se)
    np.testing.assert_allclose(np.cov(g.T), c, rtol=0.02, atol=0.02 * np.abs(c).max())
    residual = w_v @ (np.eye(3) + cov @ a) @ cov @ (np.eye(3) + cov @ a).T @ w_v.T
    assert np.max(np.abs(residual - np.asarray(c))) > 0.5 * np.abs(c).max()


def test_sup_errors_is_the_sup_over_the_sphere():
    # n tokens all at m: Gamma_n(x) = W_v m, so the error is ||W_v Sigma A x||, whose sup over
    # |x| = R is R sigma_max(W_v Sigma A) (anisotropic A: the error depends on the direction; the
    # mean over the sphere is below 0.8 of the sup). 2000 probes reach it from below within 1 %.
    mean, root, a, w_v = _anisotropic(6)
    a = a @ np.diag([3.0, 1.0, 0.2])
    cov, radius = root @ root.T, 1.7
    lin = w_v @ cov @ a
    top = radius * np.linalg.norm(lin, 2)
    with jax.enable_x64(True):
        probes = sc.sphere_directions(jax.random.key(2), 2000, 3, radius, jnp.float64)
        exact = sc.gamma_gaussian(probes, mean, cov, a, w_v)
        tokens = jnp.broadcast_to(jnp.asarray(mean), (2, 16, 3))
        sup = np.asarray(sc.sup_errors(probes, tokens, exact, jnp.asarray(a), jnp.asarray(w_v)))
        point = np.asarray(sc.pointwise_errors(probes, tokens, exact, jnp.asarray(a), jnp.asarray(w_v)))
    np.testing.assert_allclose(point[0], np.linalg.norm(np.asarray(probes) @ lin.T, axis=-1), rtol=1e-10)
    assert np.all(sup <= top * (1 + 1e-10)) and np.all(sup >= 0.99 * top), (sup, top)
    assert point.mean() < 0.8 * top


@hypothesis.given(seed=st.integers(0, 2**31 - 1), log_eigs=st.lists(st.floats(-2.0, 2.0), min_size=3,
                                                                    max_size=3))
def test_horizon_is_the_whitened_norm(seed, log_eigs):
    # H = ||Sigma^(1/2) A Sigma^(1/2)||_2 = ||L^T A L||_2 for any L L^T = Sigma (L = Sigma^(1/2) U,
    # U orthogonal) = sqrt(spectral radius of Sigma A^T Sigma A): two computations that share
    # nothing with sc.horizon's eigen-root.
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    cov = (q * np.exp(log_eigs)) @ q.T
    a = rng.standard_normal((3, 3))
    chol = np.linalg.cholesky(cov)
    h = sc.horizon(a, cov)
    np.testing.assert_allclose(h, np.linalg.norm(chol.T @ a @ chol, 2), rtol=1e-8)
    np.testing.assert_allclose(h**2, np.max(np.abs(np.linalg.eigvals(cov @ a.T @ cov @ a))), rtol=1e-7)


def test_horizon_differs_from_a_sigma_for_anisotropic_setups():
    # The setups the studies use: anisotropic Sigma, non-symmetric A. ||A Sigma|| is another number.
    for d, anis in ((2, 3.0), (4, 2.0), (8, 4.0)):
        setup = sc.GaussianSetup(d, 0.5, 1.3, anis)
        _, cov, root, a = (np.asarray(v) for v in setup.arrays())
        np.testing.assert_allclose(root @ root, cov, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.linalg.eigvalsh(cov), 0.5 * np.geomspace(1 / anis, anis, d),
                                   rtol=1e-10)
        h = setup.horizon()
        np.testing.assert_allclose(h, np.linalg.norm(root @ a @ root, 2), rtol=1e-10)
        assert abs(h / np.linalg.norm(a @ cov, 2) - 1) > 0.1, (d, h)


def test_slope_verdict():
    fit = lambda slope, se: sc.Fit(slope, se, 0.0, 0.0, 1.0)  # noqa: E731
    assert sc.slope_verdict(fit(-0.49, 0.01)) == "verified"
    assert sc.slope_verdict(fit(-0.437, 0.026)) == "inconclusive"  # 3 SE > floor: cannot decide
    assert sc.slope_verdict(fit(-0.400, 0.014)) == "refuted"  # 0.1 > floor + 3 SE
    assert sc.slope_verdict(fit(-0.54, 0.016)) == "verified"  # the floor, at a decisive SE
    assert sc.slope_verdict(fit(-0.56, 0.001)) == "refuted"
    assert sc.slope_verdict(fit(-1.0, 0.01), want=-1.0) == "verified"
    assert sc.slope_verdict(fit(np.nan, 0.01)) == "refuted"
    assert sc.slope_verdict(fit(-0.5, np.nan)) == "refuted"
    assert sc.slope_verdict(fit(-0.5, np.inf)) == "refuted"
