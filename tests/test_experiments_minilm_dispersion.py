"""experiments.minilm_dispersion: each protocol function on inputs with a known answer, and a tiny
end-to-end run on the real all-MiniLM-L6-v2 (JSON, claims, plots)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from experiments import minilm_dispersion as md
from theory import dispersion as D
from theory import sample_complexity as sc


def _uniform_stats(B, N, lengths):
    """Stats of zero logits (uniform weights over the visible keys) through jaxattn, one call for
    every length (keys past ``L`` hidden by ``key_value_seq_lengths``): entropy log L, max 1/L."""
    S, T = max(lengths), 4
    q = jnp.zeros((B * len(lengths), T, N, 4))
    k = jax.random.normal(jax.random.key(0), (B * len(lengths), S, N, 4))
    visible = jnp.repeat(jnp.asarray(lengths, jnp.int32), B)
    stats = jaxattn.attention_weights(q, k, key_value_seq_lengths=visible, return_stats=True)[1]
    rows = [jax.tree.map(lambda a, i=i: a[i * B:(i + 1) * B], stats) for i in range(len(lengths))]
    return [[r, r] for r in rows]  # two "layers"


# --- windows ---------------------------------------------------------------------------------


def test_token_windows_nested_disjoint_deterministic():
    ids = np.arange(1000, 1000 + 5000)
    w16 = md.token_windows(ids, 16, 4, 7, cls_id=101, sep_id=102, slot=64)
    w64 = md.token_windows(ids, 64, 4, 7, cls_id=101, sep_id=102, slot=64)
    assert w16.shape == (4, 16) and w64.shape == (4, 64) and w16.dtype == np.int32
    for w in (w16, w64):
        assert np.all(w[:, 0] == 101) and np.all(w[:, -1] == 102)
        assert np.all(np.diff(w[:, 1:-1], axis=1) == 1)  # consecutive tokens of the stream
    np.testing.assert_array_equal(w16[:, 1:-1], w64[:, 1:15])  # one start for every length
    starts = np.sort(w64[:, 1] - 1000)
    assert np.all(starts % 62 == 0) and np.all(np.diff(starts) >= 62)  # disjoint slots
    np.testing.assert_array_equal(w16, md.token_windows(ids, 16, 4, 7, cls_id=101, sep_id=102,
                                                        slot=64))
    assert not np.array_equal(w16, md.token_windows(ids, 16, 4, 8, cls_id=101, sep_id=102, slot=64))


def test_token_windows_errors():
    ids = np.arange(100)
    with pytest.raises(ValueError, match="count"):
        md.token_windows(ids, 64, 3, 0, cls_id=1, sep_id=2)
    with pytest.raises(ValueError, match="length"):
        md.token_windows(ids, 2, 1, 0, cls_id=1, sep_id=2)
    with pytest.raises(ValueError, match="slot"):
        md.token_windows(ids, 16, 1, 0, cls_id=1, sep_id=2, slot=8)
    with pytest.raises(ValueError, match="ids"):
        md.token_windows(np.zeros(10), 4, 1, 0, cls_id=1, sep_id=2)


# --- dispersion ------------------------------------------------------------------------------


def test_uniform_attention_entropy_is_log_l_with_slope_one():
    lengths = (8, 16, 32, 64)
    per_length = [md.window_means(s) for s in _uniform_stats(3, 2, lengths)]
    ent = np.stack([p["entropy"] for p in per_length])  # [K, B, layers, N]
    mw = np.stack([p["max_weight"] for p in per_length])
    assert ent.shape == (4, 3, 2, 2)
    np.testing.assert_allclose(ent, np.log(lengths)[:, None, None, None]
                               * np.ones_like(ent), rtol=1e-6)
    np.testing.assert_allclose(mw, (1.0 / np.asarray(lengths))[:, None, None, None]
                               * np.ones_like(mw), rtol=1e-6)
    logl = np.log(lengths)
    se = ent.std(axis=1, ddof=1) / math.sqrt(3)
    fit = md.slope_table(logl, ent.mean(1), se, want=1.0)
    np.testing.assert_allclose(fit["slope"], 1.0, atol=1e-6)
    assert {v for row in fit["verdict"] for v in row} == {"verified"}
    fit_mw = md.slope_table(logl, mw.mean(1), mw.std(axis=1, ddof=1), want=-1.0, log_y=True)
    np.testing.assert_allclose(fit_mw["slope"], -1.0, atol=1e-6)
    assert {v for row in fit_mw["verdict"] for v in row} == {"verified"}


def test_window_means_average_over_queries():
    ent = jnp.arange(2 * 3 * 4, dtype=jnp.float64).reshape(2, 3, 4)  # [B, N, T]
    stats = jaxattn.AttentionStats(jnp.zeros_like(ent), ent, ent / 100)
    out = md.window_means([stats, stats])
    assert out["entropy"].shape == (2, 2, 3)  # [B, layers, N]
    np.testing.assert_allclose(out["entropy"][:, 0], np.asarray(ent).mean(-1))
    np.testing.assert_allclose(out["max_weight"][:, 1], np.asarray(ent).mean(-1) / 100)
    with pytest.raises(ValueError, match="one AttentionStats per layer"):
        md.window_means([])


def test_slope_table_known_power_law_and_refutation():
    rng = np.random.default_rng(0)
    L = np.asarray([16, 32, 64, 128, 256, 512], np.float64)
    true = np.asarray([-0.3, -1.0])
    mean = 3.0 * L[:, None] ** true[None, :] * (1 + 0.01 * rng.standard_normal((6, 2)))
    se = 0.01 * mean
    fit = md.slope_table(np.log(L), mean, se, want=-1.0, log_y=True)
    np.testing.assert_allclose(fit["slope"], true, atol=0.02)
    assert fit["verdict"] == ["refuted", "verified"]
    with pytest.raises(ValueError, match="mean > 0"):
        md.slope_table(np.log(L), -mean, se, want=-1.0, log_y=True)
    with pytest.raises(ValueError, match="shape"):
        md.slope_table(np.log(L), mean[:5], se[:5], want=-1.0)


# --- Mudarisov -------------------------------------------------------------------------------


def test_ks_identical_versus_shifted():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 300))
    p_same = md._ks_pvalues(a, a)
    p_shift = md._ks_pvalues(a, a + np.asarray([[0.0], [1.0]]))
    np.testing.assert_allclose(p_same, 1.0)
    assert p_shift[0] == 1.0 and p_shift[1] < 1e-10


def _sphere_windows(key, heads, windows, rows, L, d=8, temperature=0.5):
    """Token vectors on the unit sphere per (head, window) and sphere queries' softmax rows."""
    x = sc.sample_sphere(key, (heads, windows, L), d, 1.0, jnp.float64)
    q = sc.sample_sphere(jax.random.fold_in(key, 1), (heads, windows, rows), d, 1.0, jnp.float64)
    w = jax.nn.softmax(jnp.einsum("hbrd,hbld->hbrl", q, x) / temperature, axis=-1)
    return w, x


def test_topn_distances_equal_theory_per_row():
    w, x = _sphere_windows(jax.random.key(1), 3, 2, 5, 16)
    rows_x = jnp.broadcast_to(x[:, :, None], (3, 2, 5, 16, 8))  # theory's x: one set per row
    for n in (1, 4, 16):
        want = D.top_n_distances(w, rows_x, n)
        got = md._window_distances(w, x, md._ranks(w) < n, jnp.einsum("hbrl,hbld->hbrd", w, x))
        np.testing.assert_array_equal(np.asarray(md._ranks(w) < n), np.asarray(D.top_n_mask(w, n)))
        for g, ref in zip(got, want, strict=True):
            np.testing.assert_allclose(g, ref, rtol=1e-9, atol=1e-12)
    ties = jnp.asarray([[0.5, 0.25, 0.25, 0.0]])  # ties go to the lower index, as lax.top_k
    np.testing.assert_array_equal(np.asarray(md._ranks(ties) < 2), np.asarray(D.top_n_mask(ties, 2)))


def test_topn_study_equals_theory_critical_n_on_one_head():
    w, x = _sphere_windows(jax.random.key(2), 1, 1, 64, 32)
    grid = (1, 5, 32)
    out = md.topn_study(jax.random.key(9), w, x, (1, 5, 64), grid)
    rows_x = jnp.broadcast_to(x[0, 0][None], (64, 32, 8))
    for j, r in enumerate("ab"):
        ref = D.critical_n(jax.random.key(9), w[0, 0], rows_x, grid, reading=j)
        np.testing.assert_allclose(out["critical"][f"p_{r}"][:, 0], ref.p_values, rtol=1e-9)
        assert out["critical"][r][0] == (-1 if ref.critical is None else ref.critical)
    assert out["ns"].tolist() == [1, 5]  # N = 64 > L is skipped
    d_a, d_b = D.top_n_distances(w[0, 0], rows_x, 5)
    np.testing.assert_allclose(out["top"]["b"]["mean"][1, 0], np.asarray(d_b).mean(), rtol=1e-9)
    np.testing.assert_allclose(out["top"]["a"]["mean"][1, 0], np.asarray(d_a).mean(), rtol=1e-9)
    # at N = L top-N and random-N select everything: identical distances, p = 1
    np.testing.assert_allclose(out["critical"]["p_b"][-1], 1.0)


def test_topn_study_peaked_head_differs_from_random_at_small_n():
    # head 0: one key far above the rest in every row; head 1: nearly uniform rows, whose top-N
    # set is decided by tiny noise, i.e. a uniformly random set
    L, rows = 64, 100
    x = sc.sample_sphere(jax.random.key(3), (2, 2, L), 8, 1.0, jnp.float64)
    logits = 1e-3 * jax.random.normal(jax.random.key(5), (2, 2, rows, L))
    w = jax.nn.softmax(logits.at[0, :, :, 7].set(8.0), axis=-1)
    out = md.topn_study(jax.random.key(4), w, x, (1,), (1, 5, 64))
    p = out["critical"]["p_b"]
    assert p[0, 0] < 1e-6  # the top-1 set (key 7) is not a random one
    assert p[0, 1] > 1e-3
    assert out["critical"]["b"].tolist()[0] == 64
    # the stable rule at a level between the uniform head's p-values moves its critical N
    lo, hi = sorted(p[:2, 1])
    assert out["critical"]["b"].tolist()[1] == 1
    strict = md.topn_study(jax.random.key(4), w, x, (1,), (1, 5, 64), alpha=0.5 * (lo + hi))
    assert strict["critical"]["b"].tolist() == [64, 5 if p[0, 1] < p[1, 1] else 64]
    with pytest.raises(ValueError, match="critical_ns"):
        md.topn_study(jax.random.key(4), w, x, (1,), (5, 1))
    with pytest.raises(ValueError, match="weights"):
        md.topn_study(jax.random.key(4), w[0], x[0], (1,), (1,))


def test_gradient_probes_reach_corrected_bound_not_published_one():
    logits = jnp.zeros((2, 256, 2))  # two equal logits: ||J||_2 = 1/(2T)
    out = md.gradient_probes(jax.random.key(5), logits, (0.1, 1.0), (1e-3, 10.0))
    np.testing.assert_allclose(out["bound"], [5.0, 0.5])
    np.testing.assert_allclose(out["published"], [math.sqrt(2), 0.25])  # min{1/(4T), sqrt 2}
    assert np.all(out["above_bound"] == 0)
    small = out["max"][:, 0, :]  # eps = 1e-3: close to the sup over directions
    assert np.all(small <= out["bound"][:, None]) and np.all(small > 0.99 * out["bound"][:, None])
    assert out["above_published"][1, 0] > 0 and out["above_published"][0, 0] > 0
    assert np.all(out["max"][:, 1, :] < out["max"][:, 0, :])  # large steps saturate
    assert out["rows"] == 512


# --- Bohbot ----------------------------------------------------------------------------------


def test_resampled_moment_errors_equal_theory_pushforward_errors():
    P, d, R, ns = 40, 3, 4, (8, 30)
    y = jax.random.normal(jax.random.key(6), (P, d))
    a = 0.7 * jax.random.normal(jax.random.key(7), (d, d))
    w_v = jax.random.normal(jax.random.key(8), (2, d))
    q, k, v = (y @ a.T)[:, None, :], y[:, None, :], (y @ w_v.T)[:, None, :]
    out = md.resampled_moment_errors(jax.random.key(10), q, k, v, ns, R, 1.0)
    ref_m, ref_c = sc.pushforward_moments(y[None], a, w_v)
    np.testing.assert_allclose(out["ref_mean"][0], ref_m[0], rtol=1e-10)
    for i, n in enumerate(ns):
        idx = jax.random.randint(jax.random.fold_in(jax.random.key(10), i), (R, n), 0, P)
        me, ce = sc.pushforward_errors(y[idx], a, ref_m[0], ref_c[0], w_v)
        np.testing.assert_allclose(out["mean_error"][i, :, 0], me, rtol=1e-9)
        np.testing.assert_allclose(out["cov_error"][i, :, 0], ce, rtol=1e-9)
    assert out["mean_error"].shape == (2, R, 1)
    with pytest.raises(ValueError, match="replicates"):
        md.resampled_moment_errors(jax.random.key(10), q, k, v, ns, 1, 1.0)


def test_head_horizons_on_isotropic_tokens():
    P, Dm, N, H = 64, 6, 2, 3
    # tokens with exactly mean 0 and covariance c I: orthonormal columns orthogonal to ones
    basis, _ = np.linalg.qr(np.concatenate([np.ones((P, 1)), np.random.default_rng(0)
                                            .standard_normal((P, Dm))], axis=1))
    c = 0.3
    x = math.sqrt(c * P) * basis[:, 1:]
    rng = np.random.default_rng(1)
    wq, wk = rng.standard_normal((Dm, N, H)), rng.standard_normal((Dm, N, H))
    scale = 1 / math.sqrt(H)
    out = md.head_horizons(x, wq, wk, scale)
    want = [c * scale * np.linalg.norm(wk[:, n] @ wq[:, n].T, 2) for n in range(N)]
    np.testing.assert_allclose(out["horizon"], want, rtol=1e-9)
    np.testing.assert_allclose(out["horizon_authors"], np.asarray(want) / scale, rtol=1e-9)
    np.testing.assert_allclose(out["predicted_beta"], 0.5 / (1 + np.asarray(want) ** 2))
    with pytest.raises(ValueError, match="wq"):
        md.head_horizons(x, wq[:-1], wk, scale)


def test_moment_fits_recover_known_rates():
    ns = np.asarray(md._geom(64, 384, 10))
    rng = np.random.default_rng(2)
    beta = np.asarray([0.5, 0.1])
    errors = (2.0 * ns[:, None, None] ** -beta[None, None, :]
              * np.exp(0.01 * rng.standard_normal((10, 400, 2))))
    out = md.moment_fits(ns, errors, predicted_beta=np.asarray([0.3, 0.1]))
    np.testing.assert_allclose(out["slope"], -beta, atol=0.01)
    assert out["verdict_half"] == ["verified", "refuted"]
    assert out["verdict_curve"] == ["refuted", "verified"]
    with pytest.raises(ValueError, match="predicted_beta"):
        md.moment_fits(ns, errors, predicted_beta=np.asarray([0.3]))


# --- end to end on the real model ------------------------------------------------------------

_TINY = ["--preset", "cpu", "--no-progress", "--lengths", "8,16,32", "--windows", "2",
         "--topn-layers", "0", "--topn-lengths", "8,16,32", "--topn-windows", "2",
         "--topn-queries", "8", "--topn-ns", "1,5", "--critical-ns", "1,2,5",
         "--probe-queries", "4", "--bohbot-length", "32", "--bohbot-ns", "4,8,16",
         "--bohbot-replicates", "4", "--text-chars", "20000"]


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    return md.minilm_encoder()


def test_tiny_run_writes_json_plots_report_and_resumes(tmp_path, encoder, monkeypatch):
    import json

    monkeypatch.setattr(md, "minilm_encoder", lambda: encoder)
    config, _ = md.config_from_args(_TINY + ["--out", str(tmp_path / "whole")])
    whole = md.run(config, progress=False, say=lambda m: None)

    # A run killed during its last study keeps the finished ones and continues from them.
    cut, _ = md.config_from_args(_TINY + ["--out", str(tmp_path / "cut")])

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(md, "bohbot_study", killed)
        with pytest.raises(KeyboardInterrupt):
            md.run(cut, progress=False, say=lambda m: None)
    assert sorted(p.name for p in md.parts_dir(cut).iterdir()) == ["dispersion.json", "topn.json"]
    said = []
    resumed = md.run(cut, progress=False, say=said.append)
    assert resumed["timing"]["loaded"] == ["dispersion", "topn"]
    assert any("dispersion: loaded" in s for s in said)
    for name in ("model", "dispersion", "topn", "bohbot", "claims"):
        assert resumed[name] == whole[name], name

    path = md.main(_TINY + ["--out", str(tmp_path / "cut")])
    results = json.loads(path.read_text())
    assert results["timing"]["loaded"] == ["dispersion", "topn", "bohbot"]
    ent = np.asarray(results["dispersion"]["entropy"]["mean"])  # [L, layers, heads]
    assert ent.shape == (3, 6, 12) and np.all(ent <= np.log([8, 16, 32])[:, None, None] + 1e-5)
    figs = [path.with_name(f"{path.stem}-{f}.png") for f in ("dispersion", "topn", "probes", "bohbot")]
    assert all(f.stat().st_size > 10_000 for f in figs)
    section = md.report_section(path, base_dir=tmp_path)
    assert "| 5 |" in section and all(f"cut/{f.name}" in section for f in figs)
    assert section.count("**") >= 2 * len(results["claims"])
