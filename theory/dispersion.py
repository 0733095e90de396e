"""Dispersion of softmax-type attention and the limits of normalisation: both sides of each claim.

Claims of ``docs/science.md`` sections 2.1 (Velickovic et al., "softmax is not enough", arXiv 2410.01104)
and 2.2 (Mudarisov et al., "Limitations of normalization in attention", arXiv 2508.17821). Each
function takes logits, weights or matrices and returns the two sides of a statement (a
:class:`Sides` or :class:`TwoSided`), so a test or :mod:`theory.check` compares them. Attention
weights always come from :func:`jaxattn.attention_weights` (the reference implementation): a row of
logits ``s`` of length ``n`` is fed as one query ``q = [1]`` against keys ``k_j = [s_j]`` at
``scale = 1``, so the variant sees exactly the logits ``s``.

Functions work in the dtype of their inputs (float32 unless the caller passes float64 with x64 on).
"""

import math
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import variants

__all__ = [
    "Sides",
    "TwoSided",
    "logit_spread",
    "weights_of_logits",
    "entropy_of_logits",
    "lemma_2_1",
    "tight_max_bound",
    "extremal_logits",
    "two_level_logits",
    "Tightness",
    "lemma_2_1_extremal",
    "entropy_floor_gap",
    "entropy_floor",
    "entropy_temperature_derivative",
    "proposition_3_1",
    "proposition_3_1_extremal",
    "adaptive_entropy",
    "adaptive_argmax",
    "adaptive_argmax_weight",
    "adaptive_beta",
    "adaptive_beta_sup",
    "adaptive_dispersion",
    "adaptive_dispersion_extremal",
    "PAPER_ADAPTIVE_THRESHOLD",
    "adaptive_band",
    "adaptive_logits_at_entropy",
    "applied_beta",
    "ssmax_top_weight",
    "ssmax_limit",
    "rbf_dispersion",
    "rbf_extremal",
    "rbf_origin_sink",
    "lemma_1",
    "lemma_1_extremal",
    "corollary_1",
    "corollary_1_extremal",
    "top_n_mask",
    "top_n_context",
    "top_n_distances",
    "subset_distances",
    "random_subset_mask",
    "CriticalN",
    "critical_n",
    "stable_critical",
    "finite_difference_probe",
    "distinguishable_fraction",
    "random_subset_exclusion_exact",
    "random_subset_exclusion_counts",
    "random_subset_exclusion_mc",
    "softmax_jacobian",
    "Corollary3",
    "corollary_3",
    "TinyTransformer",
    "tiny_transformer",
    "transformer_delta_bound",
    "StackDispersion",
    "transformer_dispersion",
    "DISPERSION_SLOPE_TOL",
    "dispersion_slope",
]


class Sides(NamedTuple):
    """The two sides of ``value <= bound`` (or of an identity ``value == bound``)."""

    value: jax.Array
    bound: jax.Array


class TwoSided(NamedTuple):
    """The three members of ``lower <= value <= upper``."""

    lower: jax.Array
    value: jax.Array
    upper: jax.Array


def _float_rows(logits, name="logits"):
    """Returns ``(rows [B, n], leading shape)`` in float32 or wider; raises on bad input."""
    x = jnp.asarray(logits)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty last axis, got shape {x.shape}")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return x.reshape(-1, x.shape[-1]).astype(dtype), x.shape[:-1]


def _check_temperature(temperature):
    t = jnp.asarray(temperature)
    if not isinstance(t, jax.core.Tracer) and not bool(jnp.all(t > 0)):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def logit_spread(logits):
    """``delta = max_k s_k - min_k s_k`` over the last axis."""
    rows, lead = _float_rows(logits)
    return (jnp.max(rows, axis=-1) - jnp.min(rows, axis=-1)).reshape(lead)


@jax.jit
def _attend_rows(rows, variant):
    """Weights ``[B, n]`` and stats ``[B]`` of a variant on rows ``[B, n]`` (jitted once per shape;
    the variant's numeric hyper-parameters are traced pytree leaves)."""
    B = rows.shape[0]
    q = jnp.ones((B, 1, 1, 1), rows.dtype)
    k = rows[:, :, None, None]
    w, stats = jaxattn.attention_weights(q, k, variant=variant, scale=1.0, return_stats=True)
    return w[:, 0, 0, :], jax.tree.map(lambda a: a[:, 0, 0], stats)


def _attend(logits, variant):
    """Weights ``[..., n]`` and stats ``[...]`` of a variant on rows of logits, via jaxattn."""
    rows, lead = _float_rows(logits)
    w, stats = _attend_rows(rows, variants.get_variant(variant))
    return w.reshape(*lead, rows.shape[-1]), jax.tree.map(lambda a: a.reshape(lead), stats)


def weights_of_logits(logits, variant="softmax"):
    """Attention weights of a variant for rows of logits ``[..., n]``, through jaxattn.

    .. math:: p = \\text{normalise}_{\\text{variant}}(s) \\quad (q = [1], k_j = [s_j], \\text{scale} = 1)

    Args:
      logits: float ``[..., n]``.
      variant: a jaxattn variant name or spec (e.g. ``variants.Softmax(0.5)``).

    Returns:
      Weights ``[..., n]``.
    """
    return _attend(logits, variants.get_variant(variant))[0]


def entropy_of_logits(logits, variant="softmax"):
    """Shannon entropy (nats) of a variant's weights, as reported by jaxattn's stats."""
    return _attend(logits, variants.get_variant(variant))[1].entropy


def lemma_2_1(logits, temperature=1.0):
    """Lemma 2.1 (Velickovic et al.): every weight is within ``e^{+-delta/theta}/n``.

    .. math:: \\frac{e^{-\\delta/\\theta}}{n} \\le p_k \\le \\frac{e^{\\delta/\\theta}}{n},
      \\qquad \\delta = \\max_k s_k - \\min_k s_k

    Checked by ``tests/test_theory_dispersion.py::test_lemma_2_1``.

    Args:
      logits: float ``[..., n]``.
      temperature: ``theta > 0`` (scalar).

    Returns:
      :class:`TwoSided` with ``lower, upper`` of shape ``[..., 1]`` and ``value`` the weights.

    References:
      Velickovic et al. 2025, https://arxiv.org/abs/2410.01104
    """
    _check_temperature(temperature)
    p = weights_of_logits(logits, variants.Softmax(temperature))
    n = p.shape[-1]
    ratio = logit_spread(logits)[..., None] / temperature
    return TwoSided(jnp.exp(-ratio) / n, p, jnp.exp(ratio) / n)


def tight_max_bound(logits, temperature=1.0):
    """The tight form of Lemma 2.1's upper side for the largest weight.

    .. math:: \\max_k p_k \\le \\frac{e^{\\delta/\\theta}}{e^{\\delta/\\theta} + n - 1}

    with equality for one logit at ``M`` and ``n - 1`` at ``m`` (:func:`extremal_logits`).
    Checked by ``test_tight_max_bound`` and ``test_tight_max_bound_equality``.

    Returns:
      :class:`Sides` ``(max_k p_k, bound)``, each ``[...]``.
    """
    _check_temperature(temperature)
    p = weights_of_logits(logits, variants.Softmax(temperature))
    n = p.shape[-1]
    e = jnp.exp(-logit_spread(logits) / temperature)  # e^(d/t)/(e^(d/t)+n-1), without overflow
    return Sides(jnp.max(p, axis=-1), 1.0 / (1.0 + (n - 1) * e))


def extremal_logits(n: int, delta, dtype=jnp.float32):
    """Logits with one entry at ``delta`` and ``n - 1`` at 0: the equality case of the max bound."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return jnp.zeros((n,), dtype).at[0].set(jnp.asarray(delta, dtype))


def two_level_logits(n: int, k: int, delta, dtype=jnp.float32):
    """Logits with ``k`` entries at ``delta`` and ``n - k`` at 0 (``k = 1``: :func:`extremal_logits`)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, n] = [0, {n}], got {k!r}")
    return extremal_logits(n, 0.0, dtype).at[:k].set(jnp.asarray(delta, dtype))


class Tightness(NamedTuple):
    """How close a bound comes on its extremal inputs: measured ratios and their closed forms.

    ``ratio`` and ``closed`` are ``[2]``: the upper side's ``max p / upper`` and the lower side's
    ``lower / min p``, each ``<= 1`` where the bound holds; the closer to 1, the tighter.
    """

    ratio: jax.Array
    closed: jax.Array


def _ratios(two_sided_hi, two_sided_lo):
    """``(max p / upper, lower / min p)`` of two :class:`TwoSided` results on extremal rows."""
    hi = jnp.max(two_sided_hi.value) / jnp.max(two_sided_hi.upper)
    lo = jnp.min(two_sided_lo.lower) / jnp.min(two_sided_lo.value)
    return jnp.stack([hi, lo])


def _one_sided_closed(n, r):
    """Closed forms ``n/(e^r + n - 1)`` and ``(e^-r + n - 1)/n`` of the two extremal ratios."""
    r = np.float64(r)
    return np.asarray([n / (np.exp(r) + n - 1), (np.exp(-r) + n - 1) / n])


def lemma_2_1_extremal(n: int, delta, temperature=1.0, dtype=jnp.float64):
    """Lemma 2.1 on the inputs its proof points to: how close each side comes.

    Upper side: one logit at ``M`` and ``n - 1`` at ``m`` give
    ``max p / (e^{r}/n) = n/(e^r + n - 1)``; lower side: one logit at ``m`` and ``n - 1`` at ``M``
    give ``(e^{-r}/n) / min p = (e^{-r} + n - 1)/n``, with ``r = delta/theta``. Both tend to 1 as
    ``n`` grows with ``r`` fixed, so no bound ``c e^{r}/n`` with ``c < 1`` (or exponent below
    ``r``) holds for every ``n``. Checked by ``test_lemma_2_1_tight``.

    Returns:
      :class:`Tightness` (ratios from :func:`lemma_2_1`'s own bounds and jaxattn's weights).
    """
    top = extremal_logits(n, delta, dtype)
    ratio = _ratios(lemma_2_1(top, temperature), lemma_2_1(-top, temperature))
    return Tightness(ratio, _one_sided_closed(n, float(delta) / float(temperature)))


def entropy_floor(logits, temperature=1.0):
    """Entropy floor (Velickovic et al., section 2): ``H(p) >= log n - delta/theta``.

    Follows from Lemma 2.1: ``-log p_k >= log n - delta/theta`` for every k. Checked by
    ``test_entropy_floor``.

    Returns:
      :class:`Sides` ``(floor, H(p))``: the claim is ``value <= bound``, i.e. floor <= entropy.
    """
    _check_temperature(temperature)
    rows, _ = _float_rows(logits)
    h = entropy_of_logits(logits, variants.Softmax(temperature))
    floor = math.log(rows.shape[-1]) - logit_spread(logits) / temperature
    return Sides(floor, h)


def entropy_floor_gap(n: int, k: int, delta, temperature=1.0, dtype=jnp.float64):
    """``H - floor`` of :func:`entropy_floor` on ``k`` logits at ``delta``, ``n - k`` at 0, and its
    closed form.

    With ``r = delta/theta``, ``f = k/n`` and ``z = f e^r + 1 - f``:
    ``H - (log n - r) = r (1 - f)/z + log z``. It is 0 at ``r = 0`` (uniform weights: the floor is
    attained), and with ``k = ceil(r e^{-r} n)`` it is below ``1 + log(1 + r)``, a vanishing
    fraction of ``r``: no floor ``log n - c r`` with ``c < 1`` holds for all ``n, r``. Checked by
    ``test_entropy_floor_tight``.

    Returns:
      :class:`Sides` ``(H - floor by jaxattn, closed form)``.
    """
    floor, h = entropy_floor(two_level_logits(n, k, delta, dtype), temperature)
    r, f = float(delta) / float(temperature), k / n
    z = f * math.exp(r) + 1 - f
    return Sides(h - floor, r * (1 - f) / z + math.log(z))


def entropy_temperature_derivative(logits, temperature=1.0):
    """Temperature monotonicity: ``dH/dtheta = Var_p(s) / theta^3 >= 0``.

    .. math:: \\frac{\\partial H(\\text{softmax}(s/\\theta))}{\\partial \\theta}
      = \\frac{\\mathrm{Var}_p(s)}{\\theta^3}

    The left side is forward-mode autodiff through jaxattn's reference (the temperature is a
    traced leaf of :class:`jaxattn.variants.Softmax`). Checked by ``test_entropy_derivative``.

    Returns:
      :class:`Sides` ``(dH/dtheta by autodiff, Var_p(s)/theta^3)``, each ``[...]``.
    """
    _check_temperature(temperature)
    rows, lead = _float_rows(logits)
    theta = jnp.asarray(temperature, rows.dtype)

    def entropy(t):
        return entropy_of_logits(rows, variants.Softmax(t))

    _, dh = jax.jvp(entropy, (theta,), (jnp.ones_like(theta),))
    p = weights_of_logits(rows, variants.Softmax(theta))
    mean = jnp.sum(p * rows, axis=-1, keepdims=True)
    var = jnp.sum(p * (rows - mean) ** 2, axis=-1)
    return Sides(dh.reshape(lead), (var / theta**3).reshape(lead))


def proposition_3_1(q_matrix, k_matrix, y, xs):
    """Proposition 3.1: bounded inputs and weights give bounded logit spread.

    .. math:: e_i = (Q y) \\cdot (K x_i), \\qquad
      \\delta \\le 2 \\sigma_{\\max}(Q) \\sigma_{\\max}(K) \\|y\\| \\max_i \\|x_i\\|

    Checked by ``test_proposition_3_1``.

    Args:
      q_matrix: ``Q`` ``[h, d]``.
      k_matrix: ``K`` ``[h, d]``.
      y: the query input ``[d]``.
      xs: the key inputs ``[n, d]``.

    Returns:
      :class:`Sides` ``(delta, bound)``.
    """
    q_matrix, k_matrix, y, xs = (jnp.asarray(a) for a in (q_matrix, k_matrix, y, xs))
    if q_matrix.ndim != 2 or k_matrix.shape != q_matrix.shape:
        raise ValueError(f"q_matrix and k_matrix must be [h, d] of one shape, got {q_matrix.shape} "
                         f"and {k_matrix.shape}")
    if y.shape != (q_matrix.shape[1],) or xs.ndim != 2 or xs.shape[1] != q_matrix.shape[1]:
        raise ValueError(f"y must be [d] and xs [n, d] with d = {q_matrix.shape[1]}, got {y.shape} "
                         f"and {xs.shape}")
    e = jnp.einsum("hd,nd->nh", k_matrix, xs) @ (q_matrix @ y)
    delta = jnp.max(e) - jnp.min(e)
    sq = jnp.linalg.norm(q_matrix, ord=2)
    sk = jnp.linalg.norm(k_matrix, ord=2)
    bound = 2 * sq * sk * jnp.linalg.norm(y) * jnp.max(jnp.linalg.norm(xs, axis=-1))
    return Sides(delta, bound)


def proposition_3_1_extremal(q_matrix, k_matrix, y_norm, radius, n: int = 2):
    """Inputs on which Proposition 3.1's bound is an equality.

    ``K' = U_Q S_K V_K^T`` (``K``'s singular values and right vectors, ``Q``'s left vectors), so
    ``Q v_Q1`` and ``K' v_K1`` are both along ``u_Q1``; ``y = ||y|| v_Q1`` and keys
    ``x = +-R v_K1`` give logits ``+-sigma(Q) sigma(K) ||y|| R``: ``delta`` equals the bound.
    Checked by ``test_proposition_3_1_attained``.

    Returns:
      ``(Q, K', y, xs [n, d])`` for :func:`proposition_3_1`.
    """
    q_matrix, k_matrix = jnp.asarray(q_matrix), jnp.asarray(k_matrix)
    uq, _, vq = jnp.linalg.svd(q_matrix, full_matrices=False)
    _, sk, vk = jnp.linalg.svd(k_matrix, full_matrices=False)
    k_aligned = (uq * sk[None, :]) @ vk
    y = y_norm * vq[0]
    signs = jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0).astype(q_matrix.dtype)
    return q_matrix, k_aligned, y, radius * signs[:, None] * vk[0][None, :]


# --- adaptive temperature -------------------------------------------------------------------


def adaptive_entropy(logits, variant=None):
    """Adaptive temperature never raises entropy: ``H(softmax(beta s)) <= H(softmax(s))``.

    Holds because ``beta >= 1`` and entropy falls as the inverse temperature rises
    (:func:`entropy_temperature_derivative`). Checked by ``test_adaptive_never_raises_entropy``.

    Args:
      logits: float ``[..., n]``.
      variant: an :class:`jaxattn.variants.AdaptiveTemperature` (default: the paper's).

    Returns:
      :class:`Sides` ``(entropy with adaptive temperature, entropy of plain softmax)``.
    """
    variant = variants.AdaptiveTemperature() if variant is None else variant
    return Sides(entropy_of_logits(logits, variant), entropy_of_logits(logits, "softmax"))


def adaptive_argmax(logits, variant=None):
    """Adaptive temperature keeps the argmax: ``argmax softmax(beta s) = argmax s``.

    Compares first indices, so a row whose weights tie exactly where its logits do not differs
    here without breaking the claim; :func:`adaptive_argmax_weight` is the tie-aware check.

    Returns:
      :class:`Sides` ``(argmax of adaptive weights, argmax of the logits)`` (int arrays).
    """
    variant = variants.AdaptiveTemperature() if variant is None else variant
    rows, lead = _float_rows(logits)
    p = weights_of_logits(rows, variant)
    return Sides(jnp.argmax(p, axis=-1).reshape(lead), jnp.argmax(rows, axis=-1).reshape(lead))


def adaptive_argmax_weight(logits, variant=None):
    """The adaptive weight at the logits' argmax, and the largest adaptive weight.

    The claim of :func:`adaptive_argmax` in a form that allows ties: equal weights are the same
    maximum, so where weights tie exactly (logits equal, or closer than the weights' rounding)
    any tied index is a valid argmax, and comparing indices would call such a row a mismatch.
    The argmax is kept iff ``value == bound`` in every row. Checked by
    ``test_adaptive_keeps_argmax``.

    Returns:
      :class:`Sides` ``(p at argmax s, max_k p_k)``, each ``[...]``.
    """
    variant = variants.AdaptiveTemperature() if variant is None else variant
    rows, lead = _float_rows(logits)
    p = weights_of_logits(rows, variant)
    at_top = jnp.take_along_axis(p, jnp.argmax(rows, axis=-1)[:, None], axis=-1)[:, 0]
    return Sides(at_top.reshape(lead), jnp.max(p, axis=-1).reshape(lead))


def adaptive_beta(logits, variant=None):
    """The inverse temperature ``beta(H)`` that jaxattn's adaptive variant applies to each row.

    ``H`` is the paper's entropy ``-sum p log(p + eps)`` of ``softmax(s)``.
    """
    variant = variants.AdaptiveTemperature() if variant is None else variant
    rows, lead = _float_rows(logits)
    p = weights_of_logits(rows, "softmax")
    h = -jnp.sum(p * jnp.log(p + variant.entropy_eps), axis=-1)
    return variant.beta(h).reshape(lead)


def adaptive_beta_sup(variant=None):
    """``sup_H beta(H)``, where it is reached, and the entropy above which ``beta = 1`` again.

    The paper's quartic has a negative leading coefficient, so ``beta = max(1, poly(H))`` is
    bounded: the sup is the largest value of ``poly`` at a real critical point above the
    threshold. Computed on the host in float64 from the polynomial's roots. Checked by
    ``test_adaptive_beta_bounded``.

    Returns:
      ``(beta_sup, h_at_sup, h_inactive)``: ``beta(H) = 1`` for every ``H > h_inactive``.
    """
    variant = variants.AdaptiveTemperature() if variant is None else variant
    coeffs = np.asarray(variant.coeffs, np.float64)
    if coeffs.size < 2 or coeffs[0] >= 0 or (coeffs.size - 1) % 2:
        raise ValueError("adaptive_beta_sup needs an even-degree polynomial with a negative "
                         f"leading coefficient (bounded beta), got coeffs {tuple(coeffs)}")
    crit = np.roots(np.polyder(coeffs))
    crit = np.sort(crit[np.abs(crit.imag) < 1e-12].real)
    crit = crit[crit > variant.threshold]
    candidates = np.concatenate([[variant.threshold], crit])
    values = np.maximum(1.0, np.polyval(coeffs, candidates))
    i = int(np.argmax(values))
    ones = np.roots(np.polysub(coeffs, [1.0]))
    ones = ones[np.abs(ones.imag) < 1e-12].real
    h_inactive = float(max(np.max(ones, initial=-np.inf), variant.threshold))
    return float(values[i]), float(candidates[i]), h_inactive


def adaptive_dispersion(logits, variant=None):
    """Bounded ``beta`` only delays dispersion: ``e^{-b delta}/n <= p_k <= e^{b delta}/n``.

    ``b = sup beta`` from :func:`adaptive_beta_sup`: adaptive temperature is softmax at inverse
    temperature ``beta <= b``, so Lemma 2.1 applies with ``theta = 1/b``. Checked by
    ``test_adaptive_still_disperses``.

    Returns:
      :class:`TwoSided` (bounds ``[..., 1]``, adaptive weights ``[..., n]``).
    """
    variant = variants.AdaptiveTemperature() if variant is None else variant
    b = adaptive_beta_sup(variant)[0]
    p = weights_of_logits(logits, variant)
    n = p.shape[-1]
    spread = b * logit_spread(logits)[..., None]
    return TwoSided(jnp.exp(-spread) / n, p, jnp.exp(spread) / n)


def _entropy_eps_of(p, eps):
    return -np.sum(p * np.log(p + eps))


def adaptive_logits_at_entropy(n: int, target, low: bool = False, variant=None):
    """One logit ``delta`` above (``low``: below) ``n - 1`` zeros, with ``delta`` chosen so that the
    paper's entropy ``-sum p log(p + eps)`` of plain softmax is ``target`` (bisection in float64
    on the host; the entropy falls in ``delta``).

    Returns:
      ``(logits [n] float64, delta)``. Raises if ``target`` is out of the family's range.
    """
    variant = variants.AdaptiveTemperature() if variant is None else variant

    def entropy(d):
        s = np.zeros(n)
        s[0] = -d if low else d
        p = np.exp(s - s.max())
        return _entropy_eps_of(p / p.sum(), variant.entropy_eps)

    lo, hi = 0.0, 700.0
    if not entropy(hi) < target < entropy(lo):
        raise ValueError(f"entropy {target} is outside ({entropy(hi)}, {entropy(lo)}) for n = {n}")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if entropy(mid) > target else (lo, mid)
    delta = 0.5 * (lo + hi)
    return extremal_logits(n, -delta if low else delta, jnp.float64), delta


def adaptive_dispersion_extremal(n: int = 83, variant=None):
    """:func:`adaptive_dispersion` on the inputs that come closest to it.

    The bound uses ``b = sup beta``, so it is approached only by rows whose entropy is ``h_sup``
    (where ``beta = b``): one logit ``delta`` above (below) ``n - 1`` zeros with ``delta`` set so
    that ``H = h_sup`` (:func:`adaptive_logits_at_entropy`). The ratios are then Lemma 2.1's,
    ``n/(e^{b delta} + n - 1)`` and ``(e^{-b delta} + n - 1)/n``. ``n = 83`` is the smallest
    ``n`` with ``log n > h_sup`` and gives the largest upper ratio (about 0.934; 0.41 at n = 90).
    Checked by ``test_adaptive_still_disperses_tight``.

    Returns:
      ``(Tightness, (delta_upper, delta_lower))``.
    """
    variant = variants.AdaptiveTemperature() if variant is None else variant
    b, h_sup, _ = adaptive_beta_sup(variant)
    top, d_hi = adaptive_logits_at_entropy(n, h_sup, False, variant)
    bottom, d_lo = adaptive_logits_at_entropy(n, h_sup, True, variant)
    ratio = _ratios(adaptive_dispersion(top, variant), adaptive_dispersion(bottom, variant))
    closed = np.asarray([n / (np.exp(b * d_hi) + n - 1), (np.exp(-b * d_lo) + n - 1) / n])
    return Tightness(ratio, closed), (d_hi, d_lo)


# The paper's rule (Velickovic et al., docs/science.md section 1): beta adapts only where H > 0.5 nats.
# Kept apart from jaxattn's default so that a changed default shows up as a disagreement.
PAPER_ADAPTIVE_THRESHOLD = 0.5


def adaptive_band(coeffs=None, threshold=PAPER_ADAPTIVE_THRESHOLD):
    """The entropy interval ``(h_low, h_high)`` where ``beta(H) = max(1, poly(H)) > 1``.

    ``beta > 1`` needs ``H > threshold`` and ``poly(H) > 1``; the ends are the real roots of
    ``poly = 1`` (float64, on the host) clipped to the threshold. For the paper's polynomial
    ``poly(0.5) = 0.150 < 1``, so the lower edge is the root ``0.8486`` and the 0.5 threshold
    changes nothing; the upper edge is ``5.9445``. Raises unless the set is one interval.
    """
    coeffs = np.asarray(variants.AdaptiveTemperature().coeffs if coeffs is None else coeffs,
                        np.float64)
    roots = np.roots(np.polysub(coeffs, [1.0]))
    roots = np.sort(roots[np.abs(roots.imag) < 1e-12].real)
    edges = np.concatenate([[threshold], roots[roots > threshold], [np.inf]])
    mids = 0.5 * (edges[:-1] + edges[1:])
    mids[-1] = edges[-2] + 1.0
    inside = np.polyval(coeffs, mids) > 1
    if inside.sum() != 1:
        raise ValueError(f"beta > 1 on {int(inside.sum())} intervals; adaptive_band needs one")
    i = int(np.argmax(inside))
    return float(edges[i]), float(edges[i + 1])


def applied_beta(logits, variant=None):
    """The inverse temperature jaxattn's adaptive variant actually applied to each row.

    Read off its weights: ``beta = (log p_i - log p_j)/(s_i - s_j)`` for the largest and smallest
    logit (rows need distinct logits). Independent of :meth:`AdaptiveTemperature.beta`.
    """
    variant = variants.AdaptiveTemperature() if variant is None else variant
    rows, lead = _float_rows(logits)
    p = weights_of_logits(rows, variant)
    hi, lo = jnp.argmax(rows, axis=-1)[:, None], jnp.argmin(rows, axis=-1)[:, None]
    logp = jnp.log(p)
    num = jnp.take_along_axis(logp, hi, -1) - jnp.take_along_axis(logp, lo, -1)
    den = jnp.take_along_axis(rows, hi, -1) - jnp.take_along_axis(rows, lo, -1)
    return (num / den)[:, 0].reshape(lead)


# --- scalable softmax, RBF ------------------------------------------------------------------


def ssmax_top_weight(n: int, delta, s=0.43, dtype=jnp.float32, padding: int = 0):
    """SSMax: one logit ``Delta`` above ``n - 1`` equal ones gets ``1/(1 + (n-1) n^{-s Delta})``.

    Left side through :class:`jaxattn.variants.ScalableSoftmax`, with ``padding`` further keys
    (logit 0, like the ``n - 1``) hidden by ``key_value_seq_lengths = n``: SSMax's ``n`` is the
    number of *visible* keys, so the closed form keeps ``n``. Checked by ``test_ssmax_top_weight``
    and ``test_ssmax_counts_visible_keys``.

    Returns:
      :class:`Sides` ``(weight of the top logit by jaxattn, closed form)``.
    """
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    logits = extremal_logits(n + padding, delta, dtype)
    w = _visible_weights(logits, jnp.asarray([n], jnp.int32), variants.ScalableSoftmax(s))
    closed = 1.0 / (1.0 + (n - 1) * jnp.asarray(n, dtype) ** (-s * jnp.asarray(delta, dtype)))
    return Sides(w[0], closed)


@jax.jit
def _visible_weights(logits, lengths, variant):
    """Weights ``[S]`` of one row of logits ``[S]`` of which the first ``lengths[0]`` keys are
    visible (``key_value_seq_lengths``)."""
    q = jnp.ones((1, 1, 1, 1), logits.dtype)
    return jaxattn.attention_weights(q, logits[None, :, None, None], scale=1.0, variant=variant,
                                     key_value_seq_lengths=lengths)[0, 0, 0]


def ssmax_limit(s, delta):
    """``lim_{n -> inf} 1/(1 + (n-1) n^{-s Delta})``: 1 if ``s Delta > 1``, 1/2 if ``= 1``, else 0."""
    x = float(s) * float(delta)
    return 1.0 if x > 1 else (0.5 if x == 1 else 0.0)


@jax.jit
def _rbf_weights(query, keys, gamma, registers=None):
    """RBF weights ``[n]`` (or ``[R + n]``) of one query ``[d]`` over keys ``[n, d]``."""
    q = query[None, None, None, :]
    k = keys[None, :, None, :]
    w = jaxattn.attention_weights(q, k, variant=variants.RBF(gamma), registers=registers)
    return w[0, 0, 0]


def rbf_dispersion(query, keys, gamma):
    """RBF attention with ``||q||, ||k_j|| <= R`` disperses: ``delta <= 4 gamma R^2``.

    .. math:: s_j = -\\gamma \\|q - k_j\\|^2 \\in [-4\\gamma R^2, 0], \\qquad
      \\frac{e^{-4\\gamma R^2}}{n} \\le p_j \\le \\frac{e^{4\\gamma R^2}}{n}

    Weights through :class:`jaxattn.variants.RBF`; checked by ``test_rbf_dispersion``.

    Args:
      query: ``[d]``.
      keys: ``[n, d]``.
      gamma: ``> 0``.

    Returns:
      ``(Sides(delta, 4 gamma R^2), TwoSided(lower, weights, upper))``.
    """
    query, keys = jnp.asarray(query), jnp.asarray(keys)
    if query.ndim != 1 or keys.ndim != 2 or keys.shape[1] != query.shape[0]:
        raise ValueError(f"query must be [d] and keys [n, d], got {query.shape} and {keys.shape}")
    radius = jnp.maximum(jnp.linalg.norm(query), jnp.max(jnp.linalg.norm(keys, axis=-1)))
    logits = -gamma * jnp.sum((keys - query[None, :]) ** 2, axis=-1)
    delta_bound = 4 * gamma * radius**2
    p = _rbf_weights(query, keys, gamma)
    n = keys.shape[0]
    return (Sides(jnp.max(logits) - jnp.min(logits), delta_bound),
            TwoSided(jnp.exp(-delta_bound) / n, p, jnp.exp(delta_bound) / n))


def rbf_extremal(n: int, radius, gamma, d: int = 4, dtype=jnp.float64):
    """RBF inputs on which the dispersion bounds come closest, and how close.

    ``q = R e_1``: a key at ``q`` and one at ``-q`` give logits ``0`` and ``-4 gamma R^2``, so
    ``delta = 4 gamma R^2`` exactly; one key at ``q`` and ``n - 1`` at ``-q`` (and the reverse)
    give Lemma 2.1's extremal ratios ``n/(e^r + n - 1)``, ``(e^-r + n - 1)/n`` with
    ``r = 4 gamma R^2``. Checked by ``test_rbf_dispersion_tight``.

    Returns:
      ``(Sides(delta, 4 gamma R^2), Tightness)``, weights through jaxattn's RBF variant.
    """
    q = jnp.zeros((d,), dtype).at[0].set(radius)
    near, far = q[None, :], -q[None, :]
    one_near = jnp.concatenate([near, jnp.repeat(far, n - 1, axis=0)])
    one_far = jnp.concatenate([far, jnp.repeat(near, n - 1, axis=0)])
    spread, hi = rbf_dispersion(q, one_near, gamma)
    _, lo = rbf_dispersion(q, one_far, gamma)
    r = 4 * float(gamma) * float(radius) ** 2
    return spread, Tightness(_ratios(hi, lo), _one_sided_closed(n, r))


def rbf_origin_sink(query, key, gamma):
    """RBF sink criterion: a key ``k`` outweighs a register at the origin iff ``||q - k|| < ||q||``.

    The register at 0 has shifted logit ``2 gamma q.0 - gamma ||0||^2 = 0`` for every query; key
    ``k`` has ``-gamma (||q - k||^2 - ||q||^2)``. Weights through jaxattn with a zero key register.
    Checked by ``test_rbf_origin_sink``.

    Returns:
      :class:`Sides` ``(log p_k - log p_origin, gamma (||q||^2 - ||q - k||^2))``: equal, so their
      signs agree.
    """
    query, key = jnp.asarray(query), jnp.asarray(key)
    d = query.shape[-1]
    zero = jnp.zeros((1, 1, d), query.dtype)
    p = _rbf_weights(query, key[None, :], gamma, registers=(zero, zero))
    lhs = jnp.log(p[1]) - jnp.log(p[0])
    rhs = gamma * (jnp.sum(query**2) - jnp.sum((query - key) ** 2))
    return Sides(lhs, rhs)


# --- Mudarisov et al. -----------------------------------------------------------------------


def lemma_1(logits, fn, a, grid: int = 4097):
    """Lemma 1 (Mudarisov et al.): a length-free normaliser ``F`` gives ``C1/L <= p_i <= C2/L``.

    .. math:: p_i = \\frac{F(l_i)}{\\sum_j F(l_j)}, \\; l_i \\in [-a, a]: \\quad
      C_1 = \\frac{\\min F}{\\max F}, \\; C_2 = \\frac{\\max F}{\\min F} \\text{ over } [-a, a]

    ``min F`` and ``max F`` are taken over a ``grid``-point mesh of ``[-a, a]`` including its ends
    (exact for monotone ``F`` and for ``F`` with its extremes on the mesh). The weights are
    jaxattn's softmax of ``log F(l)``. Checked by ``test_lemma_1`` and ``test_lemma_1_tight``.

    Args:
      logits: float ``[..., L]`` within ``[-a, a]``.
      fn: a positive function, jnp-traceable (e.g. ``jnp.exp``, ``jax.nn.softplus``).
      a: the logit bound.
      grid: mesh size for ``min F``, ``max F``.

    Returns:
      :class:`TwoSided` ``(C1/L, p, C2/L)``.

    References:
      Mudarisov et al. 2025, https://arxiv.org/abs/2508.17821
    """
    rows, lead = _float_rows(logits)
    if not float(a) > 0:
        raise ValueError(f"a must be > 0, got {a!r}")
    if bool(jnp.any(jnp.abs(rows) > a)):
        raise ValueError(f"logits must lie in [-a, a] = [{-a}, {a}]")
    # F(l_i) / sum_j F(l_j) is softmax of log F(l): jaxattn's softmax normalises it.
    p = weights_of_logits(jnp.log(fn(rows)))
    mesh = fn(jnp.linspace(-a, a, grid, dtype=rows.dtype))
    lo, hi = jnp.min(mesh), jnp.max(mesh)
    L = rows.shape[-1]
    return TwoSided(jnp.full(lead + (1,), lo / hi / L), p.reshape(*lead, L),
                    jnp.full(lead + (1,), hi / lo / L))


def lemma_1_extremal(L: int, fn, a, grid: int = 4097, dtype=jnp.float64):
    """Lemma 1 on the inputs that approach it: one logit at ``argmax F`` and ``L - 1`` at
    ``argmin F`` (and the reverse), both on the bound's mesh.

    With ``k = max F / min F``: ``max p / (C2/L) = L/(k + L - 1)`` and
    ``(C1/L) / min p = (1/k + L - 1)/L``, both ``-> 1`` as ``L`` grows. Checked by
    ``test_lemma_1_tight``.

    Returns:
      :class:`Tightness`.
    """
    mesh = jnp.linspace(-a, a, grid, dtype=dtype)
    f = fn(mesh)
    hi, lo = mesh[jnp.argmax(f)], mesh[jnp.argmin(f)]
    top = jnp.full((L,), lo, dtype).at[0].set(hi)
    bottom = jnp.full((L,), hi, dtype).at[0].set(lo)
    ratio = _ratios(lemma_1(top, fn, a, grid), lemma_1(bottom, fn, a, grid))
    return Tightness(ratio, _one_sided_closed(L, math.log(float(jnp.max(f) / jnp.min(f)))))


def corollary_1(query, keys, temperature=1.0):
    """Corollary 1 (Mudarisov et al.): ``e^{-2 Delta/T}/L <= p_i <= e^{2 Delta/T}/L``.

    Logits ``l_i = q . k_i`` (scale 1), ``Delta = max_i ||q|| ||k_i||``; weights through
    :class:`jaxattn.variants.Softmax` at temperature ``T``. Checked by ``test_corollary_1``.

    Args:
      query: ``[d]``.
      keys: ``[L, d]``.
      temperature: ``T > 0``.

    Returns:
      :class:`TwoSided` (bounds scalars, weights ``[L]``).
    """
    _check_temperature(temperature)
    query, keys = jnp.asarray(query), jnp.asarray(keys)
    if query.ndim != 1 or keys.ndim != 2 or keys.shape[1] != query.shape[0]:
        raise ValueError(f"query must be [d] and keys [L, d], got {query.shape} and {keys.shape}")
    w = jaxattn.attention_weights(query[None, None, None, :], keys[None, :, None, :],
                                  variant=variants.Softmax(temperature), scale=1.0)[0, 0, 0]
    big = jnp.linalg.norm(query) * jnp.max(jnp.linalg.norm(keys, axis=-1))
    L = keys.shape[0]
    return TwoSided(jnp.exp(-2 * big / temperature) / L, w, jnp.exp(2 * big / temperature) / L)


def corollary_1_extremal(L: int, q_norm, radius, temperature=1.0, d: int = 4,
                         dtype=jnp.float64):
    """Corollary 1 on its extremal inputs: one key ``R u`` along ``q = ||q|| u`` and ``L - 1`` at
    ``-R u`` (and the reverse): logits ``+-Delta``, spread ``2 Delta``, and Lemma 2.1's ratios
    with ``r = 2 Delta / T``. Checked by ``test_corollary_1_tight``.

    Returns:
      :class:`Tightness`.
    """
    u = jnp.zeros((d,), dtype).at[0].set(1.0)
    q = q_norm * u
    one_up = jnp.concatenate([radius * u[None], jnp.repeat(-radius * u[None], L - 1, axis=0)])
    r = 2 * float(q_norm) * float(radius) / float(temperature)
    ratio = _ratios(corollary_1(q, one_up, temperature), corollary_1(q, -one_up, temperature))
    return Tightness(ratio, _one_sided_closed(L, r))


def top_n_mask(weights, n_top: int):
    """Bool ``[..., L]``: the ``n_top`` largest weights (ties: lower index first)."""
    weights = jnp.asarray(weights)
    L = weights.shape[-1]
    if isinstance(n_top, bool) or not isinstance(n_top, (int, np.integer)) or not 0 <= n_top <= L:
        raise ValueError(f"n_top must be an int in [0, L] = [0, {L}], got {n_top!r}")
    if n_top == 0:
        return jnp.zeros(weights.shape, bool)
    _, idx = jax.lax.top_k(weights, n_top)
    return jnp.sum(jax.nn.one_hot(idx, L, dtype=jnp.int32), axis=-2) > 0


def top_n_context(weights, x, n_top: int):
    """Context vector of the top-N selection: ``s = sum_{i in I_N} p_i x_i``.

    Args:
      weights: ``[..., L]``.
      x: token embeddings ``[..., L, d]``.
      n_top: ``N``.

    Returns:
      ``(s [..., d], mask [..., L])``.
    """
    mask = top_n_mask(weights, n_top)
    s = jnp.einsum("...l,...ld->...d", jnp.where(mask, weights, 0.0), x)
    return s, mask


def top_n_distances(weights, x, n_top: int):
    """Both readings of Mudarisov et al.'s Eq. 7 distance between ``s`` and the rest.

    .. math:: d_a = \\Big\\|\\sum_{i \\notin I_N} p_i x_i - s\\Big\\|, \\qquad
      d_b = \\sum_{i \\notin I_N} \\|p_i x_i - s\\|

    Returns:
      ``(d_a, d_b)``, each ``[...]``. At ``N = L``, ``d_a = ||s||`` (the full attention output) and
      ``d_b = 0`` (empty sum).
    """
    return subset_distances(weights, x, top_n_mask(weights, n_top))


def subset_distances(weights, x, mask):
    """Both Eq. 7 readings for any selected set ``mask [..., L]`` (top-N or random)."""
    px = weights[..., None] * x
    s = jnp.sum(jnp.where(mask[..., None], px, 0.0), axis=-2)
    rest = jnp.sum(jnp.where(mask[..., None], 0.0, px), axis=-2)
    d_a = jnp.linalg.norm(rest - s, axis=-1)
    each = jnp.linalg.norm(px - s[..., None, :], axis=-1)
    d_b = jnp.sum(jnp.where(mask, 0.0, each), axis=-1)
    return d_a, d_b


@jax.jit
def _topk_support(noise, variant):
    q = jnp.ones((noise.shape[0], 1, 1, 1), noise.dtype)
    return jaxattn.attention_weights(q, noise[:, :, None, None], variant=variant,
                                     scale=1.0)[:, 0, 0, :] > 0


def random_subset_mask(key, shape, n_top: int):
    """Bool ``shape = [..., L]``: a uniform random ``n_top``-subset per row.

    The subset is the support of jaxattn's top-k variant on i.i.d. Gaussian logits (float64 draws
    tie with probability 0), so the selection the experiments compare against is the library's.
    """
    L = shape[-1]
    if isinstance(n_top, bool) or not isinstance(n_top, (int, np.integer)) or not 0 <= n_top <= L:
        raise ValueError(f"n_top must be an int in [0, L] = [0, {L}], got {n_top!r}")
    if n_top == 0:
        return jnp.zeros(shape, bool)
    noise = jax.random.normal(key, (math.prod(shape[:-1]), L), jnp.float64)
    return _topk_support(noise, variants.TopK(int(n_top))).reshape(shape)


class CriticalN(NamedTuple):
    """KS two-sample p-values of top-N vs random-N distances per N, and the stable critical N."""

    n_values: tuple
    p_values: np.ndarray
    critical: int | None


def stable_critical(n_values, p_values, alpha: float = 0.05):
    """The smallest ``N`` from which the p-value stays above ``alpha`` for every larger ``N``.

    A first crossing can be a fluctuation (one ``N`` with ``p > alpha`` amid rejections); this
    rule ignores any crossing that a later rejection undoes. ``None`` if the last ``p <= alpha``.
    """
    p = np.asarray(p_values, np.float64)
    if p.size != len(n_values):
        raise ValueError(f"{len(n_values)} N values but {p.size} p-values")
    below = np.nonzero(~(p > alpha))[0]  # NaN counts as a rejection
    start = 0 if below.size == 0 else int(below[-1]) + 1
    return int(n_values[start]) if start < p.size else None


def critical_n(key, weights, x, n_values, reading: int = 1, alpha: float = 0.05) -> CriticalN:
    """Mudarisov et al.'s "critical N": where top-N and random-N distance distributions merge.

    For each ``N``, the Eq. 7 distance (``reading`` 0 = (a), 1 = (b)) over the rows of ``weights``
    for the top-N set is compared by a two-sample Kolmogorov-Smirnov test (scipy, on the host)
    with the same distance for a uniform random N-subset (:func:`random_subset_mask`); the
    critical N follows :func:`stable_critical`. A measurement (the protocol runs on GPT-2 in the
    paper; here on any weights given).
    """
    from scipy import stats

    pvals = []
    for i, n in enumerate(n_values):
        top = np.asarray(top_n_distances(weights, x, n)[reading])
        rand_mask = random_subset_mask(jax.random.fold_in(key, i), weights.shape, n)
        rand = np.asarray(subset_distances(weights, x, rand_mask)[reading])
        pvals.append(float(stats.ks_2samp(top, rand).pvalue))
    pvals = np.asarray(pvals)
    return CriticalN(tuple(n_values), pvals, stable_critical(n_values, pvals, alpha))


def finite_difference_probe(key, logits, temperature, eps, direction=None):
    """``||p(l + eps u) - p(l)|| / eps`` for a random unit direction ``u`` per row (paper's probe).

    By the mean value inequality it is at most ``sup ||J||_2 <= 1/(2T)`` for every ``eps``
    (``test_finite_difference_probe``); Corollary 3's ``min{1/(4T), sqrt 2}`` is not a bound on it.
    ``direction`` (``[n]``, normalised here) replaces the random ones: at two equal logits and
    ``u = (1, -1)/sqrt 2`` the ratio is ``tanh(x)/x`` of the bound, ``x = eps/(sqrt 2 T)``, so it
    tends to ``1/(2T)`` as ``eps -> 0`` (``test_finite_difference_probe_tight``).

    Returns:
      :class:`Sides` ``(ratio [...], 1/(2T))``.
    """
    _check_temperature(temperature)
    rows, lead = _float_rows(logits)
    if direction is None:
        u = jax.random.normal(key, rows.shape, rows.dtype)
    else:
        u = jnp.broadcast_to(jnp.asarray(direction, rows.dtype), rows.shape)
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    var = variants.Softmax(temperature)
    diff = weights_of_logits(rows + eps * u, var) - weights_of_logits(rows, var)
    ratio = jnp.linalg.norm(diff, axis=-1) / eps
    return Sides(ratio.reshape(lead), jnp.full(lead, 1.0 / (2 * temperature), ratio.dtype))


def distinguishable_fraction(weights, x, n_top: int):
    """Fraction of selected tokens that a ball around ``s`` separates from all non-selected ones.

    Selected ``i`` is distinguishable when some ball centred at ``s`` holds ``p_i x_i`` and no
    non-selected ``p_j x_j``, i.e. ``||p_i x_i - s|| < min_{j not in I_N} ||p_j x_j - s||``
    (the quantity Theorem 2 of Mudarisov et al. bounds). Measured, not asserted: docs/science.md does
    not give the bound's formula.

    Returns:
      The fraction ``[...]`` in ``[0, 1]`` (1 when nothing is left out).
    """
    if n_top < 1:
        raise ValueError(f"n_top must be >= 1, got {n_top}")
    s, mask = top_n_context(weights, x, n_top)
    dist = jnp.linalg.norm(weights[..., None] * x - s[..., None, :], axis=-1)
    nearest_out = jnp.min(jnp.where(mask, jnp.inf, dist), axis=-1, keepdims=True)
    separated = mask & (dist < nearest_out)
    return jnp.sum(separated, axis=-1) / n_top


def random_subset_exclusion_exact(L: int, n_top: int):
    """A uniform random N-subset of L tokens excludes each token with probability ``(L-N)/L``.

    Exact: over all ``L!`` orderings of ``L`` distinct logits (each equally likely for i.i.d.
    continuous logits), the share in which jaxattn's top-N selection leaves token 0 out, as a
    :class:`fractions.Fraction`, against ``(L - N)/L``. Enumeration: ``L <= 7``. Checked by
    ``test_random_subset_exclusion_exact``.

    Returns:
      :class:`Sides` of two :class:`fractions.Fraction` (``value``: token 0; all tokens agree by
      symmetry of the enumeration, which :func:`random_subset_exclusion_counts` exposes).
    """
    counts = random_subset_exclusion_counts(L, n_top)
    return Sides(Fraction(int(counts[0]), math.factorial(L)), Fraction(L - n_top, L))


def random_subset_exclusion_counts(L: int, n_top: int):
    """For each token, in how many of the ``L!`` orderings jaxattn's top-N selection omits it."""
    import itertools

    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or not 1 <= L <= 7:
        raise ValueError(f"L must be an int in [1, 7] (L! orderings are enumerated), got {L!r}")
    if not 0 <= n_top <= L:
        raise ValueError(f"need 0 <= n_top <= L, got L={L}, n_top={n_top}")
    if n_top == 0:
        return np.full(L, math.factorial(L))
    ranks = np.asarray(list(itertools.permutations(range(L))), np.float64)
    chosen = np.asarray(_topk_support(jnp.asarray(ranks), variants.TopK(int(n_top))))
    return np.sum(~chosen, axis=0)


def random_subset_exclusion_mc(key, L: int, n_top: int, trials: int):
    """Monte Carlo frequency with which each token is left out of a random N-subset.

    Subsets from :func:`random_subset_mask` (jaxattn's top-k on Gaussian logits). Checked by
    ``test_random_subset_exclusion_mc`` (within 3 standard errors of ``(L-N)/L``).

    Returns:
      ``(frequency [L], standard error [L])``.
    """
    chosen = random_subset_mask(key, (trials, L), n_top).astype(jnp.float32)  # [trials, L]
    freq = 1.0 - jnp.mean(chosen, axis=0)
    se = jnp.std(chosen, axis=0, ddof=1) / math.sqrt(trials)
    return freq, se


def softmax_jacobian(logits, temperature=1.0):
    """``dp/ds`` of softmax at temperature ``T``, by autodiff through jaxattn: ``(diag p - p p^T)/T``.

    Args:
      logits: ``[..., n]``.

    Returns:
      ``[..., n, n]``.
    """
    rows, lead = _float_rows(logits)
    n = rows.shape[-1]
    jac = _jacobian_rows(rows, variants.Softmax(temperature))
    return jac.reshape(*lead, n, n)


@jax.jit
def _jacobian_rows(rows, variant):
    return jax.vmap(jax.jacfwd(lambda r: _attend_rows(r[None], variant)[0][0]))(rows)


class Corollary3(NamedTuple):
    """Spectral norm of the softmax Jacobian against the published and the sharp bound."""

    norm: jax.Array  # ||dp/dl||_2
    published: jax.Array  # min(1/(4T), sqrt 2)
    sharp: jax.Array  # 1/(2T), reached by two equal logits
    max_entry: jax.Array  # max |J_ij|, which 1/(4T) does bound


def corollary_3(logits, temperature=1.0):
    """Corollary 3 as published: ``||dp/dl||_2 <= min{1/(4T), sqrt 2}`` -- refuted.

    ``J = (diag p - p p^T)/T``. For unit ``u``, ``u^T J u = Var_p(u)/T <= (max u - min u)^2/(4T)
    <= 1/(2T)``, with equality for two equal logits and the others at ``-inf``: ``p = (1/2, 1/2)``
    gives eigenvalue ``1/(2T) > 1/(4T)`` and, for ``T < 1/(2 sqrt 2)``, ``> sqrt 2``. What holds
    instead: ``||J||_2 <= 1/(2T)`` (sharp) and ``max_ij |J_ij| <= 1/(4T)``. Pinned by
    ``test_corollary_3_refuted`` and ``test_corollary_3_sharp_bound``.

    Returns:
      :class:`Corollary3` with each member ``[...]``.
    """
    _check_temperature(temperature)
    jac = softmax_jacobian(logits, temperature)
    norm = jnp.linalg.matrix_norm(jac, ord=2)
    t = jnp.asarray(temperature, norm.dtype)
    published = jnp.minimum(1.0 / (4 * t), math.sqrt(2.0)) * jnp.ones_like(norm)
    sharp = 1.0 / (2 * t) * jnp.ones_like(norm)
    return Corollary3(norm, published, sharp, jnp.max(jnp.abs(jac), axis=(-2, -1)))



# --- Theorem 2.2: a small transformer-like stack --------------------------------------------


class TinyTransformer(NamedTuple):
    """A pre-LayerNorm BERT-style stack: embedding, global softmax heads, ReLU MLPs, no positions.

    ``params`` holds ``embed [V, D]`` and per layer ``wq, wk, wv [N, D, h]``, ``wo [N*h, D]``,
    ``w1 [D, F]``, ``b1 [F]``, ``w2 [F, D]``.
    """

    params: dict
    num_layers: int
    num_heads: int


def tiny_transformer(key, vocab=16, d_model=16, num_heads=2, num_layers=2, mlp=32, gain=1.0):
    """Random :class:`TinyTransformer` (Gaussian weights, std ``gain/sqrt(fan_in)``), float32."""
    head = d_model // num_heads
    keys = iter(jax.random.split(key, 1 + 6 * num_layers))

    def normal(shape, fan_in):
        return gain * jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(fan_in)

    params = {"embed": jax.random.normal(next(keys), (vocab, d_model), jnp.float32), "layers": []}
    for _ in range(num_layers):
        params["layers"].append({
            "wq": normal((num_heads, d_model, head), d_model),
            "wk": normal((num_heads, d_model, head), d_model),
            "wv": normal((num_heads, d_model, head), d_model),
            "wo": normal((num_heads * head, d_model), num_heads * head),
            "w1": normal((d_model, mlp), d_model),
            "b1": jnp.zeros((mlp,), jnp.float32),
            "w2": normal((mlp, d_model), mlp),
        })
    return TinyTransformer(params, num_layers, num_heads)



def _layer_norm(x, eps=1e-6):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


def _forward_stats(params, tokens):
    """Per layer and head: max weight ``[N]`` and max logit spread ``[N]`` over all queries."""
    x = params["embed"][tokens][None]  # [1, n, D]
    max_w, spread = [], []
    for layer in params["layers"]:
        h = _layer_norm(x)
        q = jnp.einsum("BTD,NDH->BTNH", h, layer["wq"])
        k = jnp.einsum("BTD,NDH->BTNH", h, layer["wk"])
        v = jnp.einsum("BTD,NDH->BTNH", h, layer["wv"])
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, stats = jaxattn.attention(q, k, v, scale=scale, return_stats=True,
                                       implementation="xla")
        logits = scale * jnp.einsum("BTNH,BSNH->BNTS", q, k)
        spread.append(jnp.max(jnp.max(logits, -1) - jnp.min(logits, -1), axis=(0, 2)))
        max_w.append(jnp.max(stats.max_weight, axis=(0, 2)))
        x = x + out.reshape(*out.shape[:2], -1) @ layer["wo"]
        h = _layer_norm(x)
        x = x + jax.nn.relu(h @ layer["w1"] + layer["b1"][None, None, :]) @ layer["w2"]
    return jnp.stack(max_w), jnp.stack(spread)


_forward_stats_jit = jax.jit(_forward_stats)


def transformer_delta_bound(model: TinyTransformer):
    """A-priori logit spread per layer and head, independent of the input length ``n``.

    Pre-LayerNorm inputs have ``||LN(x)|| <= sqrt(D)``, so by Proposition 3.1 every head's logits
    satisfy ``delta <= 2 scale sigma(W_q) sigma(W_k) D``. Returns ``[layers, heads]``.
    """
    out = []
    for layer in model.params["layers"]:
        d_model, head = layer["wq"].shape[1], layer["wq"].shape[2]
        sq = jnp.linalg.matrix_norm(layer["wq"], ord=2)  # [N]
        sk = jnp.linalg.matrix_norm(layer["wk"], ord=2)
        out.append(2.0 / math.sqrt(head) * sq * sk * d_model)
    return jnp.stack(out)



# Lemma 2.1 with an n-free spread makes max p = Theta(1/n): the least-squares slope of
# log max p on log n is -1 up to the spread's drift at small n. The rule: |slope + 1| <= 0.1.
DISPERSION_SLOPE_TOL = 0.1


class StackDispersion(NamedTuple):
    """Theorem 2.2 demonstration: per length ``[len(lengths), layers, heads]`` arrays."""

    lengths: np.ndarray
    max_weight: np.ndarray
    spread: np.ndarray
    delta_bound: np.ndarray  # [layers, heads], independent of n


def transformer_dispersion(key, lengths, model: TinyTransformer | None = None):
    """Theorem 2.2 (Velickovic et al.) on a random pre-LN stack: every global head disperses.

    For token sequences of growing length ``n`` (uniform over a finite vocabulary), each layer's
    logit spread stays below an n-free bound (:func:`transformer_delta_bound`), so every weight
    of every head is at most ``e^{delta_bound}/n -> 0``. A numerical demonstration, not a proof;
    checked by ``test_transformer_disperses``.

    Returns:
      :class:`StackDispersion` (numpy arrays).
    """
    model = tiny_transformer(jax.random.fold_in(key, 0)) if model is None else model
    vocab = model.params["embed"].shape[0]
    max_w, spread = [], []
    for i, n in enumerate(lengths):
        tokens = jax.random.randint(jax.random.fold_in(key, i + 1), (int(n),), 0, vocab)
        w, s = _forward_stats_jit(model.params, tokens)
        max_w.append(np.asarray(w))
        spread.append(np.asarray(s))
    return StackDispersion(np.asarray(lengths), np.stack(max_w), np.stack(spread),
                           np.asarray(transformer_delta_bound(model)))


def dispersion_slope(res: StackDispersion):
    """Least-squares slope of ``log max p`` (largest over layers and heads) on ``log n``.

    Theorem 2.2's dispersion, as a rate: ``-1`` within :data:`DISPERSION_SLOPE_TOL`.
    """
    top = np.asarray(res.max_weight, np.float64).reshape(len(res.lengths), -1).max(axis=1)
    return float(np.polyfit(np.log(np.asarray(res.lengths, np.float64)), np.log(top), 1)[0])
