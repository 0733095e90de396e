"""Smoke test of experiments.convergence_rates: a tiny config writes JSON (config, versions) and PNGs."""

import dataclasses
import json

import pytest

from experiments import convergence_rates as cr
from experiments import plot_convergence_rates


def test_tiny_run_writes_json_and_pngs(tmp_path):
    config, no_plot = cr.config_from_args([
        "--preset", "small", "--ns", "32,64,128", "--replicates", "4", "--probes", "2",
        "--radii", "0.5,1,2", "--horizons", "0.5,1.0", "--moment-ns", "32,64,128",
        "--moment-replicates", "4", "--lambdas", "1,2", "--hardmax-dims", "2",
        "--out-dir", str(tmp_path)])
    assert not no_plot and config.ns == (32, 64, 128) and config.radii == (0.5, 1.0, 2.0)
    results = cr.run(config, progress=lambda m: None)
    path = cr.save(results, config)
    data = json.loads(path.read_text())
    assert data["config"] == json.loads(json.dumps(dataclasses.asdict(config)))
    assert {"jax", "jaxlib", "numpy", "python", "jaxattn"} <= set(data["versions"])
    assert len(data["rates"]["gaussian"]["studies"]) == 3
    assert len(data["moments"]) == 2
    for png in plot_convergence_rates.plot(path):
        assert png.exists() and png.stat().st_size > 1000


def test_bad_override_is_a_clear_error():
    with pytest.raises(SystemExit, match="--replicates"):
        cr.config_from_args(["--replicates", "many"])


def test_digest_ignores_out_dir():
    a = cr.PRESETS["small"]
    assert a.digest() == dataclasses.replace(a, out_dir="elsewhere").digest()
    assert a.digest() != dataclasses.replace(a, seed=1).digest()
