"""experiments.long_dispersion at toy lengths on the 8-device CPU mesh: the statistics of the
sequence-sharded call agree with the single-device reference on sampled rows, softmax disperses
as Theorem 2.2 says, and the report section renders from the JSON.

Error model of the row check: float32 statistics of ~N = 1024 terms merged over 8 blocks: a few
ulp of log N (about 1e-6 nats) for the entropy and of the weight; 1e-4 is far above that and
far below a wrong block weight (which shifts the entropy by O(1 / n_blocks) nats)."""

import json

import jax
import numpy as np
import pytest

from experiments import long_dispersion as ld


def test_long_dispersion(tmp_path):
    """One run (the 8-device ring is the costly part), three checks on it."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 CPU devices)")
    config = ld.Config(lengths=(256, 512, 1024), check_rows=16, out_dir=str(tmp_path))
    res = ld.run(config, progress=lambda m: None)
    path = ld.save(res, config)
    # the rows match the single-device reference
    assert res["devices"]["count"] == 8
    for v in res["variants"].values():
        for row in v["rows"]:
            assert max(row["check_error"].values()) < 1e-4, row
    # softmax disperses: bounded logits give max weight ~ c / N and entropy ~ log N - c'
    soft = res["variants"]["softmax"]
    assert soft["bound_holds"]
    assert abs(soft["log_max_weight_slope"] + 1) < 0.1
    assert abs(soft["entropy_slope"] - 1) < 0.1
    # the report section renders from the JSON
    ld.plot(path)
    text = ld.report_section(path)
    assert "Theorem 2.2" in text and "softmax: slope of log max weight" in text
    assert json.loads(path.read_text())["config"]["lengths"] == [256, 512, 1024]
    assert np.isfinite(res["delta"])
