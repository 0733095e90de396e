"""The claim table: ``python -m theory.check`` (CI size) or ``python -m theory.check --full``.

One row per claim of ``SCIENCE.md`` section 2: claim, source, status, the numbers behind it.

* ``verified`` -- an exact claim held on every case of a random battery (within float rounding),
  or a statistical estimate fell within ``max(3 SE, floor)`` of the prediction;
* ``refuted`` -- a counterexample (the row gives it);
* ``measured`` -- a quantity the sources give no constant or no testable form for;
* ``inconclusive`` -- a statistical check that neither held nor clearly failed.

Each row function is the one the tests in ``tests/test_theory_*.py`` assert on (they call it and
check the status), so the table says what the tests say. Runs under float64 (a local
``jax.enable_x64`` context).
"""

import argparse
import dataclasses
import math
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import variants
from theory import dispersion as D
from theory import hardmax as hm
from theory import sample_complexity as sc

__all__ = ["Row", "Settings", "CI", "FULL", "ROWS", "run", "format_table", "main"]

V25 = "Velickovic et al. 2025 (arXiv 2410.01104)"
M25 = "Mudarisov et al. 2025 (arXiv 2508.17821)"
B26 = "Bohbot et al. 2026 (arXiv 2512.10656)"
OURS = "derived here"
EPS32 = 2.0**-23  # jaxattn applies 1/temperature and SSMax's s log n in float32


class Row(NamedTuple):
    """One line of the table."""

    claim: str
    source: str
    status: str
    numbers: str


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of the checks. :data:`CI` runs in a few minutes on 2 CPU cores."""

    cases: int = 200  # random cases per exact battery
    replicates: int = 64
    ns: tuple = (64, 256, 1024, 4096)
    probes: int = 8
    rate_floor: float = sc.RATE_FLOOR  # the stated floor of sc.slope_verdict
    d: int = 4
    sigma2: float = 0.5
    radii: tuple = (0.5, 1.0, 2.0, 3.0)
    moment_ns: tuple = (64, 128, 256, 512, 1024)
    moment_replicates: int = 32
    moment_d: int = 2
    horizons: tuple = (0.25, 0.5, 1.0, 1.5)
    scales: tuple = (0.5, 2.0, 4.0)
    transformer_lengths: tuple = (32, 256, 1024)
    topn_lengths: tuple = (16, 64, 256)
    topn_batch: int = 64


CI = Settings()
FULL = Settings(
    cases=2000, replicates=200, ns=tuple(int(n) for n in np.geomspace(1e3, 3e4, 12)), probes=16,
    d=50, sigma2=0.1, radii=(1.0, 2.0, 4.0, 6.0, 8.0),
    moment_ns=tuple(int(n) for n in np.geomspace(256, 8192, 8)), moment_replicates=50,
    moment_d=8, horizons=(0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0),
    scales=(0.5, 1.0, 2.0, 4.0, 8.0, 16.0), transformer_lengths=(32, 256, 1024, 4096),
    topn_lengths=(16, 64, 256, 1024), topn_batch=256)


def _status(ok: bool) -> str:
    return "verified" if ok else "refuted"


def _trend_status(values, ses, z=3.0) -> str:
    """Whether ``values`` rise in order: ``verified`` if each step up exceeds ``z`` combined SEs,
    ``refuted`` if some step down does, else ``inconclusive`` (a step within the noise).

    Non-finite values or SEs (a broken estimate) give ``refuted``: no comparison passes on NaN.
    """
    v, e = np.asarray(values, np.float64), np.asarray(ses, np.float64)
    if v.size < 2 or not (np.all(np.isfinite(v)) and np.all(np.isfinite(e)) and np.all(e >= 0)):
        return "refuted"
    steps, noise = np.diff(v), z * np.hypot(e[1:], e[:-1])
    if np.all(steps > noise):
        return "verified"
    return "refuted" if np.any(steps < -noise) else "inconclusive"


def _battery(settings, seed=0):
    """Random logit rows ``[cases, n]`` in a few buckets, with ties in half of them."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (1, 2, 7, 64):
        x = rng.standard_normal((settings.cases // 4, n)) * rng.uniform(0, 20, (settings.cases // 4, 1))
        x[::2] = np.round(x[::2])
        out.append(jnp.asarray(x, jnp.float64))
    return out


def _temps(settings, seed=1):
    return np.random.default_rng(seed).uniform(0.05, 5.0, 8)


def _worst(pairs):
    """Largest ``value / bound`` over (value, bound) array pairs (<= 1 means the bound held).

    A zero bound counts as ratio 0 if the value is 0 too (both underflowed), else infinity.
    """
    worst = 0.0
    for v, b in pairs:
        v, b = np.asarray(v, np.float64), np.asarray(b, np.float64)
        v, b = np.broadcast_arrays(v, b)
        safe = np.where(b > 0, b, 1.0)
        ratio = np.where(b > 0, v / safe, np.where(v <= 0, 0.0, np.inf))
        worst = max(worst, float(np.max(ratio)))
    return worst


# --- 2.1 dispersion -------------------------------------------------------------------------


def row_lemma_2_1(settings=CI):
    worst_lo, worst_hi = 0.0, 0.0
    for s in _battery(settings):
        for t in _temps(settings):
            r = D.lemma_2_1(s, t)
            tol = EPS32 * (1 + np.asarray(D.logit_spread(s))[:, None] / t)
            worst_lo = max(worst_lo, float(np.max(np.asarray(r.lower) / np.asarray(r.value) - tol)))
            worst_hi = max(worst_hi, float(np.max(np.asarray(r.value) / np.asarray(r.upper) - tol)))
    ok = worst_lo <= 1 and worst_hi <= 1
    return Row("Lemma 2.1: e^(-delta/theta)/n <= p_k <= e^(delta/theta)/n", V25, _status(ok),
               f"max lower/p = {worst_lo:.6f}, max p/upper = {worst_hi:.6f}")


def row_tight_max(settings=CI):
    worst = 0.0
    for s in _battery(settings):
        for t in _temps(settings):
            r = D.tight_max_bound(s, t)
            tol = EPS32 * (1 + np.asarray(D.logit_spread(s)) / t)
            worst = max(worst, float(np.max(np.asarray(r.value) / np.asarray(r.bound) - tol)))
    eq = D.tight_max_bound(D.extremal_logits(64, 3.0, jnp.float64), 0.7)
    gap = abs(float(eq.value) / float(eq.bound) - 1)
    ok = worst <= 1 and gap <= EPS32 * (1 + 3.0 / 0.7)
    return Row("max p <= e^(d/t)/(e^(d/t)+n-1), equality at one logit M, n-1 at m", V25,
               _status(ok), f"max ratio {worst:.6f}; extremal |ratio-1| = {gap:.1e}")


def row_entropy_floor(settings=CI):
    worst = -np.inf
    for s in _battery(settings):
        for t in _temps(settings):
            floor, h = D.entropy_floor(s, t)
            slack = EPS32 * (1 + np.asarray(D.logit_spread(s)) / t) + 1e-12
            worst = max(worst, float(np.max(np.asarray(floor) - np.asarray(h) - slack)))
    return Row("Entropy floor H(p) >= log n - delta/theta", V25, _status(worst <= 0),
               f"max (floor - H) = {worst + 0:.2e} (<= 0 holds)")


def row_entropy_derivative(settings=CI):
    worst, neg = 0.0, 0
    for s in _battery(settings):
        for t in _temps(settings)[:3]:
            dh, rhs = (np.asarray(a) for a in D.entropy_temperature_derivative(s, t))
            neg += int(np.sum(rhs < 0))
            big = float(np.max(np.abs(np.asarray(s)))) + 1.0  # autodiff rounding scale, as in the test
            atol = 16 * np.finfo(np.float64).eps * (big / t) * (big / t**2)
            worst = max(worst, float(np.max(np.abs(dh - rhs) / (1e-5 * np.abs(rhs) + atol))))
    ok = worst <= 1 and neg == 0
    return Row("dH/dtheta = Var_p(s)/theta^3 >= 0 (autodiff through jaxattn)", V25, _status(ok),
               f"max |diff| / (1e-5 |rhs| + rounding scale) = {worst:.2f}")


def row_theorem_2_2(settings=CI):
    res = D.transformer_dispersion(jax.random.key(0), settings.transformer_lengths)
    n = res.lengths[:, None, None].astype(np.float64)
    ok = (np.all(res.spread <= res.delta_bound[None] * (1 + 1e-5))
          and np.all(res.max_weight <= np.exp(res.spread) / n * (1 + 1e-5))
          and np.all(res.max_weight[-1] < res.max_weight[0]))
    nmax = (res.max_weight * n).max(axis=(1, 2))
    slope = np.polyfit(np.log(res.lengths), np.log(res.max_weight.max(axis=(1, 2))), 1)[0]
    return Row("Thm 2.2: global heads of an MLP+attention stack disperse (2-layer pre-LN demo)", V25,
               _status(bool(ok)),
               f"n*max p over n={[int(n) for n in res.lengths]}: {np.round(nmax, 2).tolist()}; slope of "
               f"log max p on log n {slope:.2f}; spread <= n-free bound {res.delta_bound.max():.1f}")


def row_prop_3_1(settings=CI):
    rng = np.random.default_rng(3)
    worst = 0.0
    for _ in range(settings.cases // 4):
        sc_ = rng.uniform(0.01, 10)
        q, k = rng.standard_normal((4, 6)) * sc_, rng.standard_normal((4, 6)) * sc_
        r = D.proposition_3_1(q, k, rng.standard_normal(6), rng.standard_normal((16, 6)) * sc_)
        worst = max(worst, float(r.value / r.bound))
    return Row("Prop 3.1: delta <= 2 smax(Q) smax(K) ||y|| max||x_i||", V25, _status(worst <= 1),
               f"max delta/bound = {worst:.3f}")


def row_adaptive_entropy(settings=CI):
    worst, beta_min = -np.inf, np.inf
    for s in _battery(settings):
        for mult in (0.3, 1.0, 3.0):
            a, p = D.adaptive_entropy(s * mult)
            worst = max(worst, float(np.max(np.asarray(a) - np.asarray(p))))
            beta_min = min(beta_min, float(np.min(np.asarray(D.adaptive_beta(s * mult)))))
    return Row("Adaptive temperature never raises entropy (beta >= 1)", V25,
               _status(worst <= 1e-12 and beta_min >= 1), f"max H_adapt - H = {worst:.1e}, "
               f"min beta = {beta_min:.3f}")


def row_adaptive_argmax(settings=CI):
    bad = 0
    for s in _battery(settings):  # tie-aware: exactly equal weights are all valid argmaxes
        at_top, top = D.adaptive_argmax_weight(s)
        bad += int(np.sum(np.asarray(at_top) != np.asarray(top)))
    return Row("Adaptive temperature keeps the argmax", V25, _status(bad == 0), f"{bad} mismatches")


def row_adaptive_beta(settings=CI):
    beta_sup, h_sup, h_off = D.adaptive_beta_sup()
    var = variants.AdaptiveTemperature()
    grid = np.asarray(var.beta(jnp.linspace(0.0, 20.0, 200_001, dtype=jnp.float64)))
    ok = grid.max() <= beta_sup * (1 + 1e-12)
    return Row("Adaptive beta is bounded", V25, _status(ok),
               f"sup beta = {beta_sup:.4f} at H = {h_sup:.3f} nats; beta = 1 for H > {h_off:.4f} "
               f"(near-uniform rows of n >= {math.ceil(math.exp(h_off))} keys: plain softmax)")


def row_adaptive_disperses(settings=CI):
    worst = 0.0
    for s in _battery(settings):
        r = D.adaptive_dispersion(s)
        worst = max(worst, _worst([(r.value, r.upper), (r.lower, r.value)]))
    return Row("Adaptive temperature still disperses: p <= e^(beta_sup delta)/n", V25,
               _status(worst <= 1 + 1e-12), f"max ratio to bound {worst:.4f}")


def row_ssmax(settings=CI):
    worst = 0.0
    for n in (2, 16, 256, 4096):
        for delta in (0.5, 2.0, 4.0):
            got, closed = D.ssmax_top_weight(n, delta, 0.43, jnp.float64)
            rel = abs(float(got) / float(closed) - 1) / (2 * EPS32 * (1 + 0.43 * delta * math.log(n)))
            worst = max(worst, rel)
    up = [float(D.ssmax_top_weight(n, 4.0, 0.43, jnp.float64).value) for n in (16, 256, 4096)]
    ok = worst <= 1 and up[0] < up[1] < up[2]
    return Row("SSMax: top weight 1/(1+(n-1)n^(-s Delta)) -> 1 iff s Delta > 1", "Nakanishi 2025 / "
               + V25, _status(ok), f"closed form within float32 scale rounding; s=0.43, Delta=4: "
               f"{np.round(up, 4).tolist()} at n=16,256,4096")


def row_rbf(settings=CI):
    rng = np.random.default_rng(5)
    worst = 0.0
    for _ in range(settings.cases // 4):
        radius, gamma = rng.uniform(0.1, 3), rng.uniform(0.05, 2)
        q = rng.uniform(-1, 1, 4) * radius / 2
        k = rng.uniform(-1, 1, (16, 4)) * radius / 2
        spread, w = D.rbf_dispersion(jnp.asarray(q), jnp.asarray(k), gamma)
        worst = max(worst, _worst([(spread.value, spread.bound), (w.value, w.upper),
                                   (w.lower, w.value)]))
    return Row("RBF with ||q||,||k|| <= R disperses: delta <= 4 gamma R^2", "Pisoni 2026 / " + V25,
               _status(worst <= 1 + 1e-9), f"max ratio to bound {worst:.3f}")


def row_rbf_sink(settings=CI):
    rng = np.random.default_rng(6)
    worst, sign_bad = 0.0, 0
    for _ in range(settings.cases // 4):
        q, k = rng.standard_normal(4) * 2, rng.standard_normal(4) * 2
        lhs, rhs = (float(a) for a in D.rbf_origin_sink(jnp.asarray(q), jnp.asarray(k), 0.5))
        worst = max(worst, abs(lhs - rhs))
        sign_bad += int((lhs > 0) != (np.linalg.norm(q - k) < np.linalg.norm(q)))
    return Row("RBF sink: key k beats an origin register iff ||q-k|| < ||q||", "Pisoni 2026",
               _status(worst < 1e-9 and sign_bad == 0), f"max |log-ratio error| {worst:.1e}")


# --- 2.2 Mudarisov et al. -------------------------------------------------------------------


def row_lemma_1(settings=CI):
    fns = {"exp": jnp.exp, "softplus": jax.nn.softplus, "sigmoid": jax.nn.sigmoid,
           "1+x^2": lambda x: 1 + x * x}
    worst = 0.0
    for s in _battery(settings):
        for fn in fns.values():
            r = D.lemma_1(jnp.clip(s, -3, 3), fn, 3.0)
            worst = max(worst, _worst([(r.value, r.upper), (r.lower, r.value)]))
    return Row("Lemma 1: length-free F gives C1/L <= p_i <= C2/L", M25, _status(worst <= 1 + 1e-12),
               f"F in {list(fns)}; max ratio to bound {worst:.3f}")


def row_corollary_1(settings=CI):
    rng = np.random.default_rng(7)
    worst = 0.0
    for _ in range(settings.cases // 4):
        q, k = rng.standard_normal(4), rng.standard_normal((16, 4))
        t = rng.uniform(0.05, 5)
        r = D.corollary_1(jnp.asarray(q), jnp.asarray(k), t)
        worst = max(worst, _worst([(r.value, r.upper), (r.lower, r.value)]))
    return Row("Cor. 1: e^(-2D/T)/L <= p_i <= e^(2D/T)/L, D = max||q|| ||k_i||", M25,
               _status(worst <= 1 + 1e-6), f"max ratio to bound {worst:.3f}")


@jax.jit
def _sphere_weights(q, x, temperature):
    var = variants.Softmax(temperature)
    w = jaxattn.attention_weights(q[:, None, None, :], x[:, :, None, :], variant=var,
                                  scale=1.0)[:, 0, 0, :]
    out = jaxattn.attention(q[:, None, None, :], x[:, :, None, :], x[:, :, None, :], variant=var,
                            scale=1.0)[:, 0, 0, :]
    return w, out


def topn_sample(key, L, batch, d=8, temperature=0.5):
    """Sphere tokens (radius 1, keys = values) and a sphere query: weights, tokens, output."""
    x = sc.sample_sphere(key, (batch, L), d, 1.0, jnp.float64)
    q = sc.sample_sphere(jax.random.fold_in(key, 1), (batch,), d, 1.0, jnp.float64)
    w, out = _sphere_weights(q, x, temperature)
    return w, x, out


def topn_length_trend(settings=CI, n_top=1):
    """Mean +- SE of both distance readings at each L (fixed N)."""
    out = {}
    for L in settings.topn_lengths:
        w, x, _ = topn_sample(jax.random.key(L), L, settings.topn_batch)
        d_a, d_b = D.top_n_distances(w, x, n_top)
        out[L] = (sc.estimate(d_a), sc.estimate(d_b))
    return out


def _grows(trend, reading):
    ls = sorted(trend)
    return all(trend[b][reading].mean - trend[a][reading].mean
               > 3 * math.hypot(trend[b][reading].se, trend[a][reading].se) for a, b in zip(ls, ls[1:],
                                                                                           strict=False))


def row_topn_length_b(settings=CI):
    t = topn_length_trend(settings)
    nums = ", ".join(f"L={L}: {t[L][1].mean:.3f}+-{t[L][1].se:.3f}" for L in sorted(t))
    return Row("Top-N distance (reading b: sum ||p_i x_i - s||) grows with L, N=1", M25,
               _status(_grows(t, 1)), nums)


def row_topn_length_a(settings=CI):
    t = topn_length_trend(settings)
    nums = ", ".join(f"L={L}: {t[L][0].mean:.3f}+-{t[L][0].se:.3f}" for L in sorted(t))
    return Row("Top-N distance (reading a: ||sum p_i x_i - s||) grows with L, N=1", M25,
               _status(_grows(t, 0)), nums + " (sphere d=8, T=0.5)")


def row_topn_collapse(settings=CI):
    w, x, out = topn_sample(jax.random.key(3), 64, settings.topn_batch)
    d_b = [float(jnp.mean(D.top_n_distances(w, x, n)[1])) for n in (8, 32, 48, 60, 63, 64)]
    d_a_full = float(jnp.mean(D.top_n_distances(w, x, 64)[0]))
    ok_b = all(a > b for a, b in zip(d_b, d_b[1:], strict=False)) and d_b[-1] == 0
    return Row("Top-N distance collapses as N -> L (L=64)", M25,
               "verified (b) / refuted (a)" if ok_b and d_a_full > 0 else _status(ok_b),
               f"reading b at N=8..64: {np.round(d_b, 3).tolist()}; reading a at N=L is "
               f"||output|| = {d_a_full:.3f} (mean), not 0")


def row_subset(settings=CI):
    exact = all(D.random_subset_exclusion_exact(L, n)[0] == D.random_subset_exclusion_exact(L, n)[1]
                for L in range(1, 60) for n in range(0, L + 1))
    freq, se = D.random_subset_exclusion_mc(jax.random.key(64), 64, 20, 4000)
    want = 44 / 64
    ok_mc = all(abs(float(freq[i]) - want) <= 3 * float(se[i]) for i in (0, 63))
    return Row("Random N-subset excludes each token w.p. (L-N)/L", M25, _status(exact and ok_mc),
               f"exact for all L < 60; MC (L=64,N=20): {float(freq[0]):.4f}+-{float(se[0]):.4f} vs "
               f"{want:.4f}")


def row_distinguishable(settings=CI):
    w, x, _ = topn_sample(jax.random.key(11), 64, settings.topn_batch)
    fr = {n: float(jnp.mean(D.distinguishable_fraction(w, x, n))) for n in (5, 10, 20, 40)}
    return Row("Thm 2: fraction of top-N tokens geometrically distinguishable (L=64, sphere d=8)",
               M25, "measured", ", ".join(f"N={n}: {f:.3f}" for n, f in fr.items())
               + " (paper: about 80%; its bound's formula is not in SCIENCE.md)")


def row_corollary_3(settings=CI):
    r = D.corollary_3(jnp.zeros((2,), jnp.float64), 1.0)
    worst_sharp, worst_entry = 0.0, 0.0
    for s in _battery(settings)[1:]:
        for t in _temps(settings)[:3]:
            c = D.corollary_3(s, t)
            tol = 1 + 4 * EPS32 * (1 + float(np.max(D.logit_spread(s))) / t)
            worst_sharp = max(worst_sharp, float(np.max(c.norm / c.sharp)) / tol)
            worst_entry = max(worst_entry, float(np.max(c.max_entry * 4 * t)) / tol)
    refuted = float(r.norm) > float(r.published)
    return Row("Cor. 3 as published: ||dp/dl||_2 <= min{1/(4T), sqrt 2}", M25,
               "refuted" if refuted else "verified",
               f"n=2, equal logits, T=1: ||J||_2 = {float(r.norm):.3f} > {float(r.published):.3f}; "
               f"holds instead: ||J||_2 <= 1/(2T) (max ratio {worst_sharp:.3f}), "
               f"max|J_ij| <= 1/(4T) (max ratio {worst_entry:.3f})")


def row_fd_probe(settings=CI):
    worst, above_published = 0.0, 0
    for j, s in enumerate(_battery(settings)[1:]):
        for t in (0.05, 0.1, 1.0):
            for eps in (1e-3, 1e-1, 10.0):
                r = D.finite_difference_probe(jax.random.key(j), s, t, eps)
                tol = 1 + 4 * EPS32 * (1 + float(np.max(D.logit_spread(s + eps))) / t)
                worst = max(worst, float(np.max(r.value / r.bound)) / tol)
                above_published += int(np.sum(np.asarray(r.value) > min(1 / (4 * t), math.sqrt(2))))
    tie = D.finite_difference_probe(jax.random.key(0), jnp.zeros((1, 2), jnp.float64), 0.1, 1e-3)
    return Row("Finite-difference probes (eps 1e-3, 0.1, 10): ||p(l+eps u)-p(l)||/eps <= 1/(2T)",
               M25 + " / " + OURS, _status(worst <= 1),
               f"max ratio to 1/(2T) {worst:.3f}; {above_published} probes exceed Cor. 3's bound "
               f"(equal logits, T=0.1, eps=1e-3: {float(tie.value[0]):.3f} > sqrt 2)")


def row_critical_n(settings=CI):
    w, x, _ = topn_sample(jax.random.key(5), 64, 4 * settings.topn_batch)
    ns = (1, 5, 10, 20, 32, 48, 60, 64)
    parts = []
    for reading, name in ((0, "a"), (1, "b")):
        c = D.critical_n(jax.random.key(6), w, x, ns, reading)
        parts.append(f"reading {name}: critical N = {c.critical} (KS p at N=60: {c.p_values[-2]:.1e})")
    return Row("Critical N: top-N vs random-N distance distributions merge (KS, L=64)", M25,
               "measured", "; ".join(parts) + " (sphere d=8, T=0.5; the paper's protocol uses GPT-2)")


# --- 2.3 token-sample complexity ------------------------------------------------------------


def _nan_max(values) -> float:
    """Largest of ``values`` (arrays or numbers), ``nan`` if any is ``nan``: unlike Python's ``max``
    (``max(0.0, nan) == 0.0``), a broken estimate then fails every ``<=`` comparison."""
    flat = [np.ravel(np.asarray(v, np.float64)) for v in values]
    return float(np.max(np.concatenate(flat))) if flat else float("nan")


def _finite_worst(pairs) -> float:
    """:func:`_worst` that returns ``nan`` when a value or bound is not finite (a broken row)."""
    pairs = [tuple(np.asarray(a, np.float64) for a in pair) for pair in pairs]
    if not all(np.all(np.isfinite(v)) and np.all(np.isfinite(b)) for v, b in pairs):
        return float("nan")
    return _worst(pairs)


def _combine(statuses) -> str:
    """``refuted`` if any is, else ``inconclusive`` if any is, else ``verified``."""
    statuses = set(statuses)
    return next((st for st in ("refuted", "inconclusive") if st in statuses), "verified")


def row_bessel(settings=CI):
    import scipy.special as sps

    x = np.geomspace(1e-4, 2e3, 400)
    errs = []
    for nu in (0.0, 0.5, 1.0, 4.0, 24.0):
        ref = sps.ive(nu + 1, x) / sps.ive(nu, x)
        got = np.asarray(sc.bessel_ratio(jnp.asarray(nu), jnp.asarray(x)))
        errs.append(np.abs(got / ref - 1))
    worst = _nan_max(errs)
    return Row("A_d(r) = I_{d/2}/I_{d/2-1} by backward recurrence (vs scipy ive)", OURS,
               _status(worst < 1e-12), f"max rel. error {worst:.1e} for r in [1e-4, 2e3]")


def exact_limit_check(settings=CI, kind="gaussian", n=16384, replicates=16):
    """``Gamma_{mu_n}(x)`` averaged over replicates vs the exact limit: max ``|z|`` over coordinates."""
    d = 3
    key = jax.random.key(21 if kind == "gaussian" else 22)
    x = sc.sphere_directions(jax.random.fold_in(key, 1), 4, d, 1.5, jnp.float64)
    a = 0.8 * jnp.asarray(np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0])
    if kind == "gaussian":
        mean, cov = jnp.asarray([0.3, -0.2, 0.1]), 0.5 * jnp.eye(d, dtype=jnp.float64)
        toks = sc.sample_gaussian(key, (replicates, n), mean, jnp.sqrt(0.5) * jnp.eye(d))
        exact = sc.gamma_gaussian(x, mean, cov, a)
    else:
        toks = sc.sample_sphere(key, (replicates, n), d, 1.5, jnp.float64)
        exact = sc.gamma_sphere(x, 1.5, a)
    est = sc.estimate(sc.gamma_empirical(x, toks, a))
    floor = 2.0 / n  # the ratio estimator's O(1/n) bias, stated
    dev = np.abs(est.mean - np.asarray(exact))
    ok = bool(np.all(dev <= np.maximum(3 * est.se, floor)))
    return ok, float(np.max(dev / np.maximum(est.se, 1e-300)))


def row_gamma_exact(settings=CI):
    ok_g, zg = exact_limit_check(settings, "gaussian")
    ok_s, zs = exact_limit_check(settings, "sphere")
    return Row("Exact limits: Gaussian W_v(m+Sigma A x); sphere rho A_d(rho||Ax||) Ax/||Ax||", B26,
               _status(ok_g and ok_s), f"MC mean of Gamma_mu_n (n=16384, 16 reps) within 3 SE: "
               f"max |z| Gaussian {zg:.2f}, sphere {zs:.2f}")


def rate_rows_data(settings=CI):
    """The sup-error rate studies in the 1/sqrt(n) regime over ``settings.ns``: Gaussian tokens at
    ``R = 1`` (``n MSE/K >= 0.9`` from the smallest ``n``, ``row_rate_large_radius``), sphere tokens
    (bounded) at ``R = 1, 2``."""
    setup = sc.GaussianSetup(settings.d, settings.sigma2, 1.0)
    out = {("gaussian", 1.0): sc.gaussian_sup_study(jax.random.key(100), setup, 1.0, settings.ns,
                                                    settings.replicates, settings.probes)}
    for j, radius in enumerate((1.0, 2.0)):
        out[("sphere", radius)] = sc.sphere_sup_study(
            jax.random.key(200 + j), settings.d, 1.0, 1.0, radius, settings.ns, settings.replicates,
            settings.probes)
    return out


def row_rate(settings=CI, data=None):
    data = rate_rows_data(settings) if data is None else data
    verdicts, parts = [], []
    if ("gaussian", 1.0) in data:
        # The Gaussian study counts only from the 1/sqrt(n) regime on: n MSE/K >= 0.9 (3 SE).
        ratio, ratio_se = mse_ratio(settings, 1.0, jax.random.key(170))
        asymptotic = bool(ratio[0] + 3 * ratio_se[0] >= 0.9)
        parts.append(f"Gaussian R=1: n MSE/K(x) = {ratio[0]:.2f}+-{ratio_se[0]:.2f} at n={settings.ns[0]}")
    for (kind, radius), st in data.items():
        verdicts.append(sc.slope_verdict(st.fit, -0.5, settings.rate_floor))
        if kind == "gaussian" and not asymptotic and verdicts[-1] != "refuted":
            verdicts[-1] = "inconclusive"
        parts.append(f"{kind} R={radius:g}: {st.fit.slope:.3f}+-{st.fit.slope_se:.3f} ({verdicts[-1]})")
    return Row("sup_{|x|=R} |Gamma_mu_n - Gamma_mu| ~ C(R)/sqrt(n): slope -1/2", B26,
               _combine(verdicts), "; ".join(parts) + f" (sc.slope_verdict: within the floor "
               f"{settings.rate_floor} at 3 SE <= floor; Gaussian R >= 2: row_rate_large_radius)")


def mse_ratio(settings, radius, key, probes=1):
    """``n MSE(n) / K(x)`` at each ``n`` of ``settings.ns`` for the Gaussian setup at ``|x| = radius``:
    how far the sample sizes are from the ``1/sqrt(n)`` regime (``K`` = sc.pointwise_mse_constant)."""
    setup = sc.GaussianSetup(settings.d, settings.sigma2, 1.0)
    mean, cov, root, a = setup.arrays()
    x = sc.sphere_directions(jax.random.fold_in(key, 1), probes, settings.d, radius, jnp.float64)
    k = sc.pointwise_mse_constant(x, mean, cov, a)
    out = [sc.pointwise_mse_study(jax.random.fold_in(key, 2 + i), x, mean, root, a, n,
                                  settings.replicates) for i, n in enumerate(settings.ns)]
    return np.asarray([o.mean / k for o in out])[:, 0], np.asarray([o.se / k for o in out])[:, 0]


def row_rate_large_radius(settings=CI):
    setup = sc.GaussianSetup(settings.d, settings.sigma2, 1.0)
    parts, finite = [], True
    for j, radius in enumerate(sorted({2.0, settings.radii[-1]})):
        st = sc.gaussian_sup_study(jax.random.key(150 + j), setup, radius, settings.ns,
                                   settings.replicates, settings.probes)
        ratio, ratio_se = mse_ratio(settings, radius, jax.random.key(160 + j))
        finite &= bool(np.all(np.isfinite(ratio)) and np.isfinite(st.fit.slope))
        parts.append(f"R={radius:g}: slope {st.fit.slope:.3f}+-{st.fit.slope_se:.3f} (sc.slope_verdict: "
                     f"{sc.slope_verdict(st.fit, -0.5, settings.rate_floor)}); n MSE/K(x) = "
                     + ", ".join(f"{r:.2f}" for r in ratio) + f" (+-{ratio_se.max():.2f})")
    return Row(f"Gaussian tokens at R >= 2, n in [{settings.ns[0]}, {settings.ns[-1]}]: pre-asymptotic",
               B26 + " / " + OURS, "measured" if finite else "refuted", "; ".join(parts)
               + ": n MSE rises to its limit K(x) = e^(||Sigma^(1/2)Ax||^2)(...) from below over these n, "
               "so the error falls slower than 1/sqrt(n) here and the fitted slope is shallower; the "
               "rule is applied where n MSE/K >= 0.9 (row_rate)")


def growth_data(settings=CI):
    setup = sc.GaussianSetup(settings.d, settings.sigma2, 1.0)
    gauss = sc.growth_study(jax.random.key(300), setup, settings.radii, settings.ns,
                            settings.replicates, settings.probes)
    sphere = sc.growth_study(jax.random.key(301), None, settings.radii, settings.ns,
                             settings.replicates, settings.probes, sphere=(settings.d, 1.0, 1.0))
    return gauss, sphere


def row_growth(settings=CI, data=None):
    gauss, sphere = growth_data(settings) if data is None else data
    parts = []
    for name, g in (("Gaussian", gauss), ("sphere", sphere)):
        parts.append(f"{name}: C(R)={np.round(g.c, 3).tolist()} at R={g.radii.tolist()}, "
                     f"log C ~ {g.rate_linear.slope:.2f}R (chi2 {g.rate_linear.chi2_red:.1f}) or "
                     f"{g.rate_quadratic.slope:.3f}R^2 (chi2 {g.rate_quadratic.chi2_red:.1f})")
    # The growth itself is a claim (each step up beyond 3 SE, for both token kinds); whether it is
    # exponential is read off the two fits' chi2, which has no pass mark here.
    statuses = {_trend_status(g.c, g.c_se) for g in (gauss, sphere)}
    status = next(st for st in ("refuted", "inconclusive", "verified") if st in statuses)
    return Row("C(R) grows (exponentially) in R", B26, status, "; ".join(parts))


def moment_data(settings=CI):
    return [sc.gaussian_moment_study(jax.random.key(400 + j),
                                     sc.GaussianSetup(settings.moment_d, 1.0, h), settings.moment_ns,
                                     settings.moment_replicates)
            for j, h in enumerate(settings.horizons)]


def row_moment_below_half(settings=CI, data=None):
    if data is None:  # only the largest horizon is needed here
        top = sc.gaussian_moment_study(jax.random.key(400 + len(settings.horizons) - 1),
                                       sc.GaussianSetup(settings.moment_d, 1.0, settings.horizons[-1]),
                                       settings.moment_ns, settings.moment_replicates)
    else:
        top = data[-1]
    beta, se = -top.cov.fit.slope, top.cov.fit.slope_se
    # beta < 1/2 is a rate bound: a measured slope below 1/2 neither verifies it (the bound may
    # be loose) nor would 1/2 refute it; the row reports the exponent.
    finite = math.isfinite(beta) and math.isfinite(se)
    return Row("Pushforward covariance converges at n^-beta (beta < 1/2: a rate bound)", B26,
               "measured" if finite else "refuted",
               f"H={top.horizon:.2f}: measured beta_cov = {beta:.3f}+-{se:.3f} over n in "
               f"[{settings.moment_ns[0]}, {settings.moment_ns[-1]}]")


def row_moment_curve(settings=CI, data=None):
    data = moment_data(settings) if data is None else data
    parts = [f"H={m.horizon:.2f}: mean {-m.mean.fit.slope:.2f}+-{m.mean.fit.slope_se:.2f}, "
             f"cov {-m.cov.fit.slope:.2f}+-{m.cov.fit.slope_se:.2f}, 1/(2(1+H^2)) "
             f"{m.predicted_beta:.2f}" for m in data]
    return Row("Moment exponent beta vs 1/(2(1+H^2)) (H with A as in the exponent)", B26,
               "measured", "; ".join(parts))


# --- hardmax --------------------------------------------------------------------------------


def row_softmax_gap(settings=CI):
    worst = 0.0
    for s in _battery(settings)[1:]:
        for lam in (0.5, 2.0, 10.0, 50.0):
            r = hm.softmax_gap(s, lam)
            worst = _nan_max([worst, _finite_worst([(r.value, r.upper), (r.lower, r.value)])])
    return Row("softmax(lambda s) -> hardmax: e^(-lg)/(1+e^(-lg)) <= 1-p_max <= (n-1)e^(-lg)/(..)",
               B26 + " / " + OURS, _status(worst <= 1 + 1e-9), f"max ratio to bound {worst:.4f}")


def row_lambda_rate(settings=CI):
    s = jax.random.normal(jax.random.key(7), (64, 16), jnp.float64)
    (slope, want), tol = hm.lambda_slope(s, 20.0, 60.0)
    dev = float(jnp.max(jnp.abs(slope - want)))
    gaps = np.asarray(hm.top_gap(s))
    return Row("Rate in lambda: log(1-p_max) slope = -gap (n=16)", OURS, _status(dev <= tol),
               f"max |slope + gap| = {dev:.4f} <= {tol:.4f}; gaps in [{gaps.min():.3f}, "
               f"{gaps.max():.3f}]")


def row_hardmax_n(settings=CI):
    verdicts, parts = [], []
    for d in (2, 3):
        # d = 2's error (one angle, slope -1) is noisier: twice the replicates bring 3 SE under the floor.
        st = hm.hardmax_sphere_study(jax.random.key(500 + d), d, 1.0, settings.ns,
                                     settings.replicates * (2 if d == 2 else 1))
        want = hm.predicted_hardmax_slope(d)
        verdicts.append(sc.slope_verdict(st.fit, want, settings.rate_floor))
        parts.append(f"d={d}: {st.fit.slope:.3f}+-{st.fit.slope_se:.3f} vs {want:.3f} ({verdicts[-1]})")
    return Row("Hardmax on sphere tokens: error ~ n^(-1/(d-1))", OURS, _combine(verdicts),
               "; ".join(parts) + " (sc.slope_verdict)")


def row_scale_sweep(settings=CI, data=None):
    sw = hm.scale_sweep(jax.random.key(600), 2, 1.0, settings.scales, 1.0, settings.ns,
                        settings.replicates // 2) if data is None else data
    parts = [f"lambda={lam:g}: {s:.2f}+-{e:.2f}" for lam, s, e in zip(sw.scales, sw.slopes,
                                                                     sw.slope_ses, strict=True)]
    # Slower convergence is a slope in n that rises (towards 0) with lambda, beyond 3 SE per step;
    # "logarithmic as lambda -> inf" is a limit these finite scales only point towards.
    return Row("Large attention scale slows convergence in n (logarithmic as lambda -> inf)", B26,
               _trend_status(sw.slopes, sw.slope_ses), "; ".join(parts)
               + " (Gaussian tokens, sup over |x|=1)")


def row_mse_constant(settings=CI):
    """n MSE of the empirical attention map at large n against its derived constant K(x)."""
    d = 3
    rng = np.random.default_rng(31)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    root = (q * np.sqrt([1.5, 0.6, 0.25])) @ q.T  # anisotropic Sigma, non-symmetric A, W_v [2, 3]
    mean, a = rng.standard_normal(d) * 0.4, 0.6 * rng.standard_normal((d, d))
    w_v = rng.standard_normal((2, d))
    cov = root @ root.T
    x = sc.sphere_directions(jax.random.key(32), 4, d, 1.0, jnp.float64)
    est = sc.pointwise_mse_study(jax.random.key(33), x, jnp.asarray(mean), jnp.asarray(root), a, 2048,
                                 4 * settings.replicates, w_v)
    z = {}
    for name, c in (("K", cov), ("K at 1.1 Sigma", 1.1 * cov)):
        z[name] = _nan_max(np.abs(est.mean - sc.pointwise_mse_constant(x, mean, c, a, w_v)) / est.se)
    accept, power = z["K"] <= 3, z["K at 1.1 Sigma"] > 3
    status = ("verified" if power else "inconclusive") if accept else "refuted"
    return Row("n E||Gamma_mu_n(x) - Gamma_mu(x)||^2 -> e^(||Sigma^(1/2)Ax||^2)(tr(W_v Sigma W_v^T) + "
               "||W_v Sigma A x||^2) (Gaussian tokens, delta method)", OURS, status,
               f"n=2048, {4 * settings.replicates} reps, 4 x on |x|=1, anisotropic Sigma: max |z| "
               f"{z['K']:.2f} (<= 3); the constant at 1.1 Sigma: max |z| {z['K at 1.1 Sigma']:.2f} (> 3)")


def row_log_rate(settings=CI):
    """What the error against n looks like at large lambda: power law or linear in sqrt(log n)."""
    lams = tuple(lam for lam in (4.0 * s for s in settings.scales) if lam >= 8.0)[:2] or (8.0, 16.0)
    sw = hm.scale_sweep(jax.random.key(610), 2, 1.0, lams, 1.0, settings.ns, settings.replicates // 2)
    parts, finite = [], True
    for lam, st in zip(sw.scales, sw.studies, strict=True):
        lin = sc.wls_fit(np.sqrt(2 * np.log(st.ns)), st.mean, st.se)
        finite &= bool(np.isfinite(lin.slope) and np.isfinite(st.fit.slope))
        parts.append(f"lambda={lam:g}: power slope {st.fit.slope:.3f}+-{st.fit.slope_se:.3f} "
                     f"(chi2 {st.fit.chi2_red:.1f}); d error / d sqrt(2 log n) = {lin.slope:.2f}+-"
                     f"{lin.slope_se:.2f} (chi2 {lin.chi2_red:.1f})")
    # Our reading: for n << e^(lambda^2 sigma^2) the output is near the top token in direction
    # A x, whose projection grows like sigma sqrt(2 log n) towards lambda sigma^2: an error
    # falling by about sigma per unit of sqrt(2 log n), a logarithmic rate, not a power of n.
    return Row("At large lambda the error falls like sqrt(log n) (\"logarithmic\"), not a power of n",
               B26 + " / " + OURS, "measured" if finite else "refuted", "; ".join(parts)
               + " (Gaussian tokens N(0, I_2), sup over |x|=1; sigma = 1)")


ROWS = (
    row_lemma_2_1, row_tight_max, row_entropy_floor, row_entropy_derivative, row_theorem_2_2,
    row_prop_3_1, row_adaptive_entropy, row_adaptive_argmax, row_adaptive_beta,
    row_adaptive_disperses, row_ssmax, row_rbf, row_rbf_sink, row_lemma_1, row_corollary_1,
    row_topn_length_b, row_topn_length_a, row_topn_collapse, row_subset, row_distinguishable,
    row_corollary_3, row_fd_probe, row_critical_n, row_bessel, row_gamma_exact, row_rate,
    row_rate_large_radius, row_growth, row_moment_below_half, row_moment_curve, row_softmax_gap,
    row_lambda_rate, row_hardmax_n, row_scale_sweep, row_mse_constant, row_log_rate,
)


def run(settings=CI, rows=ROWS, progress=None):
    """Evaluates rows under float64; returns the :class:`Row` list."""
    out = []
    with jax.enable_x64(True):
        for fn in rows:
            t0 = time.time()
            out.append(fn(settings))
            if progress is not None:
                progress(f"{fn.__name__}: {out[-1].status} ({time.time() - t0:.1f}s)")
    return out


def format_table(rows) -> str:
    """A markdown table."""
    lines = ["| claim | source | status | numbers |", "|---|---|---|---|"]
    lines += [f"| {r.claim} | {r.source} | {r.status} | {r.numbers} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="paper-size settings (slow)")
    parser.add_argument("--quiet", action="store_true", help="no per-row progress on stderr")
    args = parser.parse_args(argv)
    settings = FULL if args.full else CI
    progress = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    rows = run(settings, progress=progress)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
