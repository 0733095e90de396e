"""The claim table's statuses are what these tests assert: each row function runs at CI size.

Statistical rows (slopes, exponents, Monte Carlo means) are asserted here, with fixed PRNG keys;
exact rows are also covered by the hypothesis property tests in test_theory_dispersion.py,
test_theory_sample_complexity.py and test_theory_hardmax.py.
"""

import jax
import numpy as np
import pytest

from theory import check
from theory import hardmax as hm
from theory import sample_complexity as sc

EXPECTED = {
    "row_lemma_2_1": "verified",
    "row_tight_max": "verified",
    "row_entropy_floor": "verified",
    "row_entropy_derivative": "verified",
    "row_theorem_2_2": "verified",
    "row_prop_3_1": "verified",
    "row_adaptive_entropy": "verified",
    "row_adaptive_argmax": "verified",
    "row_adaptive_beta": "verified",
    "row_adaptive_disperses": "verified",
    "row_adaptive_band": "verified",
    "row_ssmax": "verified",
    "row_ssmax_headline": "verified",
    "row_rbf": "verified",
    "row_rbf_sink": "verified",
    "row_lemma_1": "verified",
    "row_corollary_1": "verified",
    "row_topn_length_b": "verified",
    "row_topn_length_a": "refuted",  # finding: reading (a) is not monotone in L
    "row_topn_collapse": "verified (b) / refuted (a)",  # finding: (a) tends to ||output||, not 0
    "row_subset": "verified",
    "row_distinguishable": "measured",
    "row_corollary_3": "refuted",  # finding: ||J||_2 reaches 1/(2T)
    "row_corollary_3_corrected": "verified",
    "row_fd_probe": "verified",
    "row_critical_n": "measured",
    "row_bessel": "verified",
    "row_gamma_exact": "verified",
    "row_rate": "verified",
    "row_rate_large_radius": "measured",
    "row_growth": "verified",
    "row_moment_below_half": "measured",  # beta < 1/2 is a rate bound: the exponent is reported
    "row_moment_curve": "measured",
    "row_softmax_gap": "verified",
    "row_lambda_rate": "verified",
    "row_hardmax_n": "verified",
    "row_scale_sweep": "verified",
    "row_mse_constant": "verified",
    "row_log_rate": "measured",
}


def test_every_row_has_an_expected_status():
    assert sorted(fn.__name__ for fn in check.ROWS) == sorted(EXPECTED)


@pytest.mark.parametrize("row", check.ROWS, ids=lambda fn: fn.__name__)
def test_row_status(row):
    with jax.enable_x64(True):
        result = row(check.CI)
    assert result.status == EXPECTED[row.__name__], result


def test_format_table():
    rows = [check.Row("a claim", "a source", "verified", "1 < 2")]
    assert check.format_table(rows).splitlines()[2] == "| a claim | a source | verified | 1 < 2 |"


@pytest.mark.parametrize("values, ses, want", [
    ([1.0, 2.0, 4.0], [0.1, 0.1, 0.1], "verified"),
    ([1.0, 2.0, 1.0], [0.1, 0.1, 0.1], "refuted"),  # one step down beyond the noise
    ([1.0, 1.1, 2.0], [0.1, 0.1, 0.1], "inconclusive"),  # one step up within 3 SE
    ([1.0, np.nan, 2.0], [0.1, 0.1, 0.1], "refuted"),  # a broken estimate never passes
    ([1.0, 2.0], [0.1, np.inf], "refuted"),
])
def test_trend_status(values, ses, want):
    assert check._trend_status(values, ses) == want


def _growth(c):
    fit = sc.Fit(0.0, 0.0, 0.0, 0.0, 1.0)
    c = np.asarray(c, np.float64)
    return sc.GrowthStudy(np.arange(1.0, c.size + 1), c, np.full(c.size, 0.01), np.zeros(c.size),
                          np.zeros(c.size), fit, fit)


def test_growth_row_sees_a_falling_c():
    # The row's status comes from the data: a C(R) that falls for one token kind refutes it.
    rising, falling = _growth([1.0, 2.0, 3.0]), _growth([3.0, 2.0, 1.0])
    assert check.row_growth(check.CI, data=(rising, rising)).status == "verified"
    assert check.row_growth(check.CI, data=(rising, falling)).status == "refuted"
    assert check.row_growth(check.CI, data=(_growth([1.0, 1.01, 3.0]), rising)).status == "inconclusive"


def test_scale_sweep_row_sees_no_slowdown():
    def sweep(slopes):
        k = len(slopes)
        return hm.ScaleSweep(np.arange(1.0, k + 1), np.zeros(k), np.asarray(slopes), np.full(k, 0.01), ())

    assert check.row_scale_sweep(check.CI, data=sweep([-0.5, -0.3, -0.1])).status == "verified"
    assert check.row_scale_sweep(check.CI, data=sweep([-0.1, -0.3, -0.5])).status == "refuted"


def _rate(slope, se):
    fit = sc.Fit(slope, se, 0.0, 0.0, 1.0)
    ns = np.asarray([64, 256, 1024])
    return sc.RateStudy(ns, np.ones(3), np.full(3, 0.01), fit)


@pytest.mark.parametrize("slope, se, want", [
    (-0.49, 0.01, "verified"),
    (-0.437, 0.026, "inconclusive"),  # within floor + 3 SE only because the SE is wide
    (-0.400, 0.014, "refuted"),
    (np.nan, 0.01, "refuted"),  # a broken estimate never passes
    (-0.5, np.nan, "refuted"),
])
def test_rate_row_applies_the_slope_rule(slope, se, want):
    data = {("sphere", 1.0): _rate(-0.5, 0.01), ("sphere", 2.0): _rate(slope, se)}
    assert check.row_rate(check.CI, data=data).status == want


def test_moment_row_fails_on_a_broken_estimate():
    def study(beta, se):
        return sc.MomentStudy(1.5, 0.15, _rate(-0.5, 0.01), _rate(-beta, se))

    assert check.row_moment_below_half(check.CI, data=[study(0.23, 0.02)]).status == "measured"
    assert check.row_moment_below_half(check.CI, data=[study(np.nan, 0.02)]).status == "refuted"
    assert check.row_moment_below_half(check.CI, data=[study(0.23, np.inf)]).status == "refuted"


def test_nan_max_and_finite_worst_see_nan():
    assert np.isnan(check._nan_max([0.0, np.asarray([1.0, np.nan])]))
    assert check._nan_max([0.0, np.asarray([1.0, 2.0])]) == 2.0
    assert np.isnan(check._finite_worst([(np.asarray([np.nan]), np.asarray([1.0]))]))
    assert np.isnan(check._finite_worst([(np.asarray([0.5]), np.asarray([np.inf]))]))
    assert check._finite_worst([(np.asarray([0.5]), np.asarray([1.0]))]) == 0.5


def test_save_round_trips_the_rows(tmp_path):
    import json
    import pathlib

    rows = [check.Row("a claim", "a source", "verified", "1 < 2"),
            check.Row("b", "c", "refuted", "J = 0.5 > 0.25")]
    path = check.save(rows, tmp_path / "sub" / "claims.json", settings="ci", seconds=1.5)
    doc = json.loads(pathlib.Path(path).read_text())
    assert [check.Row(**r) for r in doc["rows"]] == rows
    assert doc["settings"] == "ci" and doc["versions"]["jax"]
