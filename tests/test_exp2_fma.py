"""``exp2`` on the FMA pipe (:func:`pallas_kernels.common.exp2_fma`) and the tile split.

Error model of ``exp2_fma`` in float32 (u = 2^-24, the unit roundoff):
* the reduction is exact: ``t - 1.5 * 2^23`` is the integer ``n = round(x)`` and ``x - n`` is a
  multiple of ``ulp(x)`` below 1 in size, so representable; the exponent assembly is exact;
* the polynomial, evaluated exactly with its float32 coefficients, is within ``POLY`` of
  ``2^f`` on ``[-1/2, 1/2]`` (relative; measured in float64 on a 2e6-point grid: 1.23e-7);
* Horner's rule ``p <- fl(fl(p f) + c_k)`` rounds twice a step, by at most ``u |p f|`` and
  ``u |p_k|``, and an error made ``k`` steps before the end reaches the result times ``|f|^k``;
  :func:`_rounding_bound` sums these (first order in ``u``) relative to ``2^f`` and takes the
  largest over ``[-1/2, 1/2]``: 1.19e-7, about ``2u``, so ``BOUND`` is 2.44e-7.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import EXP2_FMA_COEFFS, EXP2_FMA_MIN, exp2_fma, exp2_split

U = 2.0**-24
POLY = 1.25e-7


def _rounding_bound():
    f = np.linspace(-0.5, 0.5, 100_001)
    p, total = np.full_like(f, EXP2_FMA_COEFFS[-1]), np.zeros_like(f)
    for k in range(len(EXP2_FMA_COEFFS) - 2, -1, -1):
        prod = p * f
        p = prod + EXP2_FMA_COEFFS[k]
        total += (np.abs(prod) + np.abs(p)) * np.abs(f) ** k
    return float((U * total / np.exp2(f)).max())


BOUND = POLY + _rounding_bound()


def _rel_err(x):
    got = np.asarray(jax.jit(exp2_fma)(jnp.asarray(x, jnp.float32)), np.float64)
    return np.abs(got / np.exp2(np.asarray(x, np.float64)) - 1)


def test_polynomial_error_is_the_stated_one():
    f = np.linspace(-0.5, 0.5, 200_001)
    p = np.polynomial.polynomial.polyval(f, np.array(EXP2_FMA_COEFFS, np.float64))
    assert np.abs(p / np.exp2(f) - 1).max() <= POLY


def test_relative_error_over_the_range():
    """Over [-126, 20]: random points, the half-integers (where the rounding ties) and the
    integers (f = 0)."""
    x = jax.random.uniform(jax.random.key(0), (1 << 20,), jnp.float32, EXP2_FMA_MIN, 20.0)
    ties = np.arange(EXP2_FMA_MIN, 20.0, 0.5, dtype=np.float32)
    for pts in (np.asarray(x), ties, np.nextafter(ties, np.float32(0)),
                np.arange(-126, 21, dtype=np.float32)):
        assert _rel_err(pts).max() <= BOUND


def test_ends_of_the_range():
    """2^-126 is float32's least normal number: the result there is normal and positive."""
    y = np.asarray(jax.jit(exp2_fma)(jnp.array([EXP2_FMA_MIN, 0.0, 21.75], jnp.float32)))
    np.testing.assert_allclose(y, [2.0**-126, 1.0, 2.0**21.75], rtol=BOUND)


@pytest.mark.parametrize("cols", [0, 8, 24, 64])
def test_split_columns(cols):
    """The first ``cols`` columns clamped at EXP2_FMA_MIN and from the polynomial; the rest
    exactly jnp.exp2 of the untouched logits (masked logits -1e30 give 0 there), as XLA
    computes it (XLA's exp2 on CPU is not numpy's: they differ by up to 4e-6)."""
    d = -jnp.abs(jax.random.normal(jax.random.key(1), (16, 64), jnp.float32)) * 40
    d = d.at[:, ::5].set(-1e30)
    p, d2 = jax.jit(exp2_split, static_argnums=1)(d, cols)
    exp2 = np.asarray(jax.jit(jnp.exp2)(d))
    p, d2, d = np.asarray(p), np.asarray(d2), np.asarray(d)
    np.testing.assert_array_equal(p[:, cols:], exp2[:, cols:])
    np.testing.assert_array_equal(d2[:, cols:], d[:, cols:])
    np.testing.assert_array_equal(d2[:, :cols], np.maximum(d[:, :cols], EXP2_FMA_MIN))
    head = np.exp2(d2[:, :cols].astype(np.float64))
    assert (np.abs(p[:, :cols] / head - 1) <= BOUND).all()
    # a hidden key's weight in the polynomial columns is 2^-126, its entropy term 2^-126 * -126
    hidden = d[:, :cols] == -1e30
    np.testing.assert_allclose(p[:, :cols][hidden], 2.0**-126, rtol=BOUND)


def test_float32_only():
    with pytest.raises(TypeError, match="exp2_fma takes float32 x"):
        exp2_fma(jnp.zeros(3, jnp.float16))
