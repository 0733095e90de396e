"""The claim table's statuses are what these tests assert: each row function runs at CI size.

Statistical rows (slopes, exponents, Monte Carlo means) are asserted here, with fixed PRNG keys;
exact rows are also covered by the hypothesis property tests in test_theory_dispersion.py,
test_theory_sample_complexity.py and test_theory_hardmax.py.
"""

import jax
import pytest

from theory import check

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
    "row_ssmax": "verified",
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
    "row_fd_probe": "verified",
    "row_critical_n": "measured",
    "row_bessel": "verified",
    "row_gamma_exact": "verified",
    "row_rate": "verified",
    "row_rate_large_radius": "measured",
    "row_growth": "measured",
    "row_moment_below_half": "verified",
    "row_moment_curve": "measured",
    "row_softmax_gap": "verified",
    "row_lambda_rate": "verified",
    "row_hardmax_n": "verified",
    "row_scale_sweep": "measured",
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
