"""The experiments' reading of numbers over seeds: 95 % t-intervals and one-sided verdicts."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["t975", "mean_ci", "verdict", "over_seeds"]


def t975(n: int) -> float:
    """The 97.5 % quantile of Student's t with ``n - 1`` degrees of freedom (nan for ``n < 2``)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of the 95 % t-interval, ``t975(n) s / sqrt(n)`` (nan with one value)."""
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), t975(x.size) * float(x.std(ddof=1)) / math.sqrt(x.size)


def verdict(diffs, what: str) -> dict:
    """A one-sided reading of per-seed differences, positive in the claim's direction.

    ``holds`` when the 95 % interval lies above 0, ``same direction, not significant at 95 %``
    when only the mean does, else ``does not hold`` (one seed: the sign alone, said so).
    """
    mean, half = mean_ci(diffs)
    if not np.isfinite(half):
        status = "holds (one seed, no interval)" if mean > 0 else "does not hold (one seed)"
    elif mean - half > 0:
        status = "holds"
    elif mean > 0:
        status = "same direction, not significant at 95 %"
    else:
        status = "does not hold"
    return {"claim": what, "status": status, "mean_diff": mean, "ci95": half,
            "per_seed": [float(d) for d in diffs]}


def over_seeds(rows) -> tuple[list, list]:
    """Per column of ``rows [seeds, points]``: the means and the interval half-widths."""
    arr = np.asarray(rows, np.float64)
    pairs = [mean_ci(arr[:, j]) for j in range(arr.shape[1])]
    return [m for m, _ in pairs], [h for _, h in pairs]
