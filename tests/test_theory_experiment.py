"""experiments.convergence_rates: a tiny config writes JSON (config, versions) and PNGs; a killed
run resumes from the studies it finished, and ends with the numbers of an uninterrupted run."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from experiments import convergence_rates as cr
from experiments import files, plot_convergence_rates

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--preset", "small", "--ns", "32,64,128", "--replicates", "4", "--probes", "2",
        "--radii", "0.5,1,2", "--horizons", "0.5,1.0", "--moment-ns", "32,64,128",
        "--moment-replicates", "4", "--lambdas", "1,2", "--hardmax-dims", "2"]


def _tiny(out_dir):
    return cr.config_from_args([*TINY, "--out-dir", str(out_dir)])[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted tiny run (shared: it is the slow part): ``(config, json path)``."""
    config = _tiny(tmp_path_factory.mktemp("uninterrupted"))
    return config, cr.save(cr.run(config, progress=lambda m: None), config)


def _numbers(path):
    """The final JSON less what may differ between runs of one config: start time, out_dir."""
    data = json.loads(path.read_text())
    data.pop("started")
    data["config"].pop("out_dir")
    return json.dumps(data, sort_keys=True)


def test_tiny_run_writes_json_and_pngs(uninterrupted):
    config, path = uninterrupted
    config_again, no_plot = cr.config_from_args([*TINY, "--out-dir", config.out_dir])
    assert config_again == config and not no_plot and config.radii == (0.5, 1.0, 2.0)
    data = json.loads(path.read_text())
    assert data["config"] == json.loads(json.dumps(dataclasses.asdict(config)))
    assert {"jax", "jaxlib", "numpy", "python", "jaxattn"} <= set(data["versions"])
    assert len(data["rates"]["gaussian"]["studies"]) == 3
    assert len(data["moments"]) == 2
    assert sorted(p.name for p in cr.parts_dir(config).iterdir()) == [
        "hardmax.json", "moments.json", "rates.json"]  # no temporary file left behind
    for png in plot_convergence_rates.plot(path):
        assert png.exists() and png.stat().st_size > 1000


# Run in a child process: the second study stalls (after touching a marker file), so the parent
# kills the run while it is in that study, as a timeout or Ctrl-C would, with no race.
_STALLED_CHILD = """
import pathlib, sys, time
from experiments import convergence_rates as cr
from experiments import files
def stalled(config, key):
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(600)
cr.moments = stalled
cr.main(sys.argv[2:])
"""


def test_killed_run_resumes_and_matches_uninterrupted(uninterrupted, tmp_path, monkeypatch):
    config = _tiny(tmp_path / "out")
    marker = tmp_path / "in-second-study"
    child = subprocess.Popen(
        [sys.executable, "-c", _STALLED_CHILD, str(marker), *TINY, "--out-dir", config.out_dir,
         "--no-plot"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, child.communicate()[0].decode()
            assert time.monotonic() < deadline, "the child never reached its second study"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    parts = cr.parts_dir(config)
    assert sorted(p.name for p in parts.iterdir()) == ["rates.json"]  # finished, and whole
    assert not any(pathlib.Path(config.out_dir).glob("*.json"))  # no final JSON yet

    def recomputed(*args):
        raise AssertionError("the finished rates study was recomputed")

    monkeypatch.setattr(cr, "rates_and_growth", recomputed)
    messages = []
    path = cr.save(cr.run(config, progress=messages.append), config)
    assert messages[0].startswith("rates: finished in an earlier run")
    assert _numbers(path) == _numbers(uninterrupted[1])


def _fake_studies(monkeypatch, calls):
    """Replaces the three studies with instant ones that count their calls."""
    for _, fn_name, _k in cr.STUDIES:
        def fake(config, key, fn_name=fn_name):
            calls.append(fn_name)
            return {"seed": config.seed, "study": fn_name}
        monkeypatch.setattr(cr, fn_name, fake)


def test_part_of_another_config_is_recomputed(tmp_path, monkeypatch):
    calls = []
    _fake_studies(monkeypatch, calls)
    config = _tiny(tmp_path)
    cr.run(config, progress=lambda m: None)
    rates = cr.parts_dir(config) / "rates.json"
    stored = json.loads(rates.read_text())
    stored["config"]["replicates"] += 1  # as if written by a run of another config
    rates.write_text(json.dumps(stored))
    calls.clear()
    messages = []
    cr.run(config, progress=messages.append)
    assert calls == ["rates_and_growth"]
    assert "another config (replicates differ): recomputing" in messages[0]
    assert json.loads(rates.read_text())["config"]["replicates"] == config.replicates
    calls.clear()
    cr.run(config, progress=lambda m: None, resume=False)
    assert len(calls) == 3  # --no-resume recomputes everything


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "study.json"
    files.write_atomic(path, "old")

    def killed(fd):
        raise KeyboardInterrupt  # the process dies before the new text is in place

    monkeypatch.setattr(files.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["study.json"]  # the temporary file is gone


def test_bad_override_is_a_clear_error():
    with pytest.raises(SystemExit, match="--replicates"):
        cr.config_from_args(["--replicates", "many"])


def test_digest_ignores_out_dir():
    a = cr.PRESETS["small"]
    assert a.digest() == dataclasses.replace(a, out_dir="elsewhere").digest()
    assert a.digest() != dataclasses.replace(a, seed=1).digest()


def test_report_section_reads_the_json(tmp_path):
    """The report section's numbers and verdicts are the JSON's (a changed slope shows)."""
    import json

    from experiments import convergence_rates as cr

    study = {"ns": [1, 2], "mean": [1.0, 0.5], "se": [0.1, 0.1],
             "fit": {"slope": -0.4321, "slope_se": 0.01, "intercept": 0.0}, "verdict": "refuted"}
    growth = {"radii": [1.0], "c": [2.0], "c_se": [0.1], "studies": [study]}
    res = {"config": {"preset": "x", "d": 3, "ns": [64, 128], "replicates": 5},
           "versions": {"backend": "cpu"},
           "rates": {"gaussian": growth, "sphere": growth},
           "moments": [{"horizon": 0.5, "predicted_beta": 0.4, "mean": study, "cov": study}],
           "hardmax": {"in_n": [{"d": 3, "predicted_slope": -0.5, **study}],
                       "scale_sweep": {"lambdas": [0.5, 8.0], "slopes": [-0.48, -0.06]}}}
    path = tmp_path / "convergence_rates" / "x.json"
    path.parent.mkdir()
    path.write_text(json.dumps(res))
    text = cr.report_section(path)
    assert "slope -0.432 ± 0.010, **refuted**" in text
    assert "mean 0.432 ± 0.010" in text and "![rates](convergence_rates/x-rates.png)" in text
