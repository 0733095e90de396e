"""The ``lambda -> infinity`` limit of softmax attention (``A = lambda A0``): hardmax, and its rates.

Bohbot et al. (arXiv 2512.10656, ``docs/science.md`` 2.3): as the attention scale grows, softmax tends
to hardmax and the token-sample convergence slows down ("becomes logarithmic"). Two limits:

* in ``lambda`` at fixed tokens: ``softmax(lambda s) -> hardmax(s)`` exponentially, at the rate of
  the gap ``g`` between the two largest logits (exact two-sided bounds, :func:`softmax_gap`);
* in ``n`` at ``lambda = infinity``: for tokens uniform on the sphere of radius ``rho``, the
  hardmax output ``argmax_j <A0 x, y_j>`` tends to ``rho A0 x/||A0 x||``. Our derivation (not the
  sources'): the best of ``n`` uniform directions is at angle ``~ n^{-1/(d-1)}``, so the error
  decays like ``n^{-1/(d-1)}``; measured by :func:`hardmax_sphere_study`.

Softmax and hardmax weights come from :func:`jaxattn.attention` / :func:`jaxattn.attention_weights`
(variants ``Softmax`` at ``scale = lambda`` and ``Hardmax``).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from theory import sample_complexity as sc
from theory.dispersion import Sides, TwoSided

__all__ = [
    "top_gap",
    "softmax_gap",
    "lambda_slope",
    "hardmax_output",
    "output_gap",
    "hardmax_sphere_errors",
    "hardmax_sphere_study",
    "predicted_hardmax_slope",
    "scale_sweep",
]


def _rows(logits):
    x = jnp.asarray(logits)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1 or x.shape[-1] < 2:
        raise ValueError(f"logits must be a float array with >= 2 entries on the last axis, got "
                         f"{x.dtype} {x.shape}")
    return x.reshape(-1, x.shape[-1]).astype(jnp.promote_types(x.dtype, jnp.float32)), x.shape[:-1]


def top_gap(logits):
    """``g = s_(1) - s_(2)``, the gap between the two largest logits (0 on a tie)."""
    rows, lead = _rows(logits)
    top2, _ = jax.lax.top_k(rows, 2)
    return (top2[:, 0] - top2[:, 1]).reshape(lead)


def softmax_gap(logits, lam):
    """Mass off the argmax of ``softmax(lambda s)`` between exact bounds in the gap ``g``.

    .. math:: \\frac{e^{-\\lambda g}}{1 + e^{-\\lambda g}} \\le 1 - \\max_k p_k \\le
      \\frac{(n-1) e^{-\\lambda g}}{1 + (n-1) e^{-\\lambda g}}

    (``1 - p_max = S/(1+S)`` with ``e^{-lambda g} <= S = sum_{j != *} e^{-lambda (s_* - s_j)} <=
    (n-1) e^{-lambda g}``). The middle term is summed off the argmax (no cancellation); weights by
    :func:`jaxattn.attention_weights` at ``scale = lambda``. Checked by ``test_softmax_gap``.

    Returns:
      :class:`theory.dispersion.TwoSided`, each ``[...]``.
    """
    rows, lead = _rows(logits)
    if not float(lam) > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    B, n = rows.shape
    p = jaxattn.attention_weights(jnp.ones((B, 1, 1, 1), rows.dtype), rows[:, :, None, None],
                                  scale=lam)[:, 0, 0, :]
    star = jnp.argmax(rows, axis=-1)
    off = jnp.sum(jnp.where(jnp.arange(n)[None, :] == star[:, None], 0.0, p), axis=-1)
    e = jnp.exp(-lam * top_gap(rows))
    lower = e / (1 + e)
    upper = (n - 1) * e / (1 + (n - 1) * e)
    return TwoSided(lower.reshape(lead), off.reshape(lead), upper.reshape(lead))


def lambda_slope(logits, lam_lo, lam_hi):
    """Exponential rate in ``lambda``: the slope of ``log(1 - p_max)`` between two scales.

    From :func:`softmax_gap`, ``log(1 - p_max) in [-lambda g - log 2, log(n-1) - lambda g]``, so
    the slope is within ``(log(n-1) + log 2)/(lam_hi - lam_lo)`` of ``-g``. Checked by
    ``test_lambda_slope``.

    Returns:
      ``(Sides(slope, -g), tolerance)``.
    """
    rows, _ = _rows(logits)
    lo, hi = softmax_gap(rows, lam_lo).value, softmax_gap(rows, lam_hi).value
    slope = (jnp.log(hi) - jnp.log(lo)) / (lam_hi - lam_lo)
    tol = (math.log(max(rows.shape[-1] - 1, 1)) + math.log(2.0)) / (lam_hi - lam_lo)
    return Sides(slope, -top_gap(rows)), tol


def hardmax_output(x, tokens, a0, w_v=None):
    """``Gamma^infinity_{mu_n}(x) = W_v y_{j*}``, ``j* = argmax_j <A0 x, y_j>``, via jaxattn's Hardmax.

    Args:
      x: ``[M, d]``.
      tokens: ``[R, n, d]``.
      a0: ``[d, d]``.

    Returns:
      ``[R, M, dv]``.
    """
    q = jnp.einsum("ij,mj->mi", a0, x)
    R, M = tokens.shape[0], q.shape[0]
    v = tokens if w_v is None else jnp.einsum("rnd,ed->rne", tokens, w_v)
    query = jnp.broadcast_to(q[None, :, None, :], (R, M, 1, q.shape[-1]))
    out = jaxattn.attention(query, tokens[:, :, None, :], v[:, :, None, :], variant="hardmax",
                            scale=1.0, implementation="xla")
    return out[:, :, 0, :]


def output_gap(x, tokens, a0, lam, w_v=None):
    """``||Gamma^lambda_{mu_n}(x) - Gamma^inf_{mu_n}(x)|| <= (1 - p_max) max_j ||v_j - v_*||``.

    ``Gamma^lambda - v_* = sum_{j != *} p_j (v_j - v_*)``. Checked by ``test_output_gap``.

    Args:
      x: ``[M, d]``; tokens ``[R, n, d]``; a0 ``[d, d]``; lam ``> 0``.

    Returns:
      :class:`theory.dispersion.Sides` ``([R, M], [R, M])``.
    """
    hard = hardmax_output(x, tokens, a0, w_v)
    soft = sc.gamma_empirical(x, tokens, lam * a0, w_v)
    logits = jnp.einsum("rnd,md->rmn", tokens, jnp.einsum("ij,mj->mi", a0, x))
    off = softmax_gap(logits, lam).value
    v = tokens if w_v is None else jnp.einsum("rnd,ed->rne", tokens, w_v)
    spread = jnp.linalg.norm(v[:, None, :, :] - hard[:, :, None, :], axis=-1)  # [R, M, n]
    return Sides(jnp.linalg.norm(soft - hard, axis=-1), off * jnp.max(spread, axis=-1))


@jax.jit
def hardmax_sphere_errors(x, tokens, a0, radius):
    """``||Gamma^inf_{mu_n}(x) - rho A0 x/||A0 x||||`` for sphere tokens: ``[R]`` (max over ``x``)."""
    u = jnp.einsum("ij,mj->mi", a0, x)
    limit = radius * u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    hard = hardmax_output(x, tokens, a0)
    return jnp.max(jnp.linalg.norm(hard - limit[None], axis=-1), axis=-1)


def predicted_hardmax_slope(d: int) -> float:
    """Our derived rate ``-1/(d-1)`` for the hardmax error in ``n`` (sphere tokens in ``R^d``)."""
    return -1.0 / (d - 1)


def hardmax_sphere_study(key, d, radius, ns, replicates, probes=4, dtype=jnp.float64):
    """Hardmax (``lambda = infinity``) error against ``n`` for sphere tokens, with its slope fit."""
    a0 = jnp.eye(d, dtype=dtype)
    x = sc.sphere_directions(jax.random.fold_in(key, 10_000), probes, d, 1.0, dtype)
    return sc.error_vs_n(key, ns, replicates,
                         lambda k, shape: sc.sample_sphere(k, shape, d, radius, dtype),
                         lambda t: hardmax_sphere_errors(x, t, a0, radius))


class ScaleSweep(NamedTuple):
    """Slopes of the Gaussian-token pointwise error against ``n`` for growing attention scale."""

    scales: np.ndarray
    horizons: np.ndarray
    slopes: np.ndarray
    slope_ses: np.ndarray
    studies: tuple


def scale_sweep(key, d, sigma2, scales, query_radius, ns, replicates, probes=8,
                dtype=jnp.float64) -> ScaleSweep:
    """Softmax attention at ``A = lambda A0`` on Gaussian tokens: error vs ``n`` for each ``lambda``.

    At small ``lambda`` the slope is ``-1/2``; as ``lambda`` grows the error's decay in ``n`` slows
    (the sources: "convergence becomes logarithmic"): the slowdown (slopes rising with ``lambda``)
    is asserted by ``theory.check.row_scale_sweep``; the logarithmic limit is not.
    """
    studies, horizons = [], []
    for j, lam in enumerate(scales):
        setup = sc.GaussianSetup(d, sigma2, float(lam))
        horizons.append(setup.horizon())
        studies.append(sc.gaussian_sup_study(jax.random.fold_in(key, j), setup, query_radius, ns,
                                             replicates, probes, dtype))
    return ScaleSweep(np.asarray(scales, np.float64), np.asarray(horizons),
                      np.asarray([s.fit.slope for s in studies]),
                      np.asarray([s.fit.slope_se for s in studies]), tuple(studies))


__all__ += ["ScaleSweep"]
