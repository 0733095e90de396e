"""Token-sample complexity of attention: ``Gamma_{mu_n} -> Gamma_mu`` and its Monte Carlo rates.

Bohbot, Letrouit, Peyre, Vialard, "token-sample complexity of attention", arXiv 2512.10656
(``docs/science.md`` section 2.3). Attention on a token distribution ``mu`` is

.. math:: \\Gamma_\\mu(x) = \\frac{E_{y \\sim \\mu}[e^{\\langle A x, y\\rangle} W_v y]}
  {E_{y \\sim \\mu}[e^{\\langle A x, y\\rangle}]}

and for the empirical measure of ``n`` tokens it is softmax attention with query ``A x``, keys
``y_j``, values ``W_v y_j`` and scale 1, computed here by :func:`jaxattn.attention` (the XLA
reference).

**Convention for A and the horizon H.** ``A`` is the matrix *in the exponent*: with
``A = W_k^T W_q / sqrt(d)`` the ``1/sqrt(d)`` is part of ``A``, and the horizon
``H = ||Sigma^(1/2) A Sigma^(1/2)||_2`` is computed from that same ``A`` (the authors' code leaves
the ``1/sqrt(d)`` out of H; pass ``A`` without it to reproduce their axis).

Exact limits (no finite reference sample):

* Gaussian ``mu = N(m, Sigma)``: ``Gamma_mu(x) = W_v (m + Sigma A x)``.
* Uniform on the sphere of radius ``rho`` in ``R^d``: ``Gamma_mu(x) = W_v rho A_d(rho ||Ax||)
  Ax/||Ax||`` with the von Mises-Fisher mean resultant ``A_d(r) = I_{d/2}(r)/I_{d/2-1}(r)``
  (:func:`bessel_ratio`, a backward recurrence that never forms a Bessel function, so it cannot
  overflow).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn

__all__ = [
    "bessel_ratio_over_x",
    "bessel_ratio",
    "mean_resultant",
    "gamma_empirical",
    "gamma_gaussian",
    "gamma_sphere",
    "sample_gaussian",
    "sample_sphere",
    "sphere_directions",
    "Estimate",
    "estimate",
    "pointwise_errors",
    "pointwise_mse_constant",
    "sup_errors",
    "pushforward_moments",
    "pushforward_errors",
    "gaussian_pushforward_moments",
    "Fit",
    "wls_fit",
    "loglog_slope",
    "RATE_FLOOR",
    "slope_verdict",
    "horizon",
    "predicted_moment_exponent",
    "growth_constant",
]

_RECURRENCE_STEPS = 256


def bessel_ratio_over_x(nu, x, steps: int = _RECURRENCE_STEPS):
    """``I_{nu+1}(x) / (x I_nu(x))`` for ``nu >= 0``, ``x >= 0``, by backward recurrence.

    .. math:: g_\\nu(x) = \\frac{1}{2(\\nu + 1) + x^2 g_{\\nu+1}(x)}, \\qquad
      g_\\mu(x) \\approx \\frac{1}{\\mu + 1/2 + \\sqrt{(\\mu + 1)^2 + x^2}} \\text{ at } \\mu = \\nu + K

    (the three-term recurrence ``I_{v-1} - I_{v+1} = (2v/x) I_v`` divided by ``x I_{v+1}``; the
    start lies between Amos's 1974 bounds). Each backward step multiplies the start's error by
    ``(x g)^2 < 1``; with ``K = 256`` the relative error is below ``1e-13`` in float64 for
    ``x <= 2000`` (``tests/test_theory_sample_complexity.py::test_bessel_ratio_matches_scipy``).
    Smooth at ``x = 0`` (``g = 1/(2(nu+1))``). Jittable.

    Args:
      nu: order(s) ``>= 0``.
      x: argument(s) ``>= 0``, broadcast with ``nu``.
      steps: recurrence length ``K``.

    Returns:
      ``g_nu(x)`` in the promoted float dtype.
    """
    nu, x = jnp.asarray(nu), jnp.asarray(x)
    dtype = jnp.promote_types(jnp.promote_types(nu.dtype, x.dtype), jnp.float32)
    nu, x = nu.astype(dtype), x.astype(dtype)
    x2 = x * x
    mu = nu + steps
    g0 = 1.0 / (mu + 0.5 + jnp.sqrt((mu + 1.0) ** 2 + x2))

    def body(i, g):
        order = mu - 1.0 - i
        return 1.0 / (2.0 * (order + 1.0) + x2 * g)

    return jax.lax.fori_loop(0, steps, body, g0 * jnp.ones_like(x2))


def bessel_ratio(nu, x, steps: int = _RECURRENCE_STEPS):
    """``I_{nu+1}(x) / I_nu(x)`` (see :func:`bessel_ratio_over_x`)."""
    return jnp.asarray(x) * bessel_ratio_over_x(nu, x, steps)


def mean_resultant(d: int, r):
    """von Mises-Fisher mean resultant length ``A_d(r) = I_{d/2}(r) / I_{d/2-1}(r)`` (``d >= 2``)."""
    if d < 2:
        raise ValueError(f"d must be >= 2, got {d}")
    return bessel_ratio(d / 2 - 1, r)


def _check_matrix(a_matrix, d, name="a_matrix"):
    a = jnp.asarray(a_matrix)
    if a.shape != (d, d):
        raise ValueError(f"{name} must be [d, d] = [{d}, {d}], got {a.shape}")
    return a


def _lift(v, ndim):
    """``v [d]`` reshaped to rank ``ndim`` (leading ones), for strict rank promotion."""
    v = jnp.asarray(v)
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _values(tokens, w_v):
    return tokens if w_v is None else jnp.einsum("...nd,ed->...ne", tokens, w_v)


def _attend_one(q, tokens, w_v):
    """Softmax attention of queries ``q [M, d]`` over one token set ``[n, d]`` -> ``[M, dv]``."""
    v = _values(tokens, w_v)
    out = jaxattn.attention(q[None, :, None, :], tokens[None, :, None, :], v[None, :, None, :],
                            scale=1.0, implementation="xla")
    return out[0, :, 0, :]


def gamma_empirical(x, tokens, a_matrix, w_v=None, batch_size: int | None = 8):
    """``Gamma_{mu_n}(x)``: softmax attention of queries ``A x`` over ``n`` tokens, via jaxattn.

    .. math:: \\Gamma_{\\mu_n}(x) = \\sum_j \\text{softmax}_j(\\langle A x, y_j \\rangle) W_v y_j

    Args:
      x: query points ``[M, d]``.
      tokens: ``[n, d]`` or replicates ``[R, n, d]``.
      a_matrix: ``A`` ``[d, d]`` (in the exponent; see the module's convention).
      w_v: value matrix ``[dv, d]`` or None for the identity.
      batch_size: replicates per vectorised chunk (``jax.lax.map``), bounding memory.

    Returns:
      ``[M, dv]`` or ``[R, M, dv]``.
    """
    x, tokens = jnp.asarray(x), jnp.asarray(tokens)
    if x.ndim != 2 or tokens.ndim not in (2, 3) or tokens.shape[-1] != x.shape[-1]:
        raise ValueError(f"x must be [M, d] and tokens [n, d] or [R, n, d], got {x.shape} and "
                         f"{tokens.shape}")
    a = _check_matrix(a_matrix, x.shape[-1])
    q = x @ a.T  # <A x, y> = (A x) . y
    if tokens.ndim == 2:
        return _attend_one(q, tokens, w_v)
    return jax.lax.map(lambda t: _attend_one(q, t, w_v), tokens, batch_size=batch_size)


def gamma_gaussian(x, mean, cov, a_matrix, w_v=None):
    """Exact ``Gamma_mu`` for ``mu = N(m, Sigma)``: ``W_v (m + Sigma A x)`` (an affine map).

    Args:
      x: ``[..., d]``.
      mean: ``m`` ``[d]``.
      cov: ``Sigma`` ``[d, d]``.
      a_matrix: ``A`` ``[d, d]``.
      w_v: ``[dv, d]`` or None.

    Returns:
      ``[..., dv]``.
    """
    x = jnp.asarray(x)
    d = x.shape[-1]
    sa = _check_matrix(cov, d, "cov") @ _check_matrix(a_matrix, d)
    out = _lift(mean, x.ndim) + jnp.einsum("ij,...j->...i", sa, x)
    return out if w_v is None else jnp.einsum("ed,...d->...e", w_v, out)


def gamma_sphere(x, radius, a_matrix, w_v=None):
    """Exact ``Gamma_mu`` for ``mu`` uniform on the sphere of radius ``rho`` in ``R^d``.

    .. math:: \\Gamma_\\mu(x) = W_v \\, \\rho \\, A_d(\\rho \\|u\\|) \\frac{u}{\\|u\\|}
      = W_v \\, \\rho^2 g_{d/2-1}(\\rho \\|u\\|) \\, u, \\qquad u = A x

    (the tilted uniform measure is von Mises-Fisher with concentration ``rho ||u||``). The second
    form is smooth at ``u = 0``. Checked against Monte Carlo and, for ``d = 2, 3``, against
    ``i1e/i0e`` and ``coth(r) - 1/r``.

    Returns:
      ``[..., dv]``.
    """
    x = jnp.asarray(x)
    d = x.shape[-1]
    if d < 2:
        raise ValueError(f"the sphere needs d >= 2, got d = {d}")
    u = jnp.einsum("ij,...j->...i", _check_matrix(a_matrix, d), x)
    r = radius * jnp.linalg.norm(u, axis=-1)
    out = (radius**2 * bessel_ratio_over_x(d / 2 - 1, r))[..., None] * u
    return out if w_v is None else jnp.einsum("ed,...d->...e", w_v, out)


def sample_gaussian(key, shape, mean, cov_sqrt):
    """``shape + (d,)`` samples of ``N(m, L L^T)`` with ``L = cov_sqrt``."""
    mean, cov_sqrt = jnp.asarray(mean), jnp.asarray(cov_sqrt)
    z = jax.random.normal(key, (*shape, mean.shape[0]), mean.dtype)
    return _lift(mean, z.ndim) + jnp.einsum("ij,...j->...i", cov_sqrt, z)


def sample_sphere(key, shape, d: int, radius, dtype=jnp.float32):
    """``shape + (d,)`` samples uniform on the sphere of ``radius`` in ``R^d``."""
    z = jax.random.normal(key, (*shape, d), dtype)
    return radius * z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def sphere_directions(key, count: int, d: int, radius, dtype=jnp.float32):
    """``count`` probe points on the sphere of ``radius`` (for the sup-error estimator)."""
    return sample_sphere(key, (count,), d, radius, dtype)


class Estimate(NamedTuple):
    """Monte Carlo mean over replicates and its standard error."""

    mean: np.ndarray
    se: np.ndarray


def estimate(samples, axis=0) -> Estimate:
    """Mean and standard error (``std / sqrt(R)``, ddof 1) over the replicate ``axis``."""
    s = np.asarray(samples, np.float64)
    r = s.shape[axis]
    if r < 2:
        raise ValueError(f"need at least 2 replicates, got {r}")
    return Estimate(s.mean(axis=axis), s.std(axis=axis, ddof=1) / math.sqrt(r))


@jax.jit
def pointwise_errors(x, tokens, exact, a_matrix, w_v=None):
    """``||Gamma_{mu_n}(x) - Gamma_mu(x)||`` per replicate and query: ``[R, M]``.

    Args:
      x: ``[M, d]``.
      tokens: ``[R, n, d]``.
      exact: ``Gamma_mu(x)`` ``[M, dv]``.
    """
    approx = gamma_empirical(x, tokens, a_matrix, w_v)
    return jnp.linalg.norm(approx - exact[None], axis=-1)


def pointwise_mse_constant(x, mean, cov, a_matrix, w_v=None):
    """``lim_n n E||Gamma_{mu_n}(x) - Gamma_mu(x)||^2`` for Gaussian tokens ``mu = N(m, Sigma)``.

    .. math:: K(x) = e^{\\|\\Sigma^{1/2} A x\\|^2} \\left(\\operatorname{tr}(W_v \\Sigma W_v^T)
      + \\|W_v \\Sigma A x\\|^2\\right)

    Derivation (ours). With ``u = A x``, weights ``w_i = e^{<u, y_i>}`` and ``Gamma_{mu_n} = N/D``,
    ``N = mean_i w_i W_v y_i``, ``D = mean_i w_i``, the delta method gives
    ``Gamma_{mu_n} - Gamma_mu ~ mean_i w_i W_v (y_i - mu_x) / E w`` with ``mu_x = m + Sigma u``
    (the tilted mean; each term has mean 0), so ``n MSE -> E[w^2 ||W_v (y - mu_x)||^2] / (E w)^2``.
    Gaussian tilts are shifts: ``E[e^{<t, y>} g(y)] = e^{<t, m> + t^T Sigma t / 2}
    E_{N(m + Sigma t, Sigma)}[g]``; at ``t = 2u`` over ``(E w)^2`` (``t = u``, squared) the prefactor
    is ``e^{u^T Sigma u}``, and under ``N(m + 2 Sigma u, Sigma)`` the vector ``y - mu_x`` has mean
    ``Sigma u`` and covariance ``Sigma``, whence the bracket. ``m`` drops out. Checked against
    Monte Carlo of :func:`pointwise_errors` (``test_pointwise_mse_matches_its_constant``,
    ``theory.check.row_mse_constant``); the approach to ``K`` from below at small ``n`` is what
    makes large ``||Sigma^(1/2) A x||`` pre-asymptotic (``theory.check.row_rate_large_radius``).

    Args:
      x: ``[..., d]``.
      mean: ``m`` ``[d]`` (unused: the constant does not depend on it; kept for the signature).
      cov: ``Sigma`` ``[d, d]``.
      a_matrix: ``A`` ``[d, d]``.
      w_v: ``[dv, d]`` or None.

    Returns:
      ``[...]``.
    """
    del mean
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    cov, a = np.asarray(cov, np.float64), np.asarray(a_matrix, np.float64)
    if cov.shape != (d, d) or a.shape != (d, d):
        raise ValueError(f"cov and a_matrix must be [{d}, {d}], got {cov.shape}, {a.shape}")
    w_v = np.eye(d) if w_v is None else np.asarray(w_v, np.float64)
    u = np.einsum("ij,...j->...i", a, x)
    tilt = np.einsum("...i,ij,...j->...", u, cov, u)
    shift = np.einsum("ed,dj,...j->...e", w_v, cov, u)
    return np.exp(tilt) * (np.trace(w_v @ cov @ w_v.T) + np.sum(shift**2, axis=-1))


@jax.jit
def sup_errors(probes, tokens, exact, a_matrix, w_v=None):
    """``max`` over probe points of the pointwise error, per replicate: ``[R]``.

    The probes (e.g. :func:`sphere_directions` at radius ``R``) approximate the sup over the
    ball from below; with the exponential weights the sup sits on the boundary sphere.
    """
    return jnp.max(pointwise_errors(probes, tokens, exact, a_matrix, w_v), axis=-1)


def _self_attention(tokens, a_matrix, w_v):
    return gamma_empirical(tokens, tokens, a_matrix, w_v)


@jax.jit
def pushforward_moments(tokens, a_matrix, w_v=None):
    """Mean and (biased, ``1/n``) covariance of ``(Gamma_{mu_n})_# mu_n``, per replicate.

    The transformed distribution of ``n`` tokens is their self-attention outputs
    ``o_i = Gamma_{mu_n}(y_i)``. Checked against the exact Gaussian pushforward
    (``test_pushforward_moments_match_exact_gaussian``).

    Args:
      tokens: ``[R, n, d]``.

    Returns:
      ``(mean [R, dv], cov [R, dv, dv])``.
    """
    # lax.map in chunks of 4 replicates bounds memory at 4 n^2 weights.
    outs = jax.lax.map(lambda t: _self_attention(t, a_matrix, w_v), tokens, batch_size=4)
    mean = jnp.mean(outs, axis=1)
    centred = outs - mean[:, None, :]
    return mean, jnp.einsum("rni,rnj->rij", centred, centred) / outs.shape[1]


@jax.jit
def pushforward_errors(tokens, a_matrix, exact_mean, exact_cov, w_v=None):
    """Errors of the mean and covariance of ``(Gamma_{mu_n})_# mu_n`` against the exact ones.

    Moments from :func:`pushforward_moments`, compared with those of ``(Gamma_mu)_# mu``.

    Args:
      tokens: ``[R, n, d]``.
      exact_mean: ``[dv]``.
      exact_cov: ``[dv, dv]``.

    Returns:
      ``(mean_error [R], cov_error [R])`` (Euclidean and Frobenius norms).
    """
    mean, cov = pushforward_moments(tokens, a_matrix, w_v)
    return (jnp.linalg.norm(mean - exact_mean[None], axis=-1),
            jnp.linalg.norm(cov - exact_cov[None], axis=(-2, -1)))


def gaussian_pushforward_moments(mean, cov, a_matrix, w_v=None):
    """Mean and covariance of ``(Gamma_mu)_# mu`` for ``mu = N(m, Sigma)`` (affine map).

    ``Gamma_mu(y) = W_v (m + Sigma A y)``, so the mean is ``W_v (m + Sigma A m)`` and the
    covariance ``W_v Sigma A Sigma A^T Sigma W_v^T``. (``W_v (I + Sigma A) Sigma (I + Sigma A)^T
    W_v^T`` would be the covariance of ``W_v (y + Sigma A y)``, a residual map, which this is not.)
    """
    mean, cov, a = jnp.asarray(mean), jnp.asarray(cov), jnp.asarray(a_matrix)
    sa = cov @ a
    m = mean + sa @ mean
    c = sa @ cov @ sa.T
    if w_v is not None:
        m, c = w_v @ m, w_v @ c @ w_v.T
    return m, c


class Fit(NamedTuple):
    """A weighted least-squares line ``y = intercept + slope x`` with standard errors."""

    slope: float
    slope_se: float
    intercept: float
    intercept_se: float
    chi2_red: float


def wls_fit(x, y, y_se) -> Fit:
    """Weighted least squares of ``y`` on ``x`` with weights ``1/y_se^2``, on the host (float64).

    Standard errors are the known-variance ones multiplied by ``sqrt(max(1, chi2_red))``: a
    line that does not fit within the error bars gets wider, never narrower, error bars.

    Returns:
      :class:`Fit`.
    """
    x, y, se = (np.asarray(a, np.float64) for a in (x, y, y_se))
    if x.shape != y.shape or y.shape != se.shape or x.ndim != 1 or x.size < 3:
        raise ValueError(f"x, y, y_se must be 1-d of one length >= 3, got {x.shape}, {y.shape}, "
                         f"{se.shape}")
    if np.any(~np.isfinite(se)) or np.any(se <= 0):
        raise ValueError("y_se must be finite and > 0")
    w = 1.0 / se**2
    xm, ym = np.sum(w * x) / np.sum(w), np.sum(w * y) / np.sum(w)
    sxx = np.sum(w * (x - xm) ** 2)
    slope = np.sum(w * (x - xm) * (y - ym)) / sxx
    intercept = ym - slope * xm
    chi2_red = float(np.sum(w * (y - intercept - slope * x) ** 2) / (x.size - 2))
    inflate = math.sqrt(max(1.0, chi2_red))
    slope_se = inflate / math.sqrt(sxx)
    intercept_se = inflate * math.sqrt(1.0 / np.sum(w) + xm**2 / sxx)
    return Fit(float(slope), float(slope_se), float(intercept), float(intercept_se), chi2_red)


def loglog_slope(ns, mean, se) -> Fit:
    """Slope of ``log(mean error)`` on ``log n`` (WLS, ``se(log mean) = se/mean``)."""
    mean, se = np.asarray(mean, np.float64), np.asarray(se, np.float64)
    return wls_fit(np.log(np.asarray(ns, np.float64)), np.log(mean), se / mean)


RATE_FLOOR = 0.05  # the stated floor of slope_verdict (theory.check, experiments.convergence_rates)


def slope_verdict(fit: Fit, want: float = -0.5, floor: float = RATE_FLOOR, z: float = 3.0) -> str:
    """The one rule for "the slope is ``want``" (the claim table and the experiment use it).

    * ``verified``: ``|slope - want| <= max(z SE, floor)`` and ``z SE <= floor`` (the SE is small
      enough to decide, so the allowance is the floor, never a wide error bar);
    * ``refuted``: ``|slope - want| > floor + z SE`` (outside the floor beyond the noise), or a
      non-finite slope or SE (a broken fit never passes);
    * ``inconclusive``: otherwise (the SE is too large to decide).

    A slope measured before the asymptotic regime is reached can be refuted by this rule while the
    rate holds for larger ``n``: the rows that apply it say which regime they measure.
    """
    slope, se = float(fit.slope), float(fit.slope_se)
    if not (math.isfinite(slope) and math.isfinite(se) and se >= 0):
        return "refuted"
    dev = abs(slope - want)
    if z * se <= floor and dev <= floor:
        return "verified"
    return "refuted" if dev > floor + z * se else "inconclusive"


def horizon(a_matrix, cov):
    """The horizon ``H = ||Sigma^(1/2) A Sigma^(1/2)||_2`` (A as in the exponent; host, float64).

    Why this norm: at a token ``y = Sigma^(1/2) z`` (``m = 0``) the pointwise constant
    :func:`pointwise_mse_constant` carries the factor ``e^{||M z||^2}``, ``M = Sigma^(1/2) A
    Sigma^(1/2)``, whose mean over ``z ~ N(0, I)`` is ``det(I - 2 M^T M)^(-1/2)``, finite iff
    ``H = ||M||_2 < 1/sqrt 2``: the pushforward's moments feel the top singular value of ``M``.
    ``||A Sigma||`` differs from it for anisotropic ``Sigma`` and non-symmetric ``A``
    (``test_horizon_is_the_whitened_norm``).
    """
    a, c = np.asarray(a_matrix, np.float64), np.asarray(cov, np.float64)
    evals, evecs = np.linalg.eigh(c)
    if np.any(evals < -1e-12 * max(1.0, evals.max())):
        raise ValueError("cov must be positive semi-definite")
    root = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    return float(np.linalg.norm(root @ a @ root, ord=2))


def predicted_moment_exponent(h):
    """The authors' comparison curve for the moment exponent: ``1/(2(1 + H^2))``."""
    h = np.asarray(h, np.float64)
    return 0.5 / (1.0 + h**2)


def growth_constant(ns, mean, se) -> Estimate:
    """``C = sqrt(n) * E[error]``, averaged over ``n`` with inverse-variance weights.

    Meaningful where the error follows ``C/sqrt(n)`` (check :func:`loglog_slope` first).
    """
    root = np.sqrt(np.asarray(ns, np.float64))
    c, c_se = root * np.asarray(mean), root * np.asarray(se)
    w = 1.0 / c_se**2
    return Estimate(np.sum(w * c) / np.sum(w), 1.0 / np.sqrt(np.sum(w)))


# --- rate studies: error against n with replicates, and the log-log fit ----------------------


class RateStudy(NamedTuple):
    """Errors against ``n``: Monte Carlo mean and standard error per ``n`` and the log-log fit."""

    ns: np.ndarray
    mean: np.ndarray
    se: np.ndarray
    fit: Fit


def error_vs_n(key, ns, replicates: int, sample, errors) -> RateStudy:
    """Runs ``errors(sample(key_i, (replicates, n)))`` (``[R]`` errors) for each ``n``; fits the slope.

    Independent token draws for every ``n`` (``fold_in(key, i)``), so the fit's points are
    independent.
    """
    means, ses = [], []
    for i, n in enumerate(ns):
        tokens = sample(jax.random.fold_in(key, i), (replicates, int(n)))
        est = estimate(errors(tokens))
        means.append(est.mean)
        ses.append(est.se)
    means, ses = np.asarray(means), np.asarray(ses)
    return RateStudy(np.asarray(ns), means, ses, loglog_slope(ns, means, ses))


def within(value, prediction, se, floor) -> bool:
    """The statistical acceptance rule: ``|value - prediction| <= max(3 se, floor)``."""
    return bool(abs(value - prediction) <= max(3.0 * se, floor))


class GaussianSetup(NamedTuple):
    """``mu = N(0, Sigma)`` tokens, ``A = a_scale * A0`` with ``A0`` a fixed random rotation.

    ``Sigma = sigma2 I_d`` at ``anisotropy = 1``; otherwise ``Sigma = sigma2 Q diag(e) Q^T`` with a
    fixed random rotation ``Q`` and eigenvalues ``e`` geometric from ``1/anisotropy`` to
    ``anisotropy`` (geometric mean 1), so that ``Sigma`` and the non-symmetric ``A`` do not commute.
    """

    d: int
    sigma2: float
    a_scale: float
    anisotropy: float = 1.0

    def arrays(self, dtype=jnp.float64):
        """``(mean, cov, cov_sqrt, A)`` in ``dtype``."""
        rot, _ = np.linalg.qr(np.random.default_rng(self.d).standard_normal((self.d, self.d)))
        if self.anisotropy == 1.0:
            cov, root = self.sigma2 * np.eye(self.d), math.sqrt(self.sigma2) * np.eye(self.d)
        else:
            q, _ = np.linalg.qr(np.random.default_rng(1000 + self.d).standard_normal((self.d, self.d)))
            e = self.sigma2 * np.geomspace(1.0 / self.anisotropy, self.anisotropy, self.d)
            cov, root = (q * e) @ q.T, (q * np.sqrt(e)) @ q.T
        return (jnp.zeros(self.d, dtype), jnp.asarray(cov, dtype), jnp.asarray(root, dtype),
                jnp.asarray(self.a_scale * rot, dtype))

    def horizon(self) -> float:
        """:func:`horizon` of ``(A, Sigma)`` (``sigma2 * a_scale`` when isotropic: ``A0`` orthogonal)."""
        _, cov, _, a = self.arrays()
        return horizon(a, cov)


def _probe_points(key, count, d, radius, dtype):
    return sphere_directions(key, count, d, radius, dtype)


def gaussian_sup_study(key, setup: GaussianSetup, query_radius, ns, replicates, probes=16,
                       dtype=jnp.float64) -> RateStudy:
    """Sup over ``probes`` points of the sphere of radius ``R`` of the Gaussian-token error vs n."""
    mean, cov, root, a = setup.arrays(dtype)
    x = _probe_points(jax.random.fold_in(key, 10_000), probes, setup.d, query_radius, dtype)
    exact = gamma_gaussian(x, mean, cov, a)
    return error_vs_n(key, ns, replicates,
                      lambda k, shape: sample_gaussian(k, shape, mean, root),
                      lambda t: sup_errors(x, t, exact, a))


def sphere_sup_study(key, d, token_radius, a_scale, query_radius, ns, replicates, probes=16,
                     dtype=jnp.float64) -> RateStudy:
    """The same for tokens uniform on the sphere of ``token_radius``, ``A = a_scale I``."""
    a = a_scale * jnp.eye(d, dtype=dtype)
    x = _probe_points(jax.random.fold_in(key, 10_000), probes, d, query_radius, dtype)
    exact = gamma_sphere(x, token_radius, a)
    return error_vs_n(key, ns, replicates,
                      lambda k, shape: sample_sphere(k, shape, d, token_radius, dtype),
                      lambda t: sup_errors(x, t, exact, a))


def pointwise_mse_study(key, x, mean, cov_sqrt, a_matrix, n: int, replicates: int, w_v=None,
                        chunk: int = 256) -> Estimate:
    """``n ||Gamma_{mu_n}(x) - Gamma_mu(x)||^2`` over replicates for Gaussian tokens: ``[M]`` mean, SE.

    Its limit in ``n`` is :func:`pointwise_mse_constant`. Tokens are drawn ``chunk`` replicates
    at a time (memory ``chunk n d``).
    """
    mean, root = jnp.asarray(mean), jnp.asarray(cov_sqrt)
    x, a = jnp.asarray(x, mean.dtype), jnp.asarray(a_matrix, mean.dtype)
    exact = gamma_gaussian(x, mean, root @ root.T, a, w_v)
    sq = []
    for c in range(-(-replicates // chunk)):
        size = min(chunk, replicates - c * chunk)
        tokens = sample_gaussian(jax.random.fold_in(key, c), (size, int(n)), mean, root)
        sq.append(np.asarray(pointwise_errors(x, tokens, exact, a, w_v), np.float64) ** 2)
    return estimate(int(n) * np.concatenate(sq))


class MomentStudy(NamedTuple):
    """Errors of the pushforward's mean and covariance against ``n``, and the horizon."""

    horizon: float
    predicted_beta: float
    mean: RateStudy
    cov: RateStudy


def gaussian_moment_study(key, setup: GaussianSetup, ns, replicates, dtype=jnp.float64):
    """Moment exponents ``beta`` of ``(Gamma_{mu_n})_# mu_n`` for Gaussian tokens, vs ``1/(2(1+H^2))``."""
    mean, cov, root, a = setup.arrays(dtype)
    m, c = gaussian_pushforward_moments(mean, cov, a)
    means, covs = [], []
    for i, n in enumerate(ns):
        tokens = sample_gaussian(jax.random.fold_in(key, i), (replicates, int(n)), mean, root)
        me, ce = pushforward_errors(tokens, a, m, c)
        means.append(estimate(me))
        covs.append(estimate(ce))

    def study(ests):
        mu, se = np.asarray([e.mean for e in ests]), np.asarray([e.se for e in ests])
        return RateStudy(np.asarray(ns), mu, se, loglog_slope(ns, mu, se))

    h = setup.horizon()
    return MomentStudy(h, float(predicted_moment_exponent(h)), study(means), study(covs))


class GrowthStudy(NamedTuple):
    """``C(R) = sqrt(n) E[sup error]`` for several query radii, and its growth fits."""

    radii: np.ndarray
    c: np.ndarray
    c_se: np.ndarray
    slopes: np.ndarray  # log-log slope of each radius's error vs n
    slope_ses: np.ndarray
    rate_linear: Fit  # log C on R
    rate_quadratic: Fit  # log C on R^2
    studies: tuple = ()  # the RateStudy of each radius


def growth_study(key, setup: GaussianSetup | None, radii, ns, replicates, probes=16, sphere=None,
                 dtype=jnp.float64) -> GrowthStudy:
    """Measures ``C(R)`` for Gaussian tokens (``setup``) or sphere tokens (``sphere`` =
    ``(d, token_radius, a_scale)``), and fits ``log C`` on ``R`` and on ``R^2``.

    The sources give no constant: its size and rate are measured and reported; only that it
    rises with ``R`` is asserted (``theory.check.row_growth``).
    """
    cs, ses, slopes, slope_ses, studies = [], [], [], [], []
    for j, radius in enumerate(radii):
        k = jax.random.fold_in(key, j)
        if sphere is None:
            st = gaussian_sup_study(k, setup, radius, ns, replicates, probes, dtype)
        else:
            st = sphere_sup_study(k, *sphere, radius, ns, replicates, probes, dtype)
        g = growth_constant(st.ns, st.mean, st.se)
        studies.append(st)
        cs.append(g.mean)
        ses.append(g.se)
        slopes.append(st.fit.slope)
        slope_ses.append(st.fit.slope_se)
    radii, cs, ses = np.asarray(radii, np.float64), np.asarray(cs), np.asarray(ses)
    return GrowthStudy(radii, cs, ses, np.asarray(slopes), np.asarray(slope_ses),
                       wls_fit(radii, np.log(cs), ses / cs), wls_fit(radii**2, np.log(cs), ses / cs),
                       tuple(studies))


__all__ += ["RateStudy", "error_vs_n", "within", "GaussianSetup", "pointwise_mse_study", "gaussian_sup_study",
            "sphere_sup_study", "MomentStudy", "gaussian_moment_study", "GrowthStudy",
            "growth_study"]
