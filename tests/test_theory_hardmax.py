"""Property tests for theory.hardmax: the lambda -> infinity limit of softmax attention."""

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from theory import hardmax as hm
from theory import sample_complexity as sc

LENGTHS = (2, 7, 64)


def _logits(seed, n, scale, ties, rows=3):
    x = np.random.default_rng(seed).standard_normal((rows, n)) * scale
    return jnp.asarray(np.round(x) if ties else x, jnp.float64)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from(LENGTHS),
                  scale=st.floats(0.1, 10.0), ties=st.booleans(), lam=st.floats(0.01, 200.0))
def test_softmax_gap(seed, n, scale, ties, lam):
    r = hm.softmax_gap(_logits(seed, n, scale, ties), lam)
    # lambda is applied in float64 (scale=lam), so only float64 rounding separates the sides.
    assert np.all(np.asarray(r.value) >= np.asarray(r.lower) * (1 - 1e-9))
    assert np.all(np.asarray(r.value) <= np.asarray(r.upper) * (1 + 1e-9))


@hypothesis.given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from(LENGTHS),
                  lam_lo=st.floats(1.0, 50.0), width=st.floats(5.0, 100.0))
def test_lambda_slope(seed, n, lam_lo, width):
    s = _logits(seed, n, 1.0, False)
    (slope, want), tol = hm.lambda_slope(s, lam_lo, lam_lo + width)
    ok = np.isfinite(np.asarray(slope))  # e^(-lambda g) may underflow for wide gaps
    assert np.all(np.abs(np.asarray(slope - want))[ok] <= tol * (1 + 1e-9))


@hypothesis.given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from((4, 32)), lam=st.floats(0.1, 100.0))
def test_output_gap(seed, n, lam):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.standard_normal((2, n, 3)))
    x = jnp.asarray(rng.standard_normal((3, 3)))
    gap, bound = hm.output_gap(x, tokens, jnp.eye(3), lam)
    assert np.all(np.asarray(gap) <= np.asarray(bound) * (1 + 1e-9) + 1e-12)


def test_hardmax_output_picks_the_argmax():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.standard_normal((2, 16, 3)))
    x = jnp.asarray(rng.standard_normal((4, 3)))
    got = hm.hardmax_output(x, tokens, jnp.eye(3))
    idx = np.argmax(np.einsum("rnd,md->rmn", tokens, x), axis=-1)
    np.testing.assert_allclose(got, np.take_along_axis(np.asarray(tokens)[:, None], idx[..., None, None],
                                                       axis=2)[:, :, 0], rtol=1e-12)


def test_softmax_tends_to_hardmax_output():
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.standard_normal((1, 32, 3)))
    x = jnp.asarray(rng.standard_normal((2, 3)))
    gaps = [float(jnp.max(hm.output_gap(x, tokens, jnp.eye(3), lam).value)) for lam in (1, 10, 100)]
    assert gaps[0] > gaps[1] > gaps[2]


def test_hardmax_sphere_errors_limit():
    tokens = sc.sample_sphere(__import__("jax").random.key(0), (2, 4096), 3, 2.0, jnp.float64)
    x = jnp.asarray([[1.0, 0.0, 0.0]])
    err = hm.hardmax_sphere_errors(x, tokens, jnp.eye(3), 2.0)
    assert np.all(np.asarray(err) < 0.2)  # the best of 4096 directions is close to e_1


def test_predicted_hardmax_slope_and_bad_input():
    assert hm.predicted_hardmax_slope(3) == -0.5
    with pytest.raises(ValueError, match="lam"):
        hm.softmax_gap(jnp.zeros((3,)), 0.0)
    with pytest.raises(ValueError, match="logits"):
        hm.top_gap(jnp.zeros((1,)))
