"""experiments.minilm_variants: the pieces on inputs with known answers, the claims' reading of
numbers, the config's checks, and a tiny end-to-end run on the real model (JSON, PNGs, report)."""

import copy
import json
import math

import numpy as np
import pytest

from experiments import minilm_variants as mv

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")


def test_text_sentences_are_whole_sentences_in_the_word_range():
    text = ("One two three. Four five six seven!  A b c d e f g h?\nShort. "
            "Eight nine ten eleven. One two three.")
    got = mv.text_sentences(text, 3, seed=0, min_words=3, max_words=5)
    assert got == ["One two three.", "Four five six seven!", "Eight nine ten eleven."]
    assert mv.text_sentences(text, 2, seed=1, min_words=3, max_words=5) == \
        mv.text_sentences(text, 2, seed=1, min_words=3, max_words=5)
    with pytest.raises(ValueError, match="fewer than count = 4"):
        mv.text_sentences(text, 4, seed=0, min_words=3, max_words=5)


def test_cosine_summary_on_known_angles():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    # b at a known angle from a, in the plane of a and a unit vector orthogonal to it.
    u = rng.normal(size=(50, 8))
    u -= np.sum(u * a, axis=1, keepdims=True) * a
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    angles = np.linspace(0.0, 1.0, 50)
    b = np.cos(angles)[:, None] * a + np.sin(angles)[:, None] * u
    got = mv.cosine_summary(a, 3 * b)  # a scale changes no cosine
    np.testing.assert_allclose(got["cosine"], np.cos(angles), atol=1e-12)
    assert got["min"] == pytest.approx(math.cos(1.0))
    assert got["mean"] == pytest.approx(np.cos(angles).mean())
    assert got["ci95"] > 0 and mv.cosine_summary(a, a)["ci95"] == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        mv.cosine_summary(a, b[:3])


def test_neighbour_agreement_counts_kept_nearest_rows():
    e = np.eye(4)[[0, 0, 1, 1]] + 0.01 * np.arange(4)[:, None]  # 0<->1 and 2<->3 are pairs
    assert mv.neighbour_agreement(e, e) == 1.0
    swapped = e[[0, 2, 1, 3]]  # rows 1 and 2 exchanged: every nearest neighbour changes
    assert mv.neighbour_agreement(e, swapped) == 0.0


def test_paired_change_and_slopes():
    lengths = np.array([16, 32, 64, 128])
    soft = np.random.default_rng(1).normal(size=(4, 3, 2))
    # the variant lowers the entropy by 0.5 log L, plus per-window noise that is the same at
    # every L (nested windows): slopes are exactly -0.5 with no spread
    var = soft - 0.5 * np.log(lengths)[:, None, None] + np.array([0.1, -0.2, 0.3])[None, :, None]
    ch = mv.paired_change(var, soft)
    np.testing.assert_allclose(ch["mean"], (-0.5 * np.log(lengths) + 0.2 / 3)[:, None]
                               * np.ones(2), atol=1e-12)
    t = 4.302652729749462  # t quantile 0.975 at 2 degrees of freedom (Student t tables)
    np.testing.assert_allclose(ch["ci95"], t * np.std([0.1, -0.2, 0.3], ddof=1) / math.sqrt(3)
                               * np.ones((4, 2)), rtol=1e-12)
    sl = mv.per_window_slopes(lengths, var - soft)
    np.testing.assert_allclose(sl["slope"], [-0.5, -0.5], atol=1e-12)
    np.testing.assert_allclose(sl["se"], [0, 0], atol=1e-12)


def test_rounding_floor():
    # L * 2^-24 * log L: 1.9e-4 nats at 512 keys
    assert mv.rounding_floor([512])[0] == pytest.approx(512 * 2.0 ** -24 * math.log(512))
    assert 1.8e-4 < mv.rounding_floor([512])[0] < 2e-4


def _synthetic(lengths=(16, 64, 256, 1024), windows=3, layers=2):
    """A results dict in run()'s layout whose changes are chosen by the test."""
    L = np.asarray(lengths, float)
    soft = np.full((len(L), windows, layers), 3.0)
    noise = np.array([0.01, -0.01, 0.0])[None, :, None]
    results = {"lengths": list(lengths), "config": {"windows": windows, "ssmax_s": 1 / math.log(256)},
               "softmax": {"entropy": soft.tolist()}, "variants": {}}
    ad = soft - 0.1 * np.log(L)[:, None, None] + noise  # drops, more at larger L
    s = 1 / math.log(256)
    ss = soft + np.where(s * np.log(L) < 1, 0.2, np.where(np.isclose(s * np.log(L), 1), 0, -0.2)
                         )[:, None, None] + noise
    for name, ent in (("adaptive_temperature", ad), ("ssmax", ss)):
        ch = mv.paired_change(ent, soft)
        results["variants"][name] = {
            "label": name, "entropy": ent.tolist(),
            "entropy_change": {k: np.asarray(v).tolist() for k, v in ch.items()},
            "cosine": {"mean": 0.9, "ci95": 0.01, "p05": 0.8, "min": 0.7}, "neighbour_agreement": 0.5}
    return results


def _status(results, start):
    return [c["status"] for c in mv.claims(results) if c["claim"].startswith(start)]


def test_claims_read_the_numbers():
    r = _synthetic()
    assert _status(r, "layer 0's entropy never rises") == ["holds"]
    assert _status(r, "it lowers the entropy of every layer") == ["holds"]
    assert _status(r, "the entropy adaptive temperature removes") == ["holds"]
    assert _status(r, "with s = 0.1803") == ["holds"]
    assert [c["status"] for c in mv.claims(r) if c["source"] == "measured"] == ["measured"] * 2

    # adaptive temperature raising layer 0's entropy at one length is refuted
    bad = copy.deepcopy(r)
    ent = np.asarray(bad["variants"]["adaptive_temperature"]["entropy"])
    ent[1, :, 0] = 3.5 + np.array([0.01, -0.01, 0.0])
    bad["variants"]["adaptive_temperature"]["entropy"] = ent.tolist()
    bad["variants"]["adaptive_temperature"]["entropy_change"] = {
        k: np.asarray(v).tolist() for k, v in mv.paired_change(ent, bad["softmax"]["entropy"]).items()}
    assert _status(bad, "layer 0's entropy never rises") == ["refuted"]
    assert _status(bad, "it lowers the entropy of every layer") == ["partly"]

    # a rise within float32 rounding (beta = 1 rows computed another way) is no rise
    tiny = copy.deepcopy(r)
    ent = np.asarray(tiny["variants"]["adaptive_temperature"]["entropy"])
    ent[0, :, 0] = 3.0 + 1e-6
    tiny["variants"]["adaptive_temperature"]["entropy"] = ent.tolist()
    tiny["variants"]["adaptive_temperature"]["entropy_change"] = {
        k: np.asarray(v).tolist() for k, v in mv.paired_change(ent, tiny["softmax"]["entropy"]).items()}
    assert _status(tiny, "layer 0's entropy never rises") == ["holds"]

    # a drop that does not grow with L
    flat = copy.deepcopy(r)
    ent = np.asarray(flat["softmax"]["entropy"]) - 0.3 + np.array([0.01, -0.01, 0.0])[None, :, None]
    flat["variants"]["adaptive_temperature"]["entropy"] = ent.tolist()
    assert _status(flat, "the entropy adaptive temperature removes") == ["not observed"]

    # SSMax falling where its factor is below 1 is refuted
    wrong = copy.deepcopy(r)
    ch = wrong["variants"]["ssmax"]["entropy_change"]
    ch["mean"] = (-np.asarray(ch["mean"])).tolist()
    assert _status(wrong, "with s = 0.1803") == ["refuted"]


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="variants must be"):
        mv.Config(variants=("softmax",))
    with pytest.raises(ValueError, match="ssmax_s must be finite and > 0"):
        mv.Config(ssmax_s=0.0)
    with pytest.raises(ValueError, match="lengths must be"):
        mv.Config(lengths=(16, 8, 32))
    with pytest.raises(ValueError, match="windows must be >= 2"):
        mv.Config(windows=1)


def test_tiny_run_writes_json_plots_and_report(tmp_path):
    path = mv.main(["--out", str(tmp_path), "--no-progress", "--sentences", "6",
                    "--lengths", "8,16,32", "--windows", "2", "--text-chars", "20000"])
    results = json.loads(path.read_text())
    assert results["config"]["sentences"] == 6 and results["versions"]["jax"]
    for fig in ("cosine", "entropy"):
        assert path.with_name(f"{path.stem}-{fig}.png").stat().st_size > 10_000
    for name in mv.VARIANTS:
        v = results["variants"][name]
        cos = np.asarray(v["cosine"]["cosine"])
        assert cos.shape == (6,) and np.all(cos <= 1 + 1e-6) and np.all(cos > 0)
        assert np.asarray(v["entropy"]).shape == (3, 2, 6)  # [L, windows, layers]
    # top-k keeps at most k keys per row: its mean entropy is at most log k
    assert np.max(results["variants"]["topk"]["entropy"]) <= math.log(8) + 1e-5
    # the exact claim at layer 0 holds on the real model
    assert _status(results, "layer 0's entropy never rises") == ["holds"]
    section = mv.report_section(path, base_dir=tmp_path.parent)
    assert "| adaptive temperature |" in section and f"{tmp_path.name}/{path.stem}-cosine.png" \
        in section
    assert section.count("**") >= 2 * len(results["claims"])
