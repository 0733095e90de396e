"""Property tests for theory.dispersion: docs/science.md sections 2.1 and 2.2.

Shapes come from fixed buckets; hypothesis draws seeds, scales, temperatures and tie patterns.
float64 is on for the session (conftest). jaxattn applies ``1/temperature`` (and SSMax's
``s log n``) in float32, so comparisons against closed forms allow the float32 rounding of that
scale: a relative ``2^-23 (1 + |logit range| / theta)`` on the weights, never more.
"""

import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import variants
from theory import dispersion as D
from theory import sample_complexity as sc
from theory.check import topn_sample

LENGTHS = (2, 7, 64)
ADAPTIVE_LENGTHS = (7, 64)
EPS32 = 2.0**-23


def _scale_rtol(spread, theta):
    """Relative error of weights from a float32-rounded ``1/theta`` (plus float64 rounding)."""
    return EPS32 * (1.0 + np.asarray(spread) / theta) + 1e-12


def _logits(seed, n, scale, ties, rows=3):
    """``[rows, n]`` logits: standard normals clipped to +-4, times ``scale``.

    The clip bounds the spread by ``8 scale``; ``ties`` rounds to a grid of step ``scale / 2``
    (relative to the scale, so small scales tie some logits instead of zeroing every row).
    """
    x = np.clip(np.random.default_rng(seed).standard_normal((rows, n)), -4.0, 4.0)
    x = np.round(2 * x) / 2 if ties else x
    return jnp.asarray(x * scale, jnp.float64)


def _log_uniform(lo, hi):
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


# The claims are about rows whose logits differ: n >= 2 (at n = 1 every side is 1), and a scale
# in [1e-3, 4], drawn log-uniformly so small and large spreads are both common. The spread is at
# most 8 * 4 = 32 logit units, so spread/theta <= 640 < 709 at theta >= 0.05: e^(+-spread/theta)
# stays finite and nonzero in float64, and no bound is trivially inf or 0. (The former draws,
# scale in [0, 20] with n = 1 in the buckets, had n = 1 or a zero scale in 11-12 of 25 examples.)
MIN_SCALE, MAX_SCALE = 1e-3, 4.0
logit_args = dict(
    seed=st.integers(0, 2**31 - 1),
    n=st.sampled_from(LENGTHS),
    scale=_log_uniform(MIN_SCALE, MAX_SCALE),
    ties=st.booleans(),
)
# Adaptive temperature changes a row only where beta > 1, i.e. entropy in (0.85, 5.94) nats:
# impossible at n = 2 (H <= log 2), rare at large spreads. With n in (7, 64), beta > 1 in 95-100%
# of the rows of the three adaptive tests' 25 derandomized examples (96-100% of the examples have
# such a row); logit_args gives 39-64%, and the former draws 17-19%.
adaptive_args = dict(logit_args, n=st.sampled_from(ADAPTIVE_LENGTHS))
temperatures = st.floats(0.05, 5.0)


@hypothesis.given(**logit_args, theta=temperatures)
def test_lemma_2_1(seed, n, scale, ties, theta):
    s = _logits(seed, n, scale, ties)
    r = D.lemma_2_1(s, theta)
    tol = _scale_rtol(D.logit_spread(s), theta)[:, None]
    assert np.all(r.value >= r.lower * (1 - tol))
    assert np.all(r.value <= r.upper * (1 + tol))


@hypothesis.given(n=st.sampled_from((2, 64, 4096)), delta=st.floats(0.0, 30.0), theta=temperatures)
def test_lemma_2_1_tight(n, delta, theta):
    # One logit at M and n - 1 at m (and the reverse) come within n/(e^r + n - 1) and
    # (e^-r + n - 1)/n of the bounds, r = delta/theta: a bound looser by any factor fails here.
    t = D.lemma_2_1_extremal(n, delta, theta)
    np.testing.assert_allclose(t.ratio, t.closed, rtol=_scale_rtol(delta, theta))


def test_lemma_2_1_ratio_tends_to_one():
    # delta/theta fixed, n growing: both sides' ratios -> 1 at the rate (e^r - 1)/n.
    r = 3.0
    gaps = [1 - np.asarray(D.lemma_2_1_extremal(n, r).ratio) for n in (64, 4096, 2**18)]
    for g, n in zip(gaps, (64, 4096, 2**18), strict=True):
        np.testing.assert_allclose(g, [(math.exp(r) - 1) / (math.exp(r) + n - 1),
                                       (1 - math.exp(-r)) / n], rtol=1e-6)
    assert gaps[-1][0] < 8e-5 and gaps[-1][1] < 4e-6


@hypothesis.given(**logit_args, theta=temperatures)
def test_tight_max_bound(seed, n, scale, ties, theta):
    s = _logits(seed, n, scale, ties)
    r = D.tight_max_bound(s, theta)
    assert np.all(r.value <= r.bound * (1 + _scale_rtol(D.logit_spread(s), theta)))
    # It is tighter than Lemma 2.1's upper side for the max weight.
    assert np.all(r.bound <= D.lemma_2_1(s, theta).upper[:, 0] * (1 + 1e-12))


@hypothesis.given(n=st.sampled_from(LENGTHS), delta=st.floats(0.0, 30.0), theta=temperatures)
def test_tight_max_bound_equality(n, delta, theta):
    r = D.tight_max_bound(D.extremal_logits(n, delta, jnp.float64), theta)
    np.testing.assert_allclose(r.value, r.bound, rtol=_scale_rtol(delta, theta))


@hypothesis.given(**logit_args, theta=temperatures)
def test_entropy_floor(seed, n, scale, ties, theta):
    s = _logits(seed, n, scale, ties)
    floor, h = D.entropy_floor(s, theta)
    # The floor is log n - delta/theta; a float32 1/theta moves H by at most EPS32 * delta/theta.
    assert np.all(floor <= h + EPS32 * (1 + D.logit_spread(s) / theta) + 1e-12)


@pytest.mark.parametrize("theta", [1.0, 0.25])  # 1/theta exact in float32: float64 rounding only
def test_entropy_floor_tight(theta):
    # Uniform weights attain the floor (H = log n); a floor lowered by any constant fails here.
    for n in (2, 64):
        gap, closed = D.entropy_floor_gap(n, 0, 0.0, theta)
        assert abs(float(gap)) <= 1e-13 and closed == 0.0
    # k = ceil(r e^-r n) logits r above the rest: H - floor has the closed form
    # r (1 - f)/z + log z <= 1 + log(1 + r), a vanishing share of r (0.33 r at r = 10), so the
    # coefficient 1 of delta/theta cannot be lowered to 2/3 (or raised without failing above).
    n = 2**16
    for r in (0.5, 3.0, 10.0):
        k = math.ceil(r * math.exp(-r) * n)
        gap, closed = D.entropy_floor_gap(n, k, r * theta, theta)
        np.testing.assert_allclose(gap, closed, rtol=1e-9)
        assert closed <= 1 + math.log(1 + r)
    assert closed / r < 0.34


@hypothesis.given(**logit_args, theta=temperatures)
def test_entropy_derivative(seed, n, scale, ties, theta):
    s = _logits(seed, n, scale, ties)
    dh, var_term = D.entropy_temperature_derivative(s, theta)
    assert np.all(np.asarray(var_term) >= 0)
    # Rounding scale of the autodiff: differences of logits z ~ |s|/theta (float64) times the
    # tangent dz/dtheta ~ |s|/theta^2; rtol covers jaxattn's float32 1/theta.
    big = float(np.max(np.abs(np.asarray(s)))) + 1.0
    atol = 16 * np.finfo(np.float64).eps * (big / theta) * (big / theta**2)
    np.testing.assert_allclose(dh, var_term, rtol=1e-5, atol=atol)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 10.0),
                  n=st.sampled_from((2, 5, 32)))
def test_proposition_3_1(seed, scale, n):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((4, 6)) * scale) for _ in range(2))
    y, xs = jnp.asarray(rng.standard_normal(6)), jnp.asarray(rng.standard_normal((n, 6)) * scale)
    delta, bound = D.proposition_3_1(q, k, y, xs)
    assert float(delta) <= float(bound) * (1 + 1e-12)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), y_norm=_log_uniform(0.1, 10.0),
                  radius=_log_uniform(0.1, 10.0), n=st.sampled_from((2, 5)))
def test_proposition_3_1_attained(seed, y_norm, radius, n):
    # Q's and K's top singular directions aligned, y and +-x along them: delta equals the bound.
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((4, 6))) for _ in range(2))
    delta, bound = D.proposition_3_1(*D.proposition_3_1_extremal(q, k, y_norm, radius, n))
    np.testing.assert_allclose(delta, bound, rtol=1e-12)


def test_proposition_3_1_rejects_bad_shapes():
    with pytest.raises(ValueError, match="q_matrix"):
        D.proposition_3_1(jnp.eye(3), jnp.eye(4), jnp.ones(3), jnp.ones((2, 3)))


@hypothesis.given(**adaptive_args)
def test_adaptive_never_raises_entropy(seed, n, scale, ties):
    s = _logits(seed, n, scale, ties)
    adaptive, plain = D.adaptive_entropy(s)
    beta = np.asarray(D.adaptive_beta(s))
    assert np.all(beta >= 1.0)
    # beta is applied in float64 here (no float32 scale), so only float64 rounding remains.
    assert np.all(np.asarray(adaptive) <= np.asarray(plain) + 1e-12)


@hypothesis.given(**adaptive_args)
def test_adaptive_keeps_argmax(seed, n, scale, ties):
    s = _logits(seed, n, scale, ties)
    # Weights that tie exactly are one maximum: any tied index is a valid argmax, so the check
    # is that the weight at the logits' argmax is the largest weight, not that indices agree.
    at_top, top = D.adaptive_argmax_weight(s)
    np.testing.assert_array_equal(at_top, top)


def test_adaptive_argmax_accepts_tied_weights():
    # Logits ~1e-304 apart: every weight is exactly 1/n, so the first-index argmaxes differ
    # (the failure hypothesis once drew, scale 8.06e-305) while the logits' argmax is still a
    # maximum of the weights.
    s = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7)) * 8.06e-305)
    got, want = D.adaptive_argmax(s)
    assert np.any(np.asarray(got) != np.asarray(want))
    at_top, top = D.adaptive_argmax_weight(s)
    np.testing.assert_array_equal(at_top, top)
    np.testing.assert_array_equal(top, 1 / 7)


def test_adaptive_beta_bounded():
    beta_sup, h_sup, h_inactive = D.adaptive_beta_sup()
    var = variants.AdaptiveTemperature()
    h = jnp.linspace(0.0, 20.0, 200_001, dtype=jnp.float64)
    beta = np.asarray(var.beta(h))
    assert beta.max() <= beta_sup * (1 + 1e-12)
    assert abs(beta.max() - beta_sup) < 1e-6  # the sup is reached (on this grid, to 1e-6)
    np.testing.assert_allclose(float(var.beta(jnp.asarray(h_sup))), beta_sup, rtol=1e-12)
    assert np.all(beta[np.asarray(h) > h_inactive] == 1.0)
    # The numbers this package reports: sup beta ~ 2.4214 at H ~ 4.4124 nats; beta = 1 past ~5.9445.
    np.testing.assert_allclose([beta_sup, h_sup, h_inactive], [2.42139, 4.41240, 5.94452], atol=1e-4)
    # polyval order: highest power first (beta(2) = -0.037*16 + 0.481*8 - 2.3*4 + 4.917*2 - 1.791).
    np.testing.assert_allclose(float(var.beta(jnp.asarray(2.0))), 2.099, rtol=1e-12)


@hypothesis.given(**adaptive_args)
def test_adaptive_still_disperses(seed, n, scale, ties):
    s = _logits(seed, n, scale, ties)
    r = D.adaptive_dispersion(s)
    assert np.all(r.value >= r.lower * (1 - 1e-12))
    assert np.all(r.value <= r.upper * (1 + 1e-12))


def test_adaptive_still_disperses_tight():
    # Rows at H = h_sup (beta = sup beta) come within n/(e^(b delta) + n - 1) ~ 0.934 (upper) and
    # (e^(-b delta) + n - 1)/n ~ 0.988 (lower) of the bound: a larger b or exponent fails here.
    t, _ = D.adaptive_dispersion_extremal()
    np.testing.assert_allclose(t.ratio, t.closed, rtol=1e-9)
    assert np.all(t.ratio <= 1.0) and t.ratio[0] > 0.93 and t.ratio[1] > 0.98


def _poly(h):
    return float(np.polyval(np.asarray(variants.AdaptiveTemperature().coeffs), h))


def test_adaptive_band_edges_through_jaxattn():
    # The band where beta > 1, from the paper's threshold (0.5) and polynomial; jaxattn's applied
    # beta, read off its weights, is 1 just outside each edge and poly(H) > 1 just inside.
    lo, hi = D.adaptive_band()
    assert 0.5 < lo < hi  # poly(0.5) = 0.150 < 1: the threshold is not an edge
    cases = [(3, lo - 1e-3, False), (3, lo + 1e-3, True), (512, hi - 1e-3, True),
             (512, hi + 1e-3, False), (3, 0.5 - 1e-3, False), (3, 0.5 + 1e-3, False)]
    for n, h, inside in cases:
        s, _ = D.adaptive_logits_at_entropy(n, h)
        beta = float(D.applied_beta(s))
        np.testing.assert_allclose(beta, max(1.0, _poly(h)) if inside else 1.0, rtol=1e-9)
        assert (beta > 1 + 1e-4) == inside, (n, h, beta)


def test_adaptive_inactive_for_near_uniform_long_rows():
    # Entropy above h_inactive ~ 5.94 nats (n >= 381 near-uniform keys): beta = 1, plain softmax.
    s = jnp.asarray(np.random.default_rng(0).standard_normal((2, 1024)) * 0.1)
    np.testing.assert_array_equal(D.adaptive_beta(s), [1.0, 1.0])
    np.testing.assert_allclose(D.weights_of_logits(s, variants.AdaptiveTemperature()),
                               D.weights_of_logits(s, "softmax"), rtol=1e-12)


@hypothesis.given(n=st.sampled_from((2, 16, 256, 4096)), delta=st.floats(0.0, 10.0),
                  s=st.floats(0.05, 2.0), padding=st.sampled_from((0, 7, 1000)))
def test_ssmax_top_weight(n, delta, s, padding):
    # Hidden (padded) keys do not count in SSMax's n: the closed form keeps the visible n.
    got, closed = D.ssmax_top_weight(n, delta, s, jnp.float64, padding)
    # s log n is formed in float32 by jaxattn: relative error <= 2 EPS32 * s delta log n.
    np.testing.assert_allclose(got, closed, rtol=2 * EPS32 * (1 + s * delta * math.log(n)) + 1e-12)


def test_ssmax_counts_visible_keys():
    # n = 16 visible among 64 keys: counting all 64 would give 1/(1 + 15 * 64^(-1.72)) = 0.94.
    got, closed = D.ssmax_top_weight(16, 4.0, 0.43, jnp.float64, padding=48)
    np.testing.assert_allclose(got, closed, rtol=1e-6)
    np.testing.assert_allclose(closed, 1 / (1 + 15 * 16 ** -1.72), rtol=1e-12)


@hypothesis.given(s_delta=st.floats(0.1, 3.0), log2n=st.sampled_from((4, 10, 16)))
def test_ssmax_limit(s_delta, log2n):
    # jaxattn's SSMax top weight w at n keys: 1 - w <= n^(1 - s Delta) and w <= n^(s Delta)/(n-1),
    # so w -> ssmax_limit (1 if s Delta > 1, 0 if < 1). The first bound is approached:
    # (1 - w) / n^(1 - s Delta) = ((n - 1)/n) / (1 + (n - 1) n^(-s Delta)) -> 1 for s Delta > 1.
    n, s = 2**log2n, 0.43
    w = float(D.ssmax_top_weight(n, s_delta / s, s, jnp.float64).value)
    rtol = 2 * EPS32 * (1 + s_delta * math.log(n)) + 1e-12
    rest = (n - 1) * n ** (-s_delta)
    off = rest / (1 + rest)  # 1 - w in closed form, without cancellation
    np.testing.assert_allclose(1 - w, off, rtol=rtol, atol=1e-15)
    assert off <= n ** (1.0 - s_delta)
    np.testing.assert_allclose(off / n ** (1.0 - s_delta), (n - 1) / n / (1 + rest), rtol=1e-12)
    assert w <= n**s_delta / (n - 1) * (1 + rtol)
    limit = D.ssmax_limit(s_delta, 1.0)
    assert abs(w - limit) <= (n ** (1.0 - s_delta) if limit == 1.0 else n**s_delta / (n - 1)) + 1e-12


def test_ssmax_escapes_dispersion_through_jaxattn():
    top = [float(D.ssmax_top_weight(n, 4.0, 0.43, jnp.float64).value) for n in (16, 256, 4096)]
    assert top[0] < top[1] < top[2]  # s Delta = 1.72 > 1: the top weight rises with n
    low = [float(D.ssmax_top_weight(n, 1.0, 0.43, jnp.float64).value) for n in (16, 256, 4096)]
    assert low[0] > low[1] > low[2]  # s Delta = 0.43 < 1: it still disperses


@hypothesis.given(seed=st.integers(0, 2**31 - 1), radius=st.floats(0.1, 3.0),
                  gamma=st.floats(0.05, 2.0), n=st.sampled_from((2, 8, 64)))
def test_rbf_dispersion(seed, radius, gamma, n):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.uniform(-1, 1, 4))
    k = jnp.asarray(rng.uniform(-1, 1, (n, 4)))
    q, k = q * radius / 2, k * radius / 2  # norms <= radius
    spread, weights = D.rbf_dispersion(q, k, gamma)
    assert float(spread.value) <= float(spread.bound) * (1 + 1e-12) + 1e-15
    assert np.all(weights.value >= weights.lower * (1 - 1e-9))
    assert np.all(weights.value <= weights.upper * (1 + 1e-9))


@hypothesis.given(n=st.sampled_from((2, 64, 4096)), radius=st.floats(0.1, 3.0),
                  gamma=st.floats(0.05, 2.0))
def test_rbf_dispersion_tight(n, radius, gamma):
    # Keys at q and -q: delta = 4 gamma R^2 exactly, and the weight bounds come within Lemma 2.1's
    # extremal ratios at r = 4 gamma R^2.
    spread, t = D.rbf_extremal(n, radius, gamma)
    r = 4 * gamma * radius**2
    np.testing.assert_allclose(spread.value, spread.bound, rtol=1e-12)
    np.testing.assert_allclose(t.ratio, t.closed, rtol=_scale_rtol(r, 1.0) * 4)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), gamma=st.floats(0.05, 2.0),
                  scale=st.floats(0.1, 3.0))
def test_rbf_origin_sink(seed, gamma, scale):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal(4) * scale) for _ in range(2))
    lhs, rhs = D.rbf_origin_sink(q, k, gamma)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9, atol=1e-9)
    beats = float(jnp.linalg.norm(q - k)) < float(jnp.linalg.norm(q))
    if abs(float(rhs)) > 1e-8:
        assert (float(lhs) > 0) == beats


FUNCTIONS = {"exp": jnp.exp, "softplus": jax.nn.softplus, "sigmoid": jax.nn.sigmoid,
             "one_plus_square": lambda x: 1.0 + x * x}


@hypothesis.given(**logit_args, fn=st.sampled_from(sorted(FUNCTIONS)), a=st.floats(0.1, 8.0))
def test_lemma_1(seed, n, scale, ties, fn, a):
    s = jnp.clip(_logits(seed, n, scale, ties), -a, a)
    r = D.lemma_1(s, FUNCTIONS[fn], a)
    assert np.all(r.value >= r.lower * (1 - 1e-12))
    assert np.all(r.value <= r.upper * (1 + 1e-12))


@pytest.mark.parametrize("fn", sorted(FUNCTIONS))
def test_lemma_1_tight(fn):
    # One logit at argmax F, L - 1 at argmin F (and the reverse): ratios L/(k + L - 1) and
    # (1/k + L - 1)/L, k = max F / min F, -> 1 as L grows (1 - ratio ~ (k - 1)/L).
    for L in (2, 64, 4096):
        t = D.lemma_1_extremal(L, FUNCTIONS[fn], 3.0)
        np.testing.assert_allclose(t.ratio, t.closed, rtol=1e-10)
    assert np.all(t.ratio > 0.5)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from((2, 8, 64)),
                  scale=st.floats(0.01, 3.0), theta=temperatures)
def test_corollary_1(seed, n, scale, theta):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal(4) * scale)
    k = jnp.asarray(rng.standard_normal((n, 4)) * scale)
    r = D.corollary_1(q, k, theta)
    tol = _scale_rtol(2 * float(jnp.linalg.norm(q)) * float(jnp.max(jnp.linalg.norm(k, axis=-1))),
                      theta)
    assert np.all(r.value >= r.lower * (1 - tol))
    assert np.all(r.value <= r.upper * (1 + tol))


@hypothesis.given(L=st.sampled_from((2, 64, 4096)), q_norm=st.floats(0.1, 3.0),
                  radius=st.floats(0.1, 3.0), theta=temperatures)
def test_corollary_1_tight(L, q_norm, radius, theta):
    # Keys +-R u along q: spread 2 Delta, ratios n/(e^r + n - 1) and (e^-r + n - 1)/n, r = 2 Delta/T.
    t = D.corollary_1_extremal(L, q_norm, radius, theta)
    np.testing.assert_allclose(t.ratio, t.closed, rtol=_scale_rtol(2 * q_norm * radius, theta))


@pytest.mark.parametrize("L", [1, 4, 6])
def test_random_subset_exclusion_exact(L):
    # Over all L! orderings, jaxattn's top-N leaves each token out in exactly L! (L - N)/L.
    for n_top in range(L + 1):
        lhs, rhs = D.random_subset_exclusion_exact(L, n_top)
        assert lhs == rhs
        counts = D.random_subset_exclusion_counts(L, n_top)
        np.testing.assert_array_equal(counts, math.factorial(L) * (L - n_top) // L)


@pytest.mark.parametrize("L, n_top", [(10, 3), (64, 20)])
def test_random_subset_exclusion_mc(L, n_top):
    freq, se = D.random_subset_exclusion_mc(jax.random.key(L), L, n_top, trials=4000)
    want = (L - n_top) / L
    for i in (0, L - 1):  # two designated tokens, each within 3 standard errors
        assert abs(float(freq[i]) - want) <= 3 * float(se[i])


def _sphere_weights(key, L, batch=64, d=8, temperature=0.5):
    return topn_sample(key, L, batch, d, temperature)


def test_top_n_full_selection_readings():
    """Finding: at N = L reading (b) is 0, but reading (a) is ||s|| = ||attention output|| > 0."""
    w, x, out = _sphere_weights(jax.random.key(0), 16)
    d_a, d_b = D.top_n_distances(w, x, 16)
    np.testing.assert_array_equal(d_b, 0.0)
    np.testing.assert_allclose(d_a, jnp.linalg.norm(out, axis=-1), rtol=1e-12)
    assert float(jnp.min(d_a)) > 0.0


def test_top_n_distance_trend_in_length():
    """Reading (b) grows with L at fixed N; reading (a) does not (pinned counterexample, N = 1)."""
    stats = {}
    for L in (16, 64, 256):
        w, x, _ = _sphere_weights(jax.random.key(L), L)
        d_a, d_b = D.top_n_distances(w, x, 1)
        stats[L] = (sc.estimate(d_a), sc.estimate(d_b))
    for lo, hi in ((16, 64), (64, 256)):
        gap = stats[hi][1].mean - stats[lo][1].mean
        assert gap > 3 * math.hypot(stats[hi][1].se, stats[lo][1].se)
    gap_a = stats[16][0].mean - stats[64][0].mean  # reading (a) falls from L = 16 to 64
    assert gap_a > 3 * math.hypot(stats[16][0].se, stats[64][0].se)


def test_top_n_distance_collapses_as_n_to_l():
    w, x, _ = _sphere_weights(jax.random.key(3), 64)
    d_b = [float(jnp.mean(D.top_n_distances(w, x, n)[1])) for n in (8, 32, 48, 60, 63, 64)]
    assert all(a > b for a, b in zip(d_b, d_b[1:], strict=False))
    assert d_b[-1] == 0.0


@hypothesis.given(seed=st.integers(0, 2**31 - 1), n_top=st.sampled_from((1, 4, 16)))
def test_distinguishable_fraction_range(seed, n_top):
    w, x, _ = _sphere_weights(jax.random.key(seed), 16, batch=4)
    f = np.asarray(D.distinguishable_fraction(w, x, n_top))
    assert np.all((f >= 0) & (f <= 1))
    if n_top == 16:
        np.testing.assert_array_equal(f, 1.0)  # nothing left out
    if n_top == 1:  # the top token is distinguishable iff it is closer to s than every other
        w0, x0 = w[0], x[0]
        i = int(jnp.argmax(w0))
        dist = jnp.linalg.norm(w0[:, None] * x0 - (w0[i] * x0[i])[None, :], axis=-1)
        assert f[0] == float(jnp.all(jnp.delete(dist, i) > 0))


@pytest.mark.parametrize("n", [2, 7])
def test_corollary_3_sharp_bound_attained(n):
    # Two equal logits, the rest 40 T below (weight e^-40): ||J||_2 = 1/(2T) and |J_12| = 1/(4T),
    # each to within that weight: a looser sharp or entry bound fails here.
    for theta in (0.05, 0.5, 4.0):
        s = jnp.full((n,), -40.0 * theta, jnp.float64).at[:2].set(0.0)
        r = D.corollary_3(s, theta)
        tol = 4 * _scale_rtol(40.0, 1.0) + 1e-15 * n
        np.testing.assert_allclose(r.norm, r.sharp, rtol=tol)
        np.testing.assert_allclose(r.max_entry * 4 * theta, 1.0, rtol=tol)


def test_corollary_3_refuted():
    """Finding: Corollary 3 as published fails. Smallest counterexample: n = 2, equal logits."""
    for theta in (0.05, 0.1, 1 / (2 * math.sqrt(2)), 0.5, 1.0, 4.0):
        r = D.corollary_3(jnp.zeros((2,), jnp.float64), theta)
        np.testing.assert_allclose(r.norm, 1 / (2 * theta), rtol=1e-6)
        assert float(r.norm) > float(r.published)


@hypothesis.given(**logit_args, theta=temperatures)
def test_corollary_3_sharp_bound(seed, n, scale, ties, theta):
    s = _logits(seed, n, scale, ties)
    r = D.corollary_3(s, theta)
    tol = 1 + 4 * _scale_rtol(D.logit_spread(s), theta)
    assert np.all(r.norm <= r.sharp * tol)
    assert np.all(r.max_entry <= 1 / (4 * theta) * tol)


@hypothesis.given(**logit_args, theta=temperatures, eps=st.sampled_from((1e-3, 1e-1, 10.0)),
                  seed2=st.integers(0, 2**31 - 1))
def test_finite_difference_probe(seed, n, scale, ties, theta, eps, seed2):
    hypothesis.assume(n > 1)
    s = _logits(seed, n, scale, ties)
    r = D.finite_difference_probe(jax.random.key(seed2), s, theta, eps)
    tol = 1 + 4 * _scale_rtol(float(np.max(D.logit_spread(s))) + 2 * eps, theta)
    assert np.all(np.asarray(r.value) <= np.asarray(r.bound) * tol)


@pytest.mark.parametrize("theta", [0.1, 1.0])
def test_finite_difference_probe_tight(theta):
    # Two equal logits, u = (1, -1)/sqrt 2: ratio / (1/(2T)) = tanh(x)/x, x = eps/(sqrt 2 T) -> 1.
    for eps in (1e-3, 1e-1, 10.0):
        r = D.finite_difference_probe(None, jnp.zeros((1, 2), jnp.float64), theta, eps,
                                      direction=jnp.asarray([1.0, -1.0]))
        x = eps / (math.sqrt(2) * theta)
        np.testing.assert_allclose(r.value / r.bound, math.tanh(x) / x, rtol=1e-6)


def test_finite_difference_probe_exceeds_published_bound():
    r = D.finite_difference_probe(jax.random.key(0), jnp.zeros((1, 2)), 0.1, 1e-3)
    assert float(r.value[0]) > math.sqrt(2)  # Cor. 3's min{1/(4T), sqrt 2} = sqrt 2 at T = 0.1


def test_critical_n():
    w, x, _ = _sphere_weights(jax.random.key(5), 16, batch=64)
    c = D.critical_n(jax.random.key(6), w, x, (1, 4, 16))
    assert c.p_values[-1] == 1.0  # at N = L both sets are everything
    assert c.p_values[0] < 0.05  # the top-1 token is not a random one
    assert c.critical == D.stable_critical(c.n_values, c.p_values)


def test_stable_critical_ignores_a_crossing_that_is_undone():
    ns = (1, 5, 10, 20, 40)
    # The first N with p > 0.05 is 5, but N = 10 rejects again: the stable critical N is 20.
    assert D.stable_critical(ns, [1e-9, 0.2, 0.01, 0.3, 0.9]) == 20
    assert D.stable_critical(ns, [0.5, 0.2, 0.3, 0.3, 0.9]) == 1
    assert D.stable_critical(ns, [0.5, 0.2, 0.3, 0.3, 0.04]) is None
    assert D.stable_critical(ns, [0.5, 0.2, np.nan, 0.3, 0.9]) == 20  # NaN never passes


def test_softmax_jacobian_matches_closed_form():
    s = _logits(1, 7, 2.0, False)
    theta = 0.5
    p = D.weights_of_logits(s, variants.Softmax(theta))
    want = (jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]) / theta
    np.testing.assert_allclose(D.softmax_jacobian(s, theta), want, rtol=1e-6, atol=1e-12)


def test_transformer_disperses():
    res = D.transformer_dispersion(jax.random.key(0), (32, 256, 1024))
    n = res.lengths[:, None, None].astype(np.float64)
    assert np.all(np.isfinite(res.max_weight)) and np.all(np.isfinite(res.spread))
    assert np.all(res.spread <= res.delta_bound[None] * (1 + 1e-5))  # n-free logit bound
    e = np.exp(-res.spread.astype(np.float64))  # tight Lemma 2.1 per head at its own spread
    assert np.all(res.max_weight <= 1 / (1 + (n - 1) * e) * (1 + 1e-5))
    # n max p stays below e^(largest measured spread), a finite constant (~350 here), and the
    # weights fall as 1/n: the least-squares slope of log max p on log n is -1 within 0.1.
    assert np.all(n * res.max_weight <= np.exp(res.spread.max()) * (1 + 1e-5))
    assert abs(D.dispersion_slope(res) + 1) <= D.DISPERSION_SLOPE_TOL


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="temperature"):
        D.lemma_2_1(jnp.zeros((3,)), -1.0)
    with pytest.raises(TypeError, match="logits"):
        D.lemma_2_1(jnp.zeros((3,), jnp.int32), 1.0)
    with pytest.raises(ValueError, match="n_top"):
        D.top_n_mask(jnp.zeros((3,)), 4)
    with pytest.raises(ValueError, match="logits must lie"):
        D.lemma_1(jnp.asarray([3.0]), jnp.exp, 1.0)


@jax.jit
@chex.assert_max_traces(n=1)
def _lemma_jit(s, theta):
    return D.lemma_2_1(s, theta)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), theta=temperatures)
def test_dispersion_functions_jit_without_retracing(seed, theta):
    s = _logits(seed, 7, 3.0, False)
    got = _lemma_jit(s, jnp.asarray(theta))
    want = D.lemma_2_1(s, theta)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12)
