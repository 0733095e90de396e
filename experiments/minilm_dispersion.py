"""Dispersion and token-sample complexity on real text, on all-MiniLM-L6-v2 (a BERT *encoder*).

Three protocols of ``docs/science.md`` (sections 2.1 to 2.3 and 3) run on a pretrained model with
English text from :mod:`experiments.corpus` (Shakespeare's plays, or CPython's pydoc topics):

* **Dispersion** (Velickovic et al., Theorem 2.2): for windows of ``L`` tokens (``[CLS]``,
  ``L - 2`` consecutive tokens, ``[SEP]``; ``L = 16 ... 512``), every layer's and head's mean
  entropy and mean max weight over queries, with ``log L`` (the entropy of uniform weights) and
  ``1/L`` for scale. Slopes of entropy on ``log L`` and of ``log max weight`` on ``log L`` per head
  by weighted least squares (:func:`theory.sample_complexity.wls_fit`), read with theory's one
  slope rule :func:`theory.sample_complexity.slope_verdict` at the floor
  :data:`theory.dispersion.DISPERSION_SLOPE_TOL` (the slopes ``+1`` and ``-1`` that bounded logits
  give as ``L`` grows).
* **Limits of normalisation** (Mudarisov et al.; they use GPT-2, a decoder; this is an encoder, so
  every query sees all ``L`` keys): for chosen layers, every head, and sampled queries, the top-N
  distances (both readings of the paper's Eq. 7, :func:`theory.dispersion.top_n_distances`, with
  the head's value vectors as the token vectors ``x_i``, so that ``s`` plus the rest is the head's
  output) for ``N`` in ``{1, 5, 10, 20, 100}`` against ``L``, the same distances for a uniform
  random ``N``-subset, the critical ``N`` (two-sample Kolmogorov-Smirnov test of top-N against
  random-N distances, :func:`scipy.stats.ks_2samp`, and theory's stable rule
  :func:`theory.dispersion.stable_critical`), and finite-difference probes
  ``||p(l + eps u) - p(l)|| / eps`` of the head's own logit rows at ``eps`` in
  ``{1e-3, 1e-1, 10}`` (:func:`theory.dispersion.finite_difference_probe`) against the corrected
  Jacobian bound ``1/(2T)`` (Corollary 3 as published, ``min{1/(4T), sqrt 2}``, is refuted:
  ``docs/science.md``) at temperatures ``T`` dividing the model's logits.
* **Token-sample complexity** (Bohbot et al.'s BERT protocol) on layer 0: the layer's input
  tokens (embeddings after LayerNorm) of a 512-token window are the population ``mu``; ``n`` of
  them (``n`` in ``geomspace(64, 384, 10)``) are resampled with replacement, many times; each head's
  self-attention over the sample (the layer's own query, key and value projections, biases
  included) gives the transformed tokens, whose mean (L2) and covariance (Frobenius) errors against
  those of the whole window are fitted as ``C n^slope`` (:func:`theory.sample_complexity.loglog_slope`)
  and plotted against the horizon ``H = ||Sigma^(1/2) A Sigma^(1/2)||_2``,
  :func:`theory.sample_complexity.horizon`, with ``A = W_k^T W_q / sqrt(d_head)`` the matrix *in the
  exponent* (theory's convention; the authors' code leaves the ``1/sqrt(d_head)`` out, and that
  value is stored too) and ``Sigma`` the window's token covariance; the curve ``1/(2(1 + H^2))`` is
  :func:`theory.sample_complexity.predicted_moment_exponent`. Resampling from the window makes its
  empirical measure the exact limit (no finite reference sample).

The model is a dependency (``jaxattn.models.bert``); everything it feeds is an array, and the
protocol functions here (:func:`token_windows`, :func:`window_means`, :func:`slope_table`,
:func:`topn_study`, :func:`gradient_probes`, :func:`resampled_moment_errors`,
:func:`head_horizons`, :func:`moment_fits`) take arrays, so the tests run them on inputs with known
answers. The model runs in float32; the distances, KS tests and probes in float64.

Results: ``<out>/<preset>-<digest>.json`` (config, versions, every number, the claims read from
them by :func:`claims_text`), each study also written atomically to ``<preset>-<digest>.parts/``
as it finishes (a rerun of the same config and versions loads it). Plots:
:mod:`experiments.plot_minilm_dispersion` (``main`` draws them unless ``--no-plot``).

Usage::

  python -m experiments.minilm_dispersion --preset cpu --out results/minilm_dispersion
  python -m experiments.minilm_dispersion --preset gpu --out results/minilm_dispersion
  python -m experiments.minilm_dispersion --preset cpu --windows 8 --seed 1
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import jaxattn
from experiments import cli, files
from theory import dispersion as D
from theory import sample_complexity as sc

__all__ = [
    "Config", "PRESETS", "token_windows", "window_means", "slope_table", "topn_study",
    "published_corollary_3", "gradient_probes", "resampled_moment_errors", "head_horizons",
    "moment_fits",
]


def _geom(lo, hi, k):
    return tuple(int(round(n)) for n in np.geomspace(lo, hi, k))


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on (the JSON embeds it; its hash names the files).

    Lengths count every token the model sees, ``[CLS]`` and ``[SEP]`` included (so at most the
    512 positions MiniLM has; sentence-transformers fine-tuned it on 256).
    """

    preset: str = "cpu"
    seed: int = 0
    text: str = "shakespeare"  # "shakespeare" (experiments.corpus plays) or "pydoc"
    text_chars: int = 600_000  # characters of the text that are tokenized (windows come from them)
    # Velickovic et al.: entropy and max weight against L, all layers and heads
    lengths: tuple = (16, 32, 64, 128, 256, 512)
    windows: int = 4  # independent text windows per length (nested: one start, every length)
    # Mudarisov et al.
    topn_layers: tuple = (0, 2, 5)
    topn_lengths: tuple = (32, 64, 128, 256, 512)
    topn_windows: int = 2
    topn_queries: int = 128  # query rows per head and length (sampled from the windows)
    topn_ns: tuple = (1, 5, 10, 20, 100)
    critical_ns: tuple = (1, 2, 5, 10, 20, 50, 100, 200, 300, 400)  # KS grid, plus N = L itself
    alpha: float = 0.05
    probe_queries: int = 32  # logit rows per head, at the largest topn length
    probe_eps: tuple = (1e-3, 1e-1, 10.0)
    probe_temperatures: tuple = (0.1, 1.0)
    # Bohbot et al.: layer 0, tokens resampled with replacement
    bohbot_length: int = 512
    bohbot_windows: int = 1
    bohbot_ns: tuple = _geom(64, 384, 10)
    bohbot_replicates: int = 48
    out_dir: str = "results/minilm_dispersion"

    def __post_init__(self):
        def ints(name, values, lo, hi=None):
            if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                 or v < lo or (hi is not None and v > hi) for v in values):
                raise ValueError(f"{name} must be a non-empty tuple of ints in [{lo}, {hi}], got "
                                 f"{values!r}")

        if self.text not in ("shakespeare", "pydoc"):
            raise ValueError(f"text must be 'shakespeare' or 'pydoc', got {self.text!r}")
        ints("lengths", self.lengths, 3, 512)
        ints("topn_lengths", self.topn_lengths, 3, 512)
        ints("topn_ns", self.topn_ns, 1)
        ints("critical_ns", self.critical_ns, 1)
        ints("bohbot_ns", self.bohbot_ns, 2)
        ints("topn_layers", self.topn_layers, 0)
        for name in ("lengths", "topn_lengths", "bohbot_ns"):
            if len(getattr(self, name)) < 3:
                raise ValueError(f"{name} needs at least 3 values for a slope, got "
                                 f"{getattr(self, name)!r}")
        if not 3 <= self.bohbot_length <= 512:
            raise ValueError(f"bohbot_length must be in [3, 512], got {self.bohbot_length}")
        for name in ("windows", "topn_windows", "bohbot_replicates"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (standard errors need two), got "
                                 f"{getattr(self, name)}")
        for name in ("topn_queries", "probe_queries", "bohbot_windows", "text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if any(not e > 0 for e in self.probe_eps) or any(not t > 0 for t in self.probe_temperatures):
            raise ValueError(f"probe_eps and probe_temperatures must be > 0, got {self.probe_eps} "
                             f"and {self.probe_temperatures}")

    def digest(self) -> str:
        """A short hash of the fields that change the numbers (not ``out_dir``)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "out_dir"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


PRESETS = {
    # About 3 minutes on 2 CPU cores: every length for the dispersion study, three layers for
    # Mudarisov's protocol, one window and 48 replicates for Bohbot's.
    "cpu": Config(),
    # The full protocol: every layer, more windows and queries, Bohbot's 500 replicates.
    "gpu": Config(preset="gpu", windows=32, topn_layers=(0, 1, 2, 3, 4, 5), topn_windows=8,
                  topn_queries=1024, probe_queries=256, bohbot_windows=4, bohbot_replicates=500,
                  text_chars=2_000_000),
}


# ---------------------------------------------------------------------------------------------
# Protocol functions (arrays in, arrays out)


def token_windows(ids, length: int, count: int, seed: int, *, cls_id: int, sep_id: int,
                  slot: int | None = None):
    """Windows of real text as the encoder reads them: ``[CLS] t_s ... t_{s+L-3} [SEP]``.

    The token stream is cut into disjoint slots of ``slot - 2`` tokens (``slot`` defaults to
    ``length``); ``count`` slots are drawn without replacement by ``numpy.random.default_rng(seed)``
    and a window of length ``L`` takes the first ``L - 2`` tokens of its slot. With one ``slot``
    for every length, the windows of different lengths share their starts (nested prefixes), so
    trends in ``L`` are not confounded with which text was drawn.

    Args:
      ids: the token stream ``[M]`` (ints, no special tokens).
      length: ``L >= 3``, tokens per window including ``[CLS]`` and ``[SEP]``.
      count: windows.
      seed: the slots' draw.
      cls_id, sep_id: the special tokens' ids.
      slot: the slot length (``>= length``).

    Returns:
      int32 ``[count, length]``.
    """
    ids = np.asarray(ids)
    slot = length if slot is None else slot
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-d int array, got shape {ids.shape} dtype {ids.dtype}")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 3:
        raise ValueError(f"length must be an int >= 3 ([CLS], one token, [SEP]), got {length!r}")
    if slot < length:
        raise ValueError(f"slot must be >= length = {length}, got {slot}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    slots = ids.size // (slot - 2)
    if slots < count:
        raise ValueError(f"ids holds {slots} disjoint slots of {slot - 2} tokens, fewer than "
                         f"count = {count}: tokenize more text")
    chosen = np.random.default_rng(seed).choice(slots, size=count, replace=False)
    body = np.stack([ids[s * (slot - 2): s * (slot - 2) + length - 2] for s in chosen])
    cls = np.full((count, 1), cls_id, ids.dtype)
    sep = np.full((count, 1), sep_id, ids.dtype)
    return np.concatenate([cls, body, sep], axis=1).astype(np.int32)


def window_means(stats_per_layer) -> dict:
    """Per window, the mean over queries of each head's entropy and max weight.

    .. math:: \\bar H_{b,\\ell,h} = \\frac{1}{T} \\sum_i H_i, \\qquad
      \\bar m_{b,\\ell,h} = \\frac{1}{T} \\sum_i \\max_j p_{ij}

    Args:
      stats_per_layer: a list (one per layer) of :class:`jaxattn.AttentionStats` with fields
        ``[B, N, T]`` (``B`` windows, ``N`` heads, ``T`` queries).

    Returns:
      ``{"entropy": [B, layers, N], "max_weight": [B, layers, N]}`` float64 numpy arrays.
    """
    if not stats_per_layer:
        raise ValueError("stats_per_layer must hold one AttentionStats per layer, got none")
    out = {}
    for field in ("entropy", "max_weight"):
        arrays = [np.asarray(getattr(s, field), np.float64) for s in stats_per_layer]
        if any(a.ndim != 3 or a.shape != arrays[0].shape for a in arrays):
            raise ValueError(f"every layer's {field} must be [B, N, T] of one shape, got "
                             f"{[a.shape for a in arrays]}")
        out[field] = np.stack([a.mean(axis=-1) for a in arrays], axis=1)
    return out


def slope_table(x, mean, se, want: float, floor: float = D.DISPERSION_SLOPE_TOL,
                log_y: bool = False) -> dict:
    """Weighted least-squares slope of ``y`` on ``x`` for every cell, and theory's verdict on it.

    .. math:: y_c(x) = a_c + b_c x, \\quad \\text{weights } 1/\\mathrm{se}^2 \\qquad
      (y = \\log \\text{mean}, \\ \\mathrm{se}(y) = \\mathrm{se}/\\text{mean} \\text{ if log\\_y})

    Each cell's fit is :func:`theory.sample_complexity.wls_fit` and its verdict on "the slope is
    ``want``" is :func:`theory.sample_complexity.slope_verdict` with ``floor``. A standard error
    of exactly 0 (identical windows) is raised to ``1e-12 (1 + |y|)`` so the fit stays defined.

    Args:
      x: ``[K]`` abscissae (e.g. ``log L``), ``K >= 3``.
      mean: ``[K, ...]`` values per cell.
      se: ``[K, ...]`` their standard errors.
      want: the slope the claim predicts.
      floor: the verdict's floor.
      log_y: fit ``log mean`` instead of ``mean``.

    Returns:
      ``{"slope", "slope_se", "intercept", "chi2_red": float arrays [...], "verdict": nested
      lists of str [...]}``.
    """
    x = np.asarray(x, np.float64)
    mean, se = np.asarray(mean, np.float64), np.asarray(se, np.float64)
    if x.ndim != 1 or mean.shape[:1] != x.shape or se.shape != mean.shape:
        raise ValueError(f"x must be [K] and mean, se [K, ...] of one shape, got {x.shape}, "
                         f"{mean.shape}, {se.shape}")
    if log_y:
        if np.any(~(mean > 0)):
            raise ValueError("log_y needs mean > 0 in every cell")
        y, y_se = np.log(mean), se / mean
    else:
        y, y_se = mean, se
    cells = mean.shape[1:]
    y, y_se = y.reshape(x.size, -1), y_se.reshape(x.size, -1)
    y_se = np.where(y_se > 0, y_se, 1e-12 * (1 + np.abs(y)))
    fits = [sc.wls_fit(x, y[:, c], y_se[:, c]) for c in range(y.shape[1])]
    verdicts = np.asarray([sc.slope_verdict(f, want, floor) for f in fits], object)
    return {"slope": np.asarray([f.slope for f in fits]).reshape(cells),
            "slope_se": np.asarray([f.slope_se for f in fits]).reshape(cells),
            "intercept": np.asarray([f.intercept for f in fits]).reshape(cells),
            "chi2_red": np.asarray([f.chi2_red for f in fits]).reshape(cells),
            "verdict": verdicts.reshape(cells).tolist()}


def _ks_pvalues(a, b):
    """Two-sample KS p-values row by row: ``a, b [H, R]`` -> ``[H]`` (scipy, on the host)."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.asarray([stats.ks_2samp(a[h], b[h]).pvalue for h in range(a.shape[0])])


@jax.jit
def _ranks(scores):
    """Rank of each entry in its row, largest first, ties to the lower index (as ``lax.top_k``):
    ``rank < N`` is theory's :func:`theory.dispersion.top_n_mask` for every ``N`` at once."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    positions = jnp.broadcast_to(jnp.arange(scores.shape[-1], dtype=jnp.int32), scores.shape)
    # the inverse permutation of each row, by a scatter rather than a second sort
    return jnp.put_along_axis(jnp.zeros(scores.shape, jnp.int32), order, positions, axis=-1,
                              inplace=False)


@functools.partial(jax.jit, static_argnums=1)
def _noise_ranks(key, shape):
    """Ranks of the noise :func:`theory.dispersion.random_subset_mask` draws (i.i.d. float64
    Gaussians ``[prod(shape[:-1]), L]``, reshaped to ``shape``): ``rank < n`` is its uniform random
    ``n``-subset (the ``n`` largest; ties have probability 0)."""
    noise = jax.random.normal(key, (math.prod(shape[:-1]), shape[-1]), jnp.float64)
    return _ranks(noise).reshape(shape)


@jax.jit
def _window_distances(weights, x, mask, output):
    """Eq. 7's two readings for rows that share their window's token vectors.

    ``weights, mask [H, B, R, L]``, ``x [H, B, L, d]``, ``output = sum_i p_i x_i [H, B, R, d]``.
    With ``s = sum_{i in I} p_i x_i``: ``d_a = ||output - 2 s||`` (the rest is ``output - s``) and
    ``d_b = sum_{i not in I} sqrt(p_i^2 ||x_i||^2 - 2 p_i x_i . s + ||s||^2)``: batched matrix
    products over the window's ``L`` vectors instead of ``[H, B, R, L, d]`` products (the tests
    compare both with :func:`theory.dispersion.subset_distances`).
    """
    s = jnp.einsum("hbrl,hbld->hbrd", jnp.where(mask, weights, 0.0), x)
    d_a = jnp.linalg.norm(output - 2.0 * s, axis=-1)
    xs = jnp.einsum("hbld,hbrd->hbrl", x, s)
    x2 = jnp.sum(x * x, axis=-1)[:, :, None, :]
    s2 = jnp.sum(s * s, axis=-1)[..., None]
    each = jnp.sqrt(jnp.maximum(weights**2 * x2 - 2.0 * weights * xs + s2, 0.0))
    return d_a, jnp.sum(jnp.where(mask, 0.0, each), axis=-1)


def topn_study(key, weights, values, ns, critical_ns, alpha: float = 0.05) -> dict:
    """Mudarisov et al.'s top-N distances and critical N, per head, on real attention rows.

    For each ``N``, the Eq. 7 distances of the top-N set (theory's
    :func:`theory.dispersion.top_n_distances`)

    .. math:: d_a = \\Big\\|\\sum_{i \\notin I_N} p_i x_i - s\\Big\\|, \\quad
      d_b = \\sum_{i \\notin I_N} \\|p_i x_i - s\\|, \\quad s = \\sum_{i \\in I_N} p_i x_i

    and of a uniform random ``N``-subset (the ``N`` largest of i.i.d. float64 Gaussian noise drawn
    with ``fold_in(key, i)`` for the ``i``-th ``N`` of ``critical_ns``: the subset
    :func:`theory.dispersion.random_subset_mask` draws, as :func:`theory.dispersion.critical_n`
    does), compared head by head by a two-sample KS test over all rows; the critical ``N`` of a
    head is :func:`theory.dispersion.stable_critical` over ``critical_ns``. With one head and one
    window the p-values equal :func:`theory.dispersion.critical_n`'s on the same rows.

    Args:
      key: a JAX key.
      weights: ``[H, B, R, L]``: ``R`` attention rows per head in each of ``B`` windows.
      values: ``[H, B, L, d]``: each window's token vectors ``x_i``.
      ns: the ``N`` whose distances are reported (those ``> L`` are skipped).
      critical_ns: the KS grid (increasing, each ``<= L``).
      alpha: the KS level.

    Returns:
      A dict of numpy arrays: ``ns`` (those kept); ``top``, ``random`` each
      ``{"a": {"mean", "se"}, "b": {...}}`` with ``[len(ns), H]`` (over the ``B R`` rows);
      ``critical`` with ``ns`` (the grid), ``p_a``, ``p_b`` ``[len(grid), H]`` and ``a``, ``b``
      ``[H]`` (critical N, ``-1`` where the last p-value rejects).
    """
    weights, values = jnp.asarray(weights), jnp.asarray(values)
    if (weights.ndim != 4 or values.ndim != 4 or values.shape[:2] != weights.shape[:2]
            or values.shape[2] != weights.shape[3]):
        raise ValueError(f"weights must be [H, B, R, L] and values [H, B, L, d], got "
                         f"{weights.shape} and {values.shape}")
    H, L = weights.shape[0], weights.shape[-1]
    grid = tuple(int(n) for n in critical_ns)
    if not grid or any(n < 1 or n > L for n in grid) or list(grid) != sorted(set(grid)):
        raise ValueError(f"critical_ns must be increasing ints in [1, L] = [1, {L}], got {grid}")
    kept = tuple(int(n) for n in ns if n <= L)
    order = list(grid) + [n for n in kept if n not in grid]
    output = jnp.einsum("hbrl,hbld->hbrd", weights, values)
    top_rank = _ranks(weights)
    top, rand = {}, {}
    for i, n in enumerate(order):
        top[n] = [np.asarray(d).reshape(H, -1)
                  for d in _window_distances(weights, values, top_rank < n, output)]
        mask = _noise_ranks(jax.random.fold_in(key, i), weights.shape) < n
        rand[n] = [np.asarray(d).reshape(H, -1)
                   for d in _window_distances(weights, values, mask, output)]

    def moments(table):
        return {r: {"mean": np.stack([table[n][j].mean(axis=-1) for n in kept]),
                    "se": np.stack([table[n][j].std(axis=-1, ddof=1) / math.sqrt(table[n][j].shape[-1])
                                    for n in kept])}
                for j, r in enumerate("ab")}

    p = {r: np.stack([_ks_pvalues(top[n][j], rand[n][j]) for n in grid]) for j, r in enumerate("ab")}
    critical = {"ns": np.asarray(grid), "p_a": p["a"], "p_b": p["b"]}
    for r in "ab":
        found = [D.stable_critical(grid, p[r][:, h], alpha) for h in range(H)]
        critical[r] = np.asarray([-1 if c is None else c for c in found])
    return {"ns": np.asarray(kept), "top": moments(top), "random": moments(rand),
            "critical": critical}


def published_corollary_3(temperature):
    """Corollary 3's bound as published, ``min{1/(4T), sqrt 2}`` (refuted; kept for the count)."""
    return min(1.0 / (4.0 * float(temperature)), math.sqrt(2.0))


def gradient_probes(key, logits, temperatures, eps_values) -> dict:
    """Finite-difference probes of the softmax of real logit rows, against ``1/(2T)``.

    .. math:: r = \\frac{\\|p(l + \\varepsilon u) - p(l)\\|_2}{\\varepsilon}
      \\le \\sup \\|J\\|_2 = \\frac{1}{2T}, \\qquad p = \\text{softmax}(l / T)

    one random unit direction ``u`` per row (:func:`theory.dispersion.finite_difference_probe`,
    keyed by ``fold_in(key, j)`` for the ``j``-th ``(T, eps)`` pair). The corrected bound holds for
    every ``eps`` by the mean value inequality; Corollary 3's published ``min{1/(4T), sqrt 2}`` need
    not.

    Args:
      key: a JAX key.
      logits: ``[H, R, L]``: the head's logit rows (its scale included; ``T = 1`` is the model).
      temperatures: ``T > 0`` values dividing the logits.
      eps_values: step sizes.

    Returns:
      ``{"temperatures", "eps", "bound" [T], "published" [T], "max", "mean" [T, eps, H] ratios,
      "above_bound", "above_published" [T, eps] counts of rows, "rows"}`` (numpy).
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [H, R, L], got {logits.shape}")
    temps, eps_values = tuple(float(t) for t in temperatures), tuple(float(e) for e in eps_values)
    shape = (len(temps), len(eps_values), logits.shape[0])
    mx, mean = np.zeros(shape), np.zeros(shape)
    above, above_pub = np.zeros(shape[:2], int), np.zeros(shape[:2], int)
    j = 0
    for a, t in enumerate(temps):
        for b, eps in enumerate(eps_values):
            r = D.finite_difference_probe(jax.random.fold_in(key, j), logits, t, eps)
            ratio, bound = np.asarray(r.value, np.float64), float(np.asarray(r.bound).flat[0])
            mx[a, b], mean[a, b] = ratio.max(axis=-1), ratio.mean(axis=-1)
            # A float64 rounding allowance: the bound is attained only in the limit eps -> 0.
            above[a, b] = int(np.sum(ratio > bound * (1 + 1e-9)))
            above_pub[a, b] = int(np.sum(ratio > published_corollary_3(t)))
            j += 1
    return {"temperatures": np.asarray(temps), "eps": np.asarray(eps_values),
            "bound": np.asarray([1 / (2 * t) for t in temps]),
            "published": np.asarray([published_corollary_3(t) for t in temps]),
            "max": mx, "mean": mean, "above_bound": above, "above_published": above_pub,
            "rows": int(logits.shape[0] * logits.shape[1])}


def _moments(out):
    """Mean ``[..., N, H]`` and biased covariance ``[..., N, H, H]`` over the token axis ``-3``."""
    mean = jnp.mean(out, axis=-3)
    centred = out - mean[..., None, :, :]
    return mean, jnp.einsum("...tni,...tnj->...nij", centred, centred) / out.shape[-3]


def _self_attention(q, k, v, scale):
    """Softmax self-attention of one token set, ``[n, N, H]`` each -> ``[n, N, H]``, via jaxattn."""
    return jaxattn.attention(q[None], k[None], v[None], scale=scale, implementation="xla")[0]


@jax.jit
def _resampled_errors(q, k, v, idx, ref_mean, ref_cov, scale):
    """Mean and covariance errors ``[R, N]`` of the samples ``idx [R, n]`` (gathered inside the
    loop, 8 replicates at a time, so memory is ``8 N n^2`` weights, not ``R N n^2``)."""

    def one(i):
        return _moments(_self_attention(q[i], k[i], v[i], scale))

    mean, cov = jax.lax.map(one, idx, batch_size=8)
    return (jnp.linalg.norm(mean - ref_mean[None], axis=-1),
            jnp.linalg.norm(cov - ref_cov[None], axis=(-2, -1)))


def resampled_moment_errors(key, q, k, v, ns, replicates: int, scale: float) -> dict:
    """Bohbot et al.'s resampling estimator: moment errors of attention on ``n`` resampled tokens.

    The population is the ``P`` tokens of one window, with the layer's own projections
    ``q_j, k_j, v_j`` per head; its transformed distribution is ``o_j = sum_l softmax_l(scale
    q_j . k_l) v_l`` over all ``P``. For each ``n``, ``replicates`` samples of ``n`` indices drawn
    with replacement (``fold_in(key, i)`` for the ``i``-th ``n``) give the empirical measure
    ``mu_n`` and its transformed tokens ``Gamma_{mu_n}(y)`` for ``y`` in the sample; per head

    .. math:: e_{\\text{mean}} = \\|\\bar o^{(n)} - \\bar o\\|_2, \\qquad
      e_{\\text{cov}} = \\|\\mathrm{Cov}(o^{(n)}) - \\mathrm{Cov}(o)\\|_F

    (covariances biased, ``1/n``, as :func:`theory.sample_complexity.pushforward_moments`). With
    ``q = y A^T``, ``k = y``, ``v = y W_v^T`` and ``scale = 1`` these are
    :func:`theory.sample_complexity.pushforward_errors` of the resampled tokens.

    Args:
      key: a JAX key.
      q, k, v: ``[P, N, H]`` (``N`` heads).
      ns: sample sizes.
      replicates: samples per size.
      scale: the logit scale (``1/sqrt(H)`` for BERT).

    Returns:
      ``{"ns", "mean_error" [len(ns), replicates, N], "cov_error" [...], "ref_mean" [N, H],
      "ref_cov" [N, H, H]}`` (numpy).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k must be [P, N, H] of one shape and v [P, N, Hv], got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer)) or replicates < 2:
        raise ValueError(f"replicates must be an int >= 2, got {replicates!r}")
    if any(int(n) < 2 for n in ns):
        raise ValueError(f"every n must be >= 2 (a covariance), got {tuple(ns)}")
    ref_mean, ref_cov = _moments(_self_attention(q, k, v, scale))
    means, covs = [], []
    for i, n in enumerate(ns):
        idx = jax.random.randint(jax.random.fold_in(key, i), (replicates, int(n)), 0, q.shape[0])
        me, ce = _resampled_errors(q, k, v, idx, ref_mean, ref_cov, jnp.asarray(scale, q.dtype))
        means.append(np.asarray(me, np.float64))
        covs.append(np.asarray(ce, np.float64))
    return {"ns": np.asarray([int(n) for n in ns]), "mean_error": np.stack(means),
            "cov_error": np.stack(covs), "ref_mean": np.asarray(ref_mean),
            "ref_cov": np.asarray(ref_cov)}


def head_horizons(x, wq, wk, scale: float) -> dict:
    """Each head's horizon ``H = ||Sigma^(1/2) A Sigma^(1/2)||_2`` on a window's tokens.

    For a layer with query and key kernels ``W_q, W_k [D, N, H]`` (``q = x W_q + b_q``), head
    ``h``'s logit between a query token ``x`` and a key token ``y`` is
    ``scale (x W_q^h + b_q^h) . (y W_k^h + b_k^h)``; the part that varies with both is
    ``<A x, y>`` with

    .. math:: A_h = \\text{scale} \\; W_k^h (W_q^h)^T \\quad [D, D]

    (theory's convention: ``A`` is the matrix in the exponent, ``1/sqrt(d_head)`` included; the
    biases add terms linear in ``y`` or constant, which the horizon ignores, as the authors'
    does). ``Sigma`` is the tokens' biased covariance; ``H`` is
    :func:`theory.sample_complexity.horizon`. The authors' code uses ``W_k^T W_q`` without the
    scale: their value is ``H / scale``.

    Args:
      x: tokens ``[P, D]`` (the layer's input).
      wq, wk: kernels ``[D, N, H]``.
      scale: the logit scale.

    Returns:
      ``{"horizon": [N], "horizon_authors": [N], "predicted_beta": [N]}`` (numpy, float64).
    """
    x = np.asarray(x, np.float64)
    wq, wk = np.asarray(wq, np.float64), np.asarray(wk, np.float64)
    if x.ndim != 2 or wq.ndim != 3 or wk.shape != wq.shape or wq.shape[0] != x.shape[1]:
        raise ValueError(f"x must be [P, D] and wq, wk [D, N, H] of one shape, got {x.shape}, "
                         f"{wq.shape}, {wk.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"x needs at least 2 tokens for a covariance, got {x.shape[0]}")
    centred = x - x.mean(axis=0, keepdims=True)
    cov = centred.T @ centred / x.shape[0]
    h = np.asarray([sc.horizon(scale * wk[:, n, :] @ wq[:, n, :].T, cov)
                    for n in range(wq.shape[1])])
    return {"horizon": h, "horizon_authors": h / scale,
            "predicted_beta": np.asarray(sc.predicted_moment_exponent(h))}


def moment_fits(ns, errors, predicted_beta) -> dict:
    """Per head: the log-log slope of an error against ``n`` and theory's verdicts on it.

    The mean over replicates and its standard error per ``n`` (:func:`theory.sample_complexity.estimate`)
    are fitted by :func:`theory.sample_complexity.loglog_slope`; the verdicts are
    :func:`theory.sample_complexity.slope_verdict` on the slope ``-1/2`` and on
    ``-1/(2(1 + H^2))`` (the authors' comparison curve).

    Args:
      ns: ``[K]`` sample sizes.
      errors: ``[K, R, N]`` errors (``R`` replicates, ``N`` heads).
      predicted_beta: ``[N]`` the curve's exponent per head.

    Returns:
      ``{"mean", "se": [K, N], "slope", "slope_se", "chi2_red": [N], "verdict_half",
      "verdict_curve": lists of str [N]}``.
    """
    errors = np.asarray(errors, np.float64)
    pred = np.asarray(predicted_beta, np.float64)
    if errors.ndim != 3 or errors.shape[0] != len(ns) or pred.shape != errors.shape[2:]:
        raise ValueError(f"errors must be [len(ns), R, N] and predicted_beta [N], got "
                         f"{errors.shape} and {pred.shape} for {len(ns)} ns")
    est = sc.estimate(errors, axis=1)
    fits = [sc.loglog_slope(ns, est.mean[:, h], est.se[:, h]) for h in range(errors.shape[2])]
    return {"mean": est.mean, "se": est.se, "slope": np.asarray([f.slope for f in fits]),
            "slope_se": np.asarray([f.slope_se for f in fits]),
            "chi2_red": np.asarray([f.chi2_red for f in fits]),
            "verdict_half": [sc.slope_verdict(f, -0.5) for f in fits],
            "verdict_curve": [sc.slope_verdict(f, -float(b)) for f, b in zip(fits, pred, strict=True)]}


# ---------------------------------------------------------------------------------------------
# The model: what the protocols need of it


@nnx.jit
def _layer_projections(model, input_ids):
    """Per layer, its input ``x [B, T, F]`` and its own ``q, k, v [B, T, N, H]`` (biases included).

    Runs the encoder layer by layer through its public modules (``model.embeddings``,
    ``model.layers[i]`` and each layer's ``attention.query/key/value``), with every key visible
    (windows carry no padding), as :meth:`jaxattn.models.bert.BertModel.__call__` does.
    """
    mask = jnp.ones((input_ids.shape[0], 1, 1, input_ids.shape[1]), jnp.bool_)
    x = model.embeddings(input_ids, jnp.zeros(input_ids.shape, jnp.int32))
    out = []
    for layer in model.layers:
        att = layer.attention
        out.append((x, att.query(x), att.key(x), att.value(x)))
        x, _ = layer(x, mask)
    return out


def load_text(config: Config) -> str:
    """The text the windows come from: the first ``text_chars`` characters of the corpus."""
    from experiments import corpus

    text = ("\n".join(corpus.shakespeare_plays().values()) if config.text == "shakespeare"
            else corpus.pydoc_text())
    return text[:config.text_chars]


def token_stream(tokenizer, text: str) -> np.ndarray:
    """The whole text as one token stream (no special tokens, no truncation), int32 ``[M]``.

    A copy of the tokenizer is used: the model's truncates at 256 tokens.
    """
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int32)


class Encoder(NamedTuple):
    """The loaded model and what the studies read from it."""

    model: object  # jaxattn.models.bert.BertModel
    tokenizer: object
    cls_id: int
    sep_id: int
    scale: float  # the attention logit scale, 1/sqrt(head_dim)


def minilm_encoder() -> Encoder:
    """all-MiniLM-L6-v2 from the installed package (:func:`jaxattn.models.bert.load_minilm`)."""
    from jaxattn.models import bert

    model, tokenizer = bert.load_minilm()
    return Encoder(model, tokenizer, tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]"),
                   1.0 / math.sqrt(model.config.head_dim))


def _bar(iterable, desc, progress):
    return tqdm(iterable, desc=desc, leave=False, disable=not progress, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The studies


def dispersion_study(config: Config, enc: Encoder, ids, key, progress=True) -> dict:
    """Velickovic et al.'s Theorem 2.2 on MiniLM: mean entropy and max weight per layer and head
    against ``L`` (from :func:`jaxattn.models.bert.attention_stats`), and their slopes."""
    from jaxattn.models import bert

    del key  # the windows' draw is the only randomness (numpy, seeded by config.seed)
    per = []
    for L in _bar(config.lengths, "dispersion: L", progress):
        windows = token_windows(ids, L, config.windows, config.seed, cls_id=enc.cls_id,
                                sep_id=enc.sep_id, slot=max(config.lengths))
        per.append(window_means(bert.attention_stats(enc.model, windows)))
    lengths = np.asarray(config.lengths, np.float64)
    out = {"lengths": lengths.tolist()}
    for field, want, log_y in (("entropy", 1.0, False), ("max_weight", -1.0, True)):
        values = np.stack([p[field] for p in per])  # [K, B, layers, N]
        mean = values.mean(axis=1)
        se = values.std(axis=1, ddof=1) / math.sqrt(values.shape[1])
        out[field] = {"mean": mean, "se": se, "per_window": values,
                      "fit": slope_table(np.log(lengths), mean, se, want, log_y=log_y),
                      "want_slope": want}
    return out


def _rows(weights, values, logits, rows, rng):
    """``rows // B`` queries sampled per window (all of them if fewer), shared by every head:
    ``[N, B, R, L]`` weights and logits and the windows' values ``[N, B, L, H]`` (float64 numpy)."""
    B, N, T, S = weights.shape
    per = min(max(rows // B, 1), T)
    pick = np.stack([np.sort(rng.choice(T, size=per, replace=False)) for _ in range(B)])
    take = np.arange(B)[:, None]
    w = np.asarray(weights, np.float64)[take, :, pick, :].transpose(2, 0, 1, 3)
    lg = np.asarray(logits, np.float64)[take, :, pick, :].transpose(2, 0, 1, 3)
    v = np.asarray(values, np.float64).transpose(2, 0, 1, 3)
    return w, lg, v


def topn_study_model(config: Config, enc: Encoder, ids, key, progress=True) -> dict:
    """Mudarisov et al.'s protocol on MiniLM: top-N distances and critical N against ``L`` for the
    chosen layers and every head, and finite-difference probes at the largest ``L``."""
    from jaxattn.models import bert

    layers = tuple(config.topn_layers)
    if max(layers) >= len(enc.model.layers):
        raise ValueError(f"topn_layers {layers} names a layer past the model's "
                         f"{len(enc.model.layers)}")
    rng = np.random.default_rng(config.seed + 1)
    per_length, probes, spread, consistency = [], None, [], 0.0
    for li, L in enumerate(_bar(config.topn_lengths, "top-N: L", progress)):
        windows = token_windows(ids, L, config.topn_windows, config.seed + 1, cls_id=enc.cls_id,
                                sep_id=enc.sep_id, slot=max(config.topn_lengths))
        proj = _layer_projections(enc.model, jnp.asarray(windows))
        stats = bert.attention_stats(enc.model, windows)
        grid = tuple(n for n in config.critical_ns if n < L) + (L,)
        rows_at_l, spread_at_l = [], []
        for layer in _bar(layers, f"top-N: layers at L={L}", progress):
            _, q, k, v = proj[layer]
            weights, st = jaxattn.attention_weights(q, k, scale=enc.scale, return_stats=True)
            # The model's own stats and those of the weights rebuilt here must agree: this checks
            # that q, k and the scale are the layer's.
            consistency = max(consistency, float(jnp.max(jnp.abs(st.entropy
                                                                  - stats[layer].entropy))))
            logits = enc.scale * jnp.einsum("BTNH,BSNH->BNTS", q, k)
            gap = jnp.max(logits, -1) - jnp.min(logits, -1)  # [B, N, T]
            spread_at_l.append({"mean": np.asarray(jnp.mean(gap, axis=(0, 2))),
                                "max": np.asarray(jnp.max(gap, axis=(0, 2)))})
            w, lg, x = _rows(weights, v, logits, config.topn_queries, rng)
            with jax.enable_x64(True):
                study = topn_study(jax.random.fold_in(key, 100 * li + layer), w, x, config.topn_ns,
                                   grid, config.alpha)
                if L == max(config.topn_lengths):
                    if probes is None:
                        probes = {}
                    flat = lg.reshape(lg.shape[0], -1, lg.shape[-1])[:, :config.probe_queries]
                    probes[layer] = gradient_probes(jax.random.fold_in(key, 10_000 + layer), flat,
                                                    config.probe_temperatures, config.probe_eps)
            rows_at_l.append(study)
        per_length.append(rows_at_l)
        spread.append(spread_at_l)
    return _topn_summary(config, layers, per_length, spread, probes, consistency)


def _topn_summary(config, layers, per_length, spread, probes, consistency) -> dict:
    """Arrays over ``(L, layer, head)`` and the slopes of log distance on log L per N."""
    lengths = np.asarray(config.topn_lengths, np.float64)
    out = {"layers": list(layers), "lengths": lengths.tolist(), "ns": list(config.topn_ns),
           "entropy_check_max_abs": consistency,
           "spread": {s: np.stack([[sp[s] for sp in at_l] for at_l in spread]) for s in ("mean", "max")}}
    for kind in ("top", "random"):
        out[kind] = {}
        for r in "ab":
            # [L, N, layer, head], NaN where N > L
            heads = per_length[0][0]["top"]["a"]["mean"].shape[1]
            mean = np.full((len(lengths), len(config.topn_ns), len(layers), heads), np.nan)
            se = np.full_like(mean, np.nan)
            for a, at_l in enumerate(per_length):
                for c, st in enumerate(at_l):
                    for j, n in enumerate(st["ns"]):
                        b = config.topn_ns.index(int(n))
                        mean[a, b, c], se[a, b, c] = st[kind][r]["mean"][j], st[kind][r]["se"][j]
            out[kind][r] = {"mean": mean, "se": se}
    fits = {}
    for r in "ab":
        fits[r] = []
        for b, n in enumerate(config.topn_ns):
            keep = lengths >= n
            if keep.sum() < 3:
                fits[r].append(None)
                continue
            fits[r].append(slope_table(np.log(lengths[keep]), out["top"][r]["mean"][keep, b],
                                       out["top"][r]["se"][keep, b], want=0.0, log_y=True))
    out["top_fit"] = fits
    out["critical"] = {
        "grids": [at_l[0]["critical"]["ns"] for at_l in per_length],
        **{r: np.stack([[st["critical"][r] for st in at_l] for at_l in per_length]) for r in "ab"},
        **{f"p_{r}": [[st["critical"][f"p_{r}"] for st in at_l] for at_l in per_length] for r in "ab"},
    }
    out["probes"] = {"layers": sorted(probes), **{
        k: (probes[layers[0]][k] if k in ("temperatures", "eps", "bound", "published") else
            np.stack([probes[la][k] for la in sorted(probes)]))
        for k in ("temperatures", "eps", "bound", "published", "max", "mean", "above_bound",
                  "above_published", "rows")}}
    return out


def bohbot_study(config: Config, enc: Encoder, ids, key, progress=True) -> dict:
    """Bohbot et al.'s BERT protocol on MiniLM's layer 0: moment errors of resampled tokens per
    head against ``n``, their slopes, and each head's horizon."""
    windows = token_windows(ids, config.bohbot_length, config.bohbot_windows, config.seed + 2,
                            cls_id=enc.cls_id, sep_id=enc.sep_id)
    x0, q, k, v = _layer_projections(enc.model, jnp.asarray(windows))[0]
    att = enc.model.layers[0].attention
    wq, wk = np.asarray(att.query.kernel[...]), np.asarray(att.key.kernel[...])
    out = []
    for w in _bar(range(config.bohbot_windows), "Bohbot: windows", progress):
        hor = head_horizons(x0[w], wq, wk, enc.scale)
        err = resampled_moment_errors(jax.random.fold_in(key, w), q[w], k[w], v[w],
                                      config.bohbot_ns, config.bohbot_replicates, enc.scale)
        out.append({**hor, "ns": err["ns"],
                    "mean": moment_fits(err["ns"], err["mean_error"], hor["predicted_beta"]),
                    "cov": moment_fits(err["ns"], err["cov_error"], hor["predicted_beta"])})
    return {"layer": 0, "windows": out,
            "horizon_convention": "H = ||Sigma^(1/2) A Sigma^(1/2)||_2, A = W_k^T W_q / sqrt(d_head) "
                                  "(theory.sample_complexity; the authors' code: H * sqrt(d_head))"}


# (name, function, fold_in index of its key): the run order.
STUDIES = (("dispersion", "dispersion_study", 0), ("topn", "topn_study_model", 1),
           ("bohbot", "bohbot_study", 2))


# ---------------------------------------------------------------------------------------------
# Files


def versions() -> dict:
    """Versions of everything that could change the numbers."""
    return files.versions("flax", "scipy", "tokenizers")


result_path = files.result_path
parts_dir = files.parts_dir


# ---------------------------------------------------------------------------------------------
# Running


def run(config: Config, *, resume: bool = True, progress: bool = True, say=print,
        encoder: Encoder | None = None) -> dict:
    """Runs the three studies (model in float32) and returns the results dict.

    Each finished study is written at once to :func:`parts_dir`; with ``resume``, one already
    there for this config and these versions is loaded instead of recomputed.
    """
    t0 = time.perf_counter()
    vers = versions()
    identity = files.identity(config, vers)
    key = jax.random.key(config.seed)
    out = {"experiment": "minilm_dispersion", "config": dataclasses.asdict(config),
           "versions": vers}
    timing, loaded = {}, []
    with jax.enable_x64(False):
        enc = minilm_encoder() if encoder is None else encoder
        ids = token_stream(enc.tokenizer, load_text(config))
        out["model"] = {"name": "all-MiniLM-L6-v2", "kind": "encoder (bidirectional, no causal mask)",
                        "layers": len(enc.model.layers),
                        "heads": enc.model.config.num_attention_heads,
                        "head_dim": enc.model.config.head_dim, "scale": enc.scale,
                        "text": config.text, "text_tokens": int(ids.size)}
        for name, fn_name, k in STUDIES:
            path = parts_dir(config) / f"{name}.json"
            result = files.resume_part(path, identity, "result", say) if resume else None
            if result is not None:
                loaded.append(name)
                say(f"{name}: loaded from {path}")
            else:
                t1 = time.perf_counter()
                # Looked up by name at call time, so a caller (or test) can replace a study.
                result = globals()[fn_name](config, enc, ids, jax.random.fold_in(key, k), progress)
                # Through JSON, so a fresh study and one loaded from its part are the same values.
                result = json.loads(json.dumps(files.jsonable(result)))
                files.write_part(path, identity, "result", result)
                timing[name] = time.perf_counter() - t1
                say(f"{name}: {timing[name]:.1f} s, wrote {path}")
            out[name] = result
    out["claims"] = claims_text(out)
    # Seconds are the only numbers that differ between runs of one config.
    out["timing"] = {"wall_s": time.perf_counter() - t0, "studies_s": timing, "loaded": loaded}
    return out


def save(results: dict, config: Config) -> pathlib.Path:
    """Writes the results JSON (atomically); returns its path."""
    path = result_path(config)
    files.write_atomic(path, json.dumps(files.jsonable(results), indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# Claims, read from the numbers


def _counts(verdicts) -> str:
    flat = list(np.asarray(verdicts, object).ravel())
    return ", ".join(f"{flat.count(v)} {v}" for v in ("verified", "inconclusive", "refuted")
                     if flat.count(v))


def _share(mask) -> str:
    mask = np.asarray(mask, bool)
    return f"{int(mask.sum())}/{mask.size}"


def _status(mask) -> str:
    """``holds`` if every cell shows it, ``not observed`` if none does, else ``partly``."""
    mask = np.asarray(mask, bool)
    return "holds" if mask.all() else ("not observed" if not mask.any() else "partly")


def claims(results: dict) -> list[dict]:
    """The papers' claims, each with a status and the numbers behind it, from ``results`` alone.

    Rules: a slope "falls" or "rises" when it is beyond 3 standard errors from 0; "consistent
    with" a rate is theory's :func:`theory.sample_complexity.slope_verdict`; a claim over heads
    ``holds`` when every head shows it, is ``not observed`` when none does, else ``partly``.
    """
    from scipy import stats

    out = []
    if "dispersion" in results:
        d = results["dispersion"]
        L = np.asarray(d["lengths"])
        mw, ent = d["max_weight"]["fit"], d["entropy"]["fit"]
        falling = np.asarray(mw["slope"]) + 3 * np.asarray(mw["slope_se"]) < 0
        rising = np.asarray(ent["slope"]) - 3 * np.asarray(ent["slope_se"]) > 0
        gap = np.log(L)[:, None, None] * np.ones_like(np.asarray(d["entropy"]["mean"])) \
            - np.asarray(d["entropy"]["mean"])
        out.append({
            "source": "Velickovic et al., Theorem 2.2",
            "claim": f"every head disperses as L grows (L = {int(L[0])}..{int(L[-1])})",
            "status": _status(falling & rising),
            "numbers": (f"mean max weight falls in {_share(falling)} heads (median log-log slope "
                        f"{np.median(mw['slope']):.2f}; slope -1: {_counts(mw['verdict'])}); "
                        f"entropy rises with log L in {_share(rising)} (median slope "
                        f"{np.median(ent['slope']):.2f}; slope 1: {_counts(ent['verdict'])}); "
                        f"log L - entropy, median over heads: {np.median(gap[0]):.2f} at "
                        f"L={int(L[0])}, {np.median(gap[-1]):.2f} at L={int(L[-1])}")})
    if "topn" in results:
        t = results["topn"]
        L = np.asarray(t["lengths"])
        cells, parts = [], []
        for r in "ab":
            for n, fit in zip(t["ns"], t["top_fit"][r], strict=True):
                if fit is None:
                    continue
                grows = np.asarray(fit["slope"]) - 3 * np.asarray(fit["slope_se"]) > 0
                cells.append(grows.ravel())
                parts.append(f"({r}) N={n}: {_share(grows)}, median slope "
                             f"{np.median(fit['slope']):.2f}")
        grows = np.concatenate(cells) if cells else np.zeros(0, bool)
        out.append({
            "source": "Mudarisov et al., top-N distance",
            "claim": f"the top-N distance grows with L at fixed N (layers {t['layers']})",
            "status": _status(grows),
            "numbers": "heads whose log-log slope in L is > 0 beyond 3 SE: " + "; ".join(parts)})
        crit = np.asarray(t["critical"]["b"], np.float64)  # [L, layer, head]
        below = crit < L[:, None, None]
        ratio = np.median(crit.reshape(len(L), -1) / L[:, None], axis=1)
        out.append({
            "source": "Mudarisov et al., critical N (KS test, reading b)",
            "claim": "top-N and random-N distances become indistinguishable at some N < L",
            "status": _status(below),
            "numbers": (f"merges before N = L in {_share(below)} (L, layer, head) cells; median "
                        "critical N / L: " + ", ".join(f"{v:.2f} (L={int(x)})"
                                                       for x, v in zip(L, ratio, strict=True)))})
        p = t["probes"]
        bound, mx = np.asarray(p["bound"]), np.asarray(p["max"])  # mx [layers, T, eps, heads]
        worst = float(np.max(mx / bound[None, :, None, None]))
        above, above_pub = int(np.sum(p["above_bound"])), int(np.sum(p["above_published"]))
        total = int(np.sum(p["rows"])) * len(p["temperatures"]) * len(p["eps"])
        out.append({
            "source": "Mudarisov et al., Corollary 3 corrected (theory)",
            "claim": "finite-difference probes stay below 1/(2T)",
            "status": "holds" if above == 0 else "refuted",
            "numbers": (f"{above}/{total} probes above 1/(2T), largest ratio to it {worst:.3f} "
                        f"(T in {p['temperatures']}, eps in {p['eps']}); {above_pub} above "
                        "the published min{1/(4T), sqrt 2}")})
        out.append({
            "source": "Mudarisov et al., Corollary 3 as published",
            "claim": "||dp/dl|| <= min{1/(4T), sqrt 2} on the probes",
            "status": "refuted" if above_pub else "not contradicted by these probes",
            "numbers": f"{above_pub}/{total} probes above it"})
    if "bohbot" in results:
        b = results["bohbot"]
        h = np.concatenate([w["horizon"] for w in b["windows"]])
        for moment in ("mean", "cov"):
            slope = np.concatenate([w[moment]["slope"] for w in b["windows"]])
            se = np.concatenate([w[moment]["slope_se"] for w in b["windows"]])
            half = sum((w[moment]["verdict_half"] for w in b["windows"]), [])
            curve = sum((w[moment]["verdict_curve"] for w in b["windows"]), [])
            beta = -slope
            below = beta + 3 * se < 0.5
            rho = stats.spearmanr(h, beta).statistic if h.size > 2 else float("nan")
            out.append({
                "source": f"Bohbot et al., layer 0, {moment} error",
                "claim": "converges at n^-beta with beta < 1/2, beta near 1/(2(1+H^2))",
                "status": _status(below),
                "numbers": (f"beta below 1/2 beyond 3 SE in {_share(below)} heads (median beta "
                            f"{np.median(beta):.3f}, range [{beta.min():.3f}, {beta.max():.3f}]); "
                            f"slope -1/2: {_counts(half)}; slope -1/(2(1+H^2)): {_counts(curve)}; "
                            f"H in [{h.min():.2f}, {h.max():.2f}], Spearman(H, beta) = {rho:.2f}")})
    return out


def claims_text(results: dict) -> list[str]:
    """One line per claim: whether it holds on this encoder, and the numbers that say so."""
    return [f"{c['source']}: {c['claim']}: **{c['status']}** ({c['numbers']})"
            for c in claims(results)]


_FIGURE_TEXT = (
    ("dispersion", "dispersion", "each head's mean entropy against L beside log L, and its mean "
     "max weight beside 1/L (Velickovic et al.'s Theorem 2.2: bounded logits disperse)"),
    ("topn", "topn", "the top-N distances against L beside a random N-subset's, and the critical N "
     "of the KS test (Mudarisov et al.: normalisation cannot single out N tokens as L grows)"),
    ("probes", "topn", "finite-difference probes of the heads' logit rows against the corrected "
     "Jacobian bound 1/(2T) and the published min{1/(4T), sqrt 2}"),
    ("bohbot", "bohbot", "layer 0's moment errors against n and the fitted exponents against the "
     "horizon H (Bohbot et al.: beta below 1/2, near 1/(2(1 + H^2)))"),
)


def report_section(results_json_path, base_dir=None) -> str:
    """A markdown section: per-layer dispersion at the shortest and longest L, the plots, the claims.

    The plots' paths are relative to ``base_dir`` (default: the folder above the JSON's).
    """
    path = pathlib.Path(results_json_path)
    results = json.loads(path.read_text())
    base = path.parent.parent if base_dir is None else pathlib.Path(base_dir)
    m, cfg = results["model"], results["config"]
    lines = ["## Dispersion and sample complexity on all-MiniLM-L6-v2", "",
             f"A pretrained {m['kind']} ({m['layers']} layers, {m['heads']} heads of "
             f"{m['head_dim']} dims) reading {m['text_tokens']} tokens of {m['text']}; Mudarisov "
             "et al. used GPT-2, a decoder, so here every query sees every key of its window.", ""]
    if "dispersion" in results:
        d = results["dispersion"]
        L = d["lengths"]
        ent = np.asarray(d["entropy"]["mean"])  # [L, layers, heads]
        mw = np.asarray(d["max_weight"]["mean"])
        lines += [f"Mean over heads and {cfg['windows']} windows per length "
                  f"(log L = {math.log(L[0]):.2f} and {math.log(L[-1]):.2f}; 1/L = {1 / L[0]:.4f} "
                  f"and {1 / L[-1]:.4f}):", "",
                  f"| layer | entropy L={int(L[0])} | entropy L={int(L[-1])} | max weight "
                  f"L={int(L[0])} | max weight L={int(L[-1])} |", "|---|---|---|---|---|"]
        for layer in range(ent.shape[1]):
            lines.append(f"| {layer} | {ent[0, layer].mean():.3f} | {ent[-1, layer].mean():.3f} | "
                         f"{mw[0, layer].mean():.3f} | {mw[-1, layer].mean():.3f} |")
        lines.append("")
    for fig, study, what in _FIGURE_TEXT:
        if study in results:
            rel = os.path.relpath(path.with_name(f"{path.stem}-{fig}.png"), base)
            lines += [f"![{fig}]({rel})", "", f"The plot shows {what}.", ""]
    lines += [f"- {line}" for line in results["claims"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI


def _parser():
    return cli.parser("experiments.minilm_dispersion", __doc__, Config, PRESETS, default="cpu")


def config_from_args(argv=None):
    """The preset with the command line's overrides, and the parsed arguments."""
    args = _parser().parse_args(argv)
    return cli.config(args, Config, PRESETS), args


def main(argv=None) -> pathlib.Path:
    config, args = config_from_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results = run(config, resume=not args.no_resume, progress=not args.no_progress, say=say)
    path = save(results, config)
    print(f"wrote {path} ({results['timing']['wall_s']:.1f} s)")
    if not args.no_plot:
        from experiments import plot_minilm_dispersion

        for png in plot_minilm_dispersion.plot(path):
            print(f"wrote {png}")
    for line in results["claims"]:
        print(f"- {line}")
    return path


if __name__ == "__main__":
    main()
