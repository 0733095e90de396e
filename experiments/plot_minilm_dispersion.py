"""Plots of ``experiments.minilm_dispersion`` from its results JSON only (matplotlib, Agg, PNG).

Four figures beside the JSON, named ``<json stem>-<figure>.png``:

* ``dispersion`` -- per layer, every head's mean entropy against ``L`` with ``log L`` (the
  entropy of uniform weights) for scale, and its mean max weight against ``L`` (log-log) with
  ``1/L``;
* ``topn`` -- the top-N distances (both readings of Mudarisov et al.'s Eq. 7; median over the
  studied layers and heads) against ``L`` for each ``N``, beside a random ``N``-subset's, and the
  critical ``N`` of the KS test against ``L`` (median and range over heads, with ``N = L``);
* ``probes`` -- finite-difference probes ``||p(l + eps u) - p(l)|| / eps`` of the heads' logit rows
  (largest and mean over rows) against ``eps``, per temperature, with the corrected bound
  ``1/(2T)`` and Corollary 3's published ``min{1/(4T), sqrt 2}``;
* ``bohbot`` -- layer 0's mean and covariance errors against ``n`` per head, and the fitted
  exponents ``beta = -slope`` against the horizon ``H`` (convention stated on the plot) with
  ``1/(2(1 + H^2))`` and ``1/2``.

Usage::

  python -m experiments.plot_minilm_dispersion results/minilm_dispersion/cpu-<hash>.json
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot", "main"]


def _array(x):
    """JSON lists (``None`` for JSON's null) as float arrays with NaN."""
    return np.asarray(x, dtype=np.float64) if x is not None else np.asarray(np.nan)


def _median(a):
    """Median over the last axis of ``a [K, M]``, NaN where a row has no finite value (N > L)."""
    return np.asarray([np.median(r[np.isfinite(r)]) if np.isfinite(r).any() else np.nan for r in a])


def _dispersion(results, path):
    d = results["dispersion"]
    L = _array(d["lengths"])
    ent, mw = _array(d["entropy"]["mean"]), _array(d["max_weight"]["mean"])  # [K, layers, heads]
    layers = ent.shape[1]
    fig, axes = plt.subplots(2, layers, figsize=(3.2 * layers, 6.4), sharex=True, squeeze=False)
    for j in range(layers):
        for h in range(ent.shape[2]):
            axes[0, j].plot(L, ent[:, j, h], "-", lw=0.9, alpha=0.8, color=f"C{h % 10}")
            axes[1, j].plot(L, mw[:, j, h], "-", lw=0.9, alpha=0.8, color=f"C{h % 10}")
        axes[0, j].plot(L, np.log(L), "k--", lw=1.2, label="log L (uniform)")
        axes[1, j].plot(L, 1.0 / L, "k--", lw=1.2, label="1/L (uniform)")
        axes[0, j].set_title(f"layer {j}: entropy (nats)")
        axes[1, j].set_title(f"layer {j}: max weight")
        axes[1, j].set_yscale("log")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[1, j].set_xlabel("L (tokens, [CLS] and [SEP] included)")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    cfg = results["config"]
    fig.suptitle(f"all-MiniLM-L6-v2 (encoder), mean over queries and {cfg['windows']} windows of "
                 f"{results['model']['text']}; one line per head (Velickovic et al., Thm 2.2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _topn(results, path):
    t = results["topn"]
    L, ns = _array(t["lengths"]), t["ns"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, r, title in ((axes[0], "a", "reading a: ||sum_{i not in I} p_i x_i - s||"),
                         (axes[1], "b", "reading b: sum_{i not in I} ||p_i x_i - s||")):
        top, rand = _array(t["top"][r]["mean"]), _array(t["random"][r]["mean"])  # [L, N, l, h]
        for b, n in enumerate(ns):
            med = _median(top[:, b].reshape(len(L), -1))
            med_r = _median(rand[:, b].reshape(len(L), -1))
            ax.plot(L, med, "o-", ms=3, color=f"C{b}", label=f"top-{n}")
            ax.plot(L, med_r, "x--", ms=3, color=f"C{b}", alpha=0.7, label=f"random {n}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L")
        ax.set_title(title + "\nmedian over layers and heads", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for r, marker in (("a", "s"), ("b", "o")):
        crit = _array(t["critical"][r]).reshape(len(L), -1)  # -1: none
        crit = np.where(crit > 0, crit, np.nan)
        axes[2].plot(L, np.nanmedian(crit, axis=1), marker + "-", label=f"median, reading {r}")
        axes[2].fill_between(L, np.nanmin(crit, axis=1), np.nanmax(crit, axis=1), alpha=0.15)
    axes[2].plot(L, L, "k--", lw=1, label="N = L (everything selected)")
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("L")
    axes[2].set_title(f"critical N (KS p > {results['config']['alpha']} for every larger N "
                      "in the grid)\nband: range over heads", fontsize=9)
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"Mudarisov et al.'s protocol on all-MiniLM-L6-v2 (an encoder; they use GPT-2), "
                 f"layers {t['layers']}, x_i = the head's value vectors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _probes(results, path):
    p = results["topn"]["probes"]
    temps, eps = _array(p["temperatures"]), _array(p["eps"])
    mx, mean = _array(p["max"]), _array(p["mean"])  # [layers, T, eps, heads]
    fig, axes = plt.subplots(1, len(temps), figsize=(5.2 * len(temps), 4.2), squeeze=False)
    for a, t in enumerate(temps):
        ax = axes[0, a]
        ax.plot(eps, mx[:, a].max(axis=(0, 2)), "o-", label="largest ratio over rows and heads")
        ax.plot(eps, np.median(mean[:, a], axis=(0, 2)), "s-", label="mean ratio, median head")
        ax.axhline(p["bound"][a], color="k", ls="--", label=f"1/(2T) = {p['bound'][a]:.3g}")
        ax.axhline(p["published"][a], color="r", ls=":",
                   label=f"published min(1/(4T), sqrt 2) = {p['published'][a]:.3g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eps")
        ax.set_title(f"T = {t:g} (logits / T)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"||p(l + eps u) - p(l)|| / eps on MiniLM's logit rows (layers {p['layers']}, "
                 f"L = {int(results['topn']['lengths'][-1])}), random unit u")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bohbot(results, path):
    b = results["bohbot"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    w0 = b["windows"][0]
    ns = _array(w0["ns"])
    for ax, moment in ((axes[0], "mean"), (axes[1], "cov")):
        m, se = _array(w0[moment]["mean"]), _array(w0[moment]["se"])  # [K, heads]
        for h in range(m.shape[1]):
            ax.errorbar(ns, m[:, h], yerr=se[:, h], fmt="-", lw=0.9, color=f"C{h % 10}",
                        label=f"head {h}" if h < 12 else None)
        ref = m[0].mean() * (ns / ns[0]) ** -0.5
        ax.plot(ns, ref, "k--", lw=1.2, label="n^(-1/2)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (tokens resampled from the window)")
        ax.set_title(f"layer 0, window 0: {moment} error "
                     f"({'L2' if moment == 'mean' else 'Frobenius'})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    h = np.concatenate([_array(w["horizon"]) for w in b["windows"]])
    for moment, marker in (("mean", "o"), ("cov", "s")):
        beta = -np.concatenate([_array(w[moment]["slope"]) for w in b["windows"]])
        se = np.concatenate([_array(w[moment]["slope_se"]) for w in b["windows"]])
        axes[2].errorbar(h, beta, yerr=3 * se, fmt=marker, ms=4, capsize=2,
                         label=f"beta of the {moment} error (3 SE)")
    grid = np.geomspace(max(h.min() / 2, 1e-3), h.max() * 2, 200)
    axes[2].plot(grid, 0.5 / (1 + grid**2), "k-", label="1/(2(1+H^2))")
    axes[2].axhline(0.5, color="grey", ls="--", label="1/2")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("horizon H")
    axes[2].set_ylabel("beta = -slope of log error on log n")
    axes[2].set_title("H = ||Sigma^(1/2) A Sigma^(1/2)||_2, A = W_k^T W_q / sqrt(d_head)\n"
                      "(1/sqrt(d) inside A; the authors' code: H sqrt(d_head)); Sigma of the "
                      "window's tokens", fontsize=8)
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    cfg = results["config"]
    fig.suptitle(f"Bohbot et al.'s BERT protocol on all-MiniLM-L6-v2 layer 0: {cfg['bohbot_length']}"
                 f"-token windows ({cfg['bohbot_windows']}), {cfg['bohbot_replicates']} replicates "
                 "per n, tokens resampled with replacement")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES = (("dispersion", "dispersion", _dispersion), ("topn", "topn", _topn),
           ("probes", "topn", _probes), ("bohbot", "bohbot", _bohbot))


def plot(json_path, out_dir=None) -> list[pathlib.Path]:
    """Draws every figure whose study the JSON holds; returns the PNGs' paths.

    Args:
      json_path: a results JSON of :mod:`experiments.minilm_dispersion`.
      out_dir: where to write (default: beside the JSON).

    Returns:
      The paths written, in the order of :data:`FIGURES`.
    """
    json_path = pathlib.Path(json_path)
    results = json.loads(json_path.read_text())
    if results.get("experiment") != "minilm_dispersion":
        raise ValueError(f"{json_path} is not a results JSON of experiments.minilm_dispersion")
    out_dir = json_path.parent if out_dir is None else pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, study, draw in FIGURES:
        if study in results:
            path = out_dir / f"{json_path.stem}-{name}.png"
            draw(results, path)
            written.append(path)
    return written


def main(argv=None) -> list[pathlib.Path]:
    p = argparse.ArgumentParser(prog="python -m experiments.plot_minilm_dispersion")
    p.add_argument("json", help="results JSON of experiments.minilm_dispersion")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: beside the JSON)")
    args = p.parse_args(argv)
    paths = plot(args.json, args.out)
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
