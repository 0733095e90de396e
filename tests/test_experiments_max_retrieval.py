"""experiments.max_retrieval: the data generator, a tiny end-to-end run (JSON, PNG, report section),
and resume after a kill (between units, and inside a unit's training from its orbax checkpoint)."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import max_retrieval as mr

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tiny_args(out_dir, *extra):
    # Two units (softmax, ssmax) of one seed, seconds each; checkpoints every 10 of 20 steps.
    return ["--preset", "cpu", "--out-dir", str(out_dir), "--no-progress", "--seeds", "0",
            "--trained", "softmax,ssmax", "--embed", "16", "--mlp-layers", "1", "--batch", "16",
            "--steps", "20", "--chunk-steps", "10", "--checkpoint-every", "10",
            "--test-sizes", "16,64", "--test-examples", "32", "--eval-items", "1024", *extra]


def _config(out_dir):
    return mr.config_from_args(_tiny_args(out_dir))[0]


def _deterministic(path):
    """The final JSON less ``timing`` (seconds and which units were loaded) and the output folder."""
    data = json.loads(pathlib.Path(path).read_text())
    data.pop("timing")
    data["config"].pop("out_dir")
    return data


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("mr_full")
    path = mr.main(_tiny_args(out, "--no-plot"))
    return path


def _killed_run(out_dir, event):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXATTN_MR_KILL": event}
    proc = subprocess.run([sys.executable, "-m", "experiments.max_retrieval",
                           *_tiny_args(out_dir, "--no-plot")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


def test_make_batch_priorities_labels_shapes():
    b, s, c = 64, 12, 10
    features, lengths, labels, priorities = mr.make_batch(jax.random.key(3), b, s, c, min_items=1)
    features, lengths, labels, priorities = map(np.asarray, (features, lengths, labels, priorities))
    assert features.shape == (b, s, 1 + c) and lengths.shape == labels.shape == (b,)
    assert priorities.shape == (b, s)
    np.testing.assert_array_equal(features[..., 0], priorities)
    assert priorities.min() >= 0 and priorities.max() < 1
    assert 0.2 < priorities.mean() < 0.8  # U(0, 1), not a constant
    onehot = features[..., 1:]
    np.testing.assert_array_equal(onehot.sum(-1), 1)
    assert set(np.unique(onehot)) == {0.0, 1.0}
    classes = onehot.argmax(-1)
    assert lengths.min() >= 1 and lengths.max() <= s and len(np.unique(lengths)) > 3
    for i in range(b):  # the class of the largest priority among the set's valid items
        n = lengths[i]
        assert labels[i] == classes[i, :n][np.argmax(priorities[i, :n])]
    # padding must not decide the label: some sets have their global argmax in the padding
    global_best = classes[np.arange(b), priorities.argmax(-1)]
    assert np.any(global_best != labels)
    _, full_lengths, full_labels, full_p = map(np.asarray, mr.make_batch(jax.random.key(4), b, s, c))
    np.testing.assert_array_equal(full_lengths, s)
    assert len(np.unique(full_labels)) > 3


def test_tiny_run_writes_json_png_and_report(uninterrupted, tmp_path):
    data = json.loads(uninterrupted.read_text())
    assert data["config"]["test_sizes"] == [16, 64] and data["versions"]["jax"] == jax.__version__
    assert list(data["rows"]) == ["softmax", "softmax+adaptive", "ssmax"]
    for row in data["rows"].values():
        acc = np.asarray(row["accuracy"])
        assert acc.shape == (1, 2) and np.all((acc >= 0) & (acc <= 1))
        mw = np.asarray(row["max_weight_mean"])
        ent = np.asarray(row["entropy_mean"])
        assert np.all((mw > 0) & (mw <= 1)) and np.all((ent >= 0) & (ent <= np.log([16, 64]) + 1e-5))
    assert data["units"][1]["learned_s"] and len(data["units"]) == 2
    assert set(data["claims"]) == {"softmax_falls", "adaptive_helps_ood", "adaptive_not_cure"}
    from experiments import plot_max_retrieval

    png = plot_max_retrieval.plot(uninterrupted, tmp_path / "mr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    section = mr.report_section(uninterrupted)
    acc = data["rows"]["softmax"]["accuracy_mean"][0]
    assert f"| softmax | {acc:.3f}" in section and uninterrupted.with_suffix(".png").name in section
    assert all(claim["claim"] in section for claim in data["claims"].values())


def test_resume_after_kill_between_units(uninterrupted, tmp_path, monkeypatch):
    _killed_run(tmp_path, "unit:1")
    config = _config(tmp_path)
    parts = sorted(p.name for p in mr.parts_dir(config).glob("*.json"))
    assert parts == ["softmax-seed0.json"] and not mr.result_path(config).exists()
    first = (mr.parts_dir(config) / parts[0]).read_bytes()
    trained = []
    real = mr.train_unit
    monkeypatch.setattr(mr, "train_unit", lambda c, v, s, **kw: trained.append(v) or real(c, v, s, **kw))
    path = mr.main(_tiny_args(tmp_path, "--no-plot"))
    assert trained == ["ssmax"]  # the finished unit is loaded, not trained again
    assert (mr.parts_dir(config) / parts[0]).read_bytes() == first
    assert _deterministic(path) == _deterministic(uninterrupted)


def test_resume_inside_a_unit_from_orbax_checkpoint(uninterrupted, tmp_path):
    _killed_run(tmp_path, "step:10")
    config = _config(tmp_path)
    ckpt = mr.parts_dir(config) / "softmax-seed0.ckpt"
    assert (ckpt / "10").is_dir() and not list(mr.parts_dir(config).glob("*.json"))
    path = mr.main(_tiny_args(tmp_path, "--no-plot"))
    resumed, full = _deterministic(path), _deterministic(uninterrupted)
    curve = resumed["units"][0]["loss_curve"]
    assert curve["start"] == 10 and len(curve["loss"]) == 1  # only steps 10..20 were run again
    assert resumed["units"][0]["loss_curve"]["loss"] == full["units"][0]["loss_curve"]["loss"][1:]
    for key in ("rows", "claims"):
        assert resumed[key] == full[key]
    assert not ckpt.exists()  # the unit's JSON replaces its checkpoint
