"""experiments.byte_lm: the data pieces, the config's checks, the claims' reading of numbers, a
tiny end-to-end run (JSON, PNGs, report section), and resume after a kill (between units, and
inside a unit's training from its orbax checkpoint)."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import byte_lm as blm

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tiny_args(out_dir, *extra, variants="softmax,ssmax", seeds="0"):
    # Units of seconds each: one layer of width 16, 20 steps with checkpoints every 10, trained at
    # length 16 and evaluated at 16 and 64 (two compiled evaluations per model).
    return ["--preset", "cpu", "--out", str(out_dir), "--no-progress", "--seeds", seeds,
            "--variants", variants, "--num-layers", "1", "--d-model", "16",
            "--num-heads", "2", "--mlp-dim", "32", "--seq-len", "16", "--batch", "4",
            "--steps", "20", "--warmup-steps", "2", "--chunk-steps", "10",
            "--checkpoint-every", "10", "--eval-lengths", "16,64", "--eval-tokens", "256",
            "--eval-batch-tokens", "128", *extra]


# The resume tests run one variant over two seeds: both units share one compiled model, so the
# killed subprocesses and the resumed runs compile little.
RESUME = dict(variants="softmax", seeds="0,1")


def _config(out_dir):
    return blm.config_from_args(_tiny_args(out_dir, **RESUME))[0]


def _deterministic(path):
    """The final JSON less ``timing`` (seconds and which units were loaded) and the output folder."""
    data = json.loads(pathlib.Path(path).read_text())
    data.pop("timing")
    data["config"].pop("out_dir")
    return data


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A persistent compilation cache shared by this file's runs: each runs in a fresh process
    (as a user's run would, float32), and the runs after the first load its compiled programs
    instead of compiling them again (the same HLO gives the same program, so the numbers agree)."""
    return tmp_path_factory.mktemp("jax_cache")


def _run(jax_cache, out_dir, *extra, kill=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(jax_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("JAX_ENABLE_X64", None)
    env.pop("JAXATTN_BLM_KILL", None)
    if kill is not None:
        env["JAXATTN_BLM_KILL"] = kill
    proc = subprocess.run([sys.executable, "-m", "experiments.byte_lm",
                           *_tiny_args(out_dir, *extra, **kw)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    want = 0 if kill is None else -signal.SIGKILL
    assert proc.returncode == want, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def uninterrupted_resume(tmp_path_factory, jax_cache):
    out = tmp_path_factory.mktemp("blm_resume")
    _run(jax_cache, out, "--no-plot", **RESUME)
    return blm.result_path(_config(out))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, jax_cache, uninterrupted_resume):
    # after `uninterrupted_resume`: its softmax programs come from the cache
    out = tmp_path_factory.mktemp("blm_full")
    proc = _run(jax_cache, out)
    config = blm.config_from_args(_tiny_args(out))[0]
    return blm.result_path(config), proc.stdout


def test_train_batch_is_contiguous_windows_drawn_by_the_key():
    tokens = np.arange(1000, dtype=np.int64) % 251  # position recoverable from the value
    tokens = tokens.astype(np.uint8)
    b = np.asarray(blm.train_batch(tokens, jax.random.key(3), 64, 12))
    assert b.shape == (64, 13) and b.dtype == np.int32
    # each row is tokens[s : s + 13] for some start s: consecutive values mod 251
    np.testing.assert_array_equal(np.diff(b, axis=1) % 251, 1)
    starts = b[:, 0]
    assert len(np.unique(starts)) > 40  # random starts, not one window repeated
    np.testing.assert_array_equal(b, np.asarray(blm.train_batch(tokens, jax.random.key(3), 64, 12)))
    assert not np.array_equal(b, np.asarray(blm.train_batch(tokens, jax.random.key(4), 64, 12)))
    # the last window can end on the last byte, never past it
    big = np.asarray(blm.train_batch(np.arange(14, dtype=np.uint8), jax.random.key(0), 256, 12))
    assert set(big[:, 0].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="more than seq_len=12"):
        blm.train_batch(np.arange(12, dtype=np.uint8), jax.random.key(0), 2, 12)


def test_eval_windows_score_the_same_bytes_at_every_length():
    held = (np.arange(5000) % 256).astype(np.uint8)
    top, total = 64, 256
    predicted = None
    for length in (8, 16, 32, 64):
        w = blm.eval_windows(held, length, total, top)
        assert w.shape == (total // length, length + 1)
        # within a span, window i + 1 starts on window i's last byte (its last target)
        per_span = w.reshape(total // top, top // length, length + 1)
        np.testing.assert_array_equal(per_span[:, :-1, -1], per_span[:, 1:, 0])
        targets = np.sort(w[:, 1:].ravel())
        if predicted is None:
            predicted = targets
        np.testing.assert_array_equal(targets, predicted)  # the same bytes, only context differs
    spans = blm.eval_windows(np.arange(5000, dtype=np.int64).astype(np.uint16), 64, total, top)
    starts = spans[:, 0]
    assert starts[0] == 0 and starts[-1] > 3000  # spread over the held-out text
    assert np.all(np.diff(starts) >= top)  # disjoint spans
    with pytest.raises(ValueError, match="length=24 must divide max_length=64"):
        blm.eval_windows(held, 24, total, top)
    with pytest.raises(ValueError, match="too few"):
        blm.eval_windows(held[:300], 64, total, top)


def test_load_bytes_are_the_split_plays():
    from experiments import corpus

    train, held = blm.load_bytes(0.1)
    assert train.dtype == held.dtype == np.uint8 and len(train) > 5 * len(held) > 0
    _, held_text = corpus.shakespeare_split(0.1)
    assert held[:500].tobytes().decode("utf-8") == held_text[:500]


@pytest.mark.parametrize("kw, match", [
    (dict(variants=("softmax", "relu")), "variants must be"),
    (dict(eval_lengths=(128, 256)), "contain seq_len=64"),
    (dict(eval_lengths=(32, 64, 128)), "start at the training length"),
    (dict(positions="learned"), "need positions='rope'"),
    (dict(eval_lengths=(64, 96, 192)), "must divide max"),
    (dict(eval_tokens=1000), "eval_tokens=1000 must be a multiple"),
    (dict(checkpoint_every=30), "multiple of chunk_steps"),
    (dict(attention_dtype="int8"), "attention_dtype"),
])
def test_config_checks_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(blm.PRESETS["cpu"], **kw)


def test_presets_are_the_briefs_settings():
    cpu, gpu = blm.PRESETS["cpu"], blm.PRESETS["gpu"]
    assert set(cpu.variants) == set(gpu.variants) == set(blm.VARIANTS) and len(blm.VARIANTS) == 5
    for c in (cpu, gpu):
        assert c.eval_lengths[0] == c.seq_len and c.eval_lengths[-1] == 16 * c.seq_len
        assert c.positions == "rope" and len(c.seeds) >= 2
    assert (gpu.num_layers, gpu.d_model, gpu.num_heads, gpu.seq_len) == (4, 256, 4, 256)
    assert gpu.implementation == "pallas" and gpu.attention_dtype == "bfloat16"
    assert set(gpu.throughput_implementations) == {"pallas", "xla"} and len(gpu.seeds) >= 3


def _fake_units(config, degradation, at_train):
    """Units whose held-out loss at the training length and degradation are given per variant
    (lists over seeds); the loss between them is linear in log2 length."""
    lengths = np.log2(config.eval_lengths)
    frac = (lengths - lengths[0]) / (lengths[-1] - lengths[0])
    units = []
    for name in config.variants:
        for s, seed in enumerate(config.seeds):
            loss = (at_train[name][s] + frac * degradation[name][s]).tolist()
            units.append({"variant": name, "seed": seed,
                          "loss_curve": {"every": config.chunk_steps, "loss": [3.0, 2.5]},
                          "held_out": {"loss": loss, "tail_loss": loss,
                                       "entropy": [1.0] * len(loss)},
                          "learned_s": [[0.43, 0.5]]})
    return units


def test_claims_are_read_from_the_numbers():
    config = dataclasses.replace(blm.PRESETS["cpu"], seeds=(0, 1, 2),
                                 variants=("softmax", "rbf", "ssmax"))
    at_train = {"softmax": [2.0, 2.1, 2.05], "rbf": [1.9, 2.0, 1.95], "ssmax": [2.2, 2.3, 2.25]}
    degr = {"softmax": [1.0, 1.1, 0.9], "rbf": [0.8, 0.85, 0.9], "ssmax": [0.1, 0.2, 0.15]}
    summary = blm.summarise(config, _fake_units(config, degr, at_train))
    claims = summary["claims"]
    np.testing.assert_allclose(summary["variants"]["ssmax"]["degradation"], degr["ssmax"],
                               atol=1e-12)
    assert claims["softmax_degrades"]["status"] == "holds"
    assert claims["ssmax_degrades_less"]["status"] == "holds"
    np.testing.assert_allclose(claims["ssmax_degrades_less"]["mean_diff"], 0.85, atol=1e-12)
    assert claims["ssmax_better_at_train_length"]["status"] == "does not hold"
    assert claims["rbf_better_at_train_length"]["status"] == "holds"
    assert claims["least_degradation"]["ranking"] == ["ssmax", "rbf", "softmax"]
    assert "scalable-softmax (learned s) degrades least" in claims["least_degradation"]["claim"]
    # swap: SSMax now degrades as much as softmax, with noise: the verdict follows the data
    degr["ssmax"] = [1.2, 0.8, 1.05]
    claims = blm.summarise(config, _fake_units(config, degr, at_train))["claims"]
    assert claims["ssmax_degrades_less"]["status"] in ("does not hold",
                                                       "same direction, not significant at 95 %")
    assert claims["least_degradation"]["ranking"][0] == "rbf"
    lines = blm.claims_text({"claims": claims})
    assert len(lines) == len(claims) and all("**" in line for line in lines)
    assert any("95 % t-interval over 3 seeds" in line for line in lines)


def test_tiny_run_writes_json_pngs_and_report(uninterrupted, tmp_path):
    path, stdout = uninterrupted
    data = json.loads(path.read_text())
    assert data["config"]["eval_lengths"] == [16, 64] and data["versions"]["jax"] == jax.__version__
    assert list(data["variants"]) == ["softmax", "ssmax"] and len(data["units"]) == 2
    for row in data["variants"].values():
        curve = np.asarray(row["loss_curve"])
        assert curve.shape == (1, 2) and curve[0, -1] < curve[0, 0] < np.log(256) + 0.5
        loss = np.asarray(row["held_out"])
        # an untrained-ish byte model: positive, at most a little above uniform's log 256
        assert loss.shape == (1, 2) and np.all((loss > 0) & (loss < np.log(256) + 1))
        np.testing.assert_allclose(loss[0, 0], row["tail_loss"][0][0], rtol=1e-6)  # 1x: same
        ent = np.asarray(row["entropy_mean"])
        assert np.all((ent >= 0) & (ent <= np.log([16, 64]) + 1e-5))
    assert len(data["units"][1]["learned_s"]) == 1 and len(data["units"][1]["learned_s"][0]) == 2
    assert {"softmax_degrades", "ssmax_degrades_less", "least_degradation"} <= set(data["claims"])
    # the CLI drew both plots beside the JSON and printed the report section
    for suffix in ("-loss.png", "-length.png"):
        assert path.with_name(path.stem + suffix).is_file()
        assert f"wrote {path.with_name(path.stem + suffix)}" in stdout
    section = blm.report_section(path)
    assert section in stdout
    loss = data["variants"]["softmax"]["held_out_mean"][0]
    assert f"| softmax | {loss:.3f}" in section and f"{path.stem}-length.png" in section
    assert all(claim["claim"] in section for claim in data["claims"].values())
    from experiments import plot_byte_lm

    pngs = plot_byte_lm.plot(path, tmp_path)
    assert [p.name for p in pngs] == [path.stem + "-loss.png", path.stem + "-length.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_resume_after_kill_between_units(uninterrupted_resume, jax_cache, tmp_path):
    _run(jax_cache, tmp_path, "--no-plot", kill="unit:1", **RESUME)
    config = _config(tmp_path)
    parts = sorted(p.name for p in blm.parts_dir(config).glob("*.json"))
    assert parts == ["softmax-seed0.json"] and not blm.result_path(config).exists()
    first = (blm.parts_dir(config) / parts[0]).read_bytes()
    stdout = _run(jax_cache, tmp_path, "--no-plot", **RESUME).stdout
    # the finished unit is loaded, not trained again
    assert "softmax-seed0: loaded from" in stdout and "softmax-seed1: trained" in stdout
    assert "softmax-seed0: trained" not in stdout
    assert (blm.parts_dir(config) / parts[0]).read_bytes() == first
    assert _deterministic(blm.result_path(config)) == _deterministic(uninterrupted_resume)


def test_resume_inside_a_unit_from_orbax_checkpoint(uninterrupted_resume, jax_cache, tmp_path):
    _run(jax_cache, tmp_path, "--no-plot", kill="step:10", **RESUME)
    config = _config(tmp_path)
    ckpt = blm.parts_dir(config) / "softmax-seed0.ckpt"
    assert (ckpt / "10").is_dir() and not list(blm.parts_dir(config).glob("*.json"))
    stdout = _run(jax_cache, tmp_path, "--no-plot", **RESUME).stdout
    assert "softmax-seed0: trained" in stdout
    resumed, full = _deterministic(blm.result_path(config)), _deterministic(uninterrupted_resume)
    # nothing lost: the loss curve before the kill came back with the checkpoint, and every
    # number equals the uninterrupted run's
    assert len(resumed["units"][0]["loss_curve"]["loss"]) == 2
    assert resumed == full
    assert not ckpt.exists()  # the unit's JSON replaces its checkpoint
