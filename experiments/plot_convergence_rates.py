"""Plots of ``experiments.convergence_rates`` from its JSON only (matplotlib, Agg backend).

Usage::

  python -m experiments.plot_convergence_rates results/convergence_rates/small-<hash>.json
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot", "main"]


def _line(ax, study, label, color, predicted=None):
    ns, mean, se = (np.asarray(study[k], np.float64) for k in ("ns", "mean", "se"))
    fit = study["fit"]
    ax.errorbar(ns, mean, yerr=se, fmt="o", ms=3, color=color, capsize=2)
    grid = np.geomspace(ns.min(), ns.max(), 50)
    ax.plot(grid, np.exp(fit["intercept"]) * grid ** fit["slope"], "-", color=color,
            label=f"{label}: slope {fit['slope']:.3f} ± {fit['slope_se']:.3f}")
    if predicted is not None:  # the predicted slope, anchored at the first point
        ax.plot(grid, mean[0] * (grid / ns[0]) ** predicted, ":", color=color, alpha=0.7)


def plot_rates(res, out):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, kind in zip(axes, ("gaussian", "sphere"), strict=True):
        g = res["rates"][kind]
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(g["radii"])))
        for radius, study, color in zip(g["radii"], g["studies"], colors, strict=True):
            _line(ax, study, f"R={radius:g}", color, predicted=-0.5)
        ax.set(xscale="log", yscale="log", xlabel="n tokens",
               ylabel="E sup_{|x|=R} |Γ_μn(x) − Γ_μ(x)|",
               title=f"{kind} tokens (dotted: slope −1/2)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_growth(res, out):
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for kind, color in (("gaussian", "C0"), ("sphere", "C1")):
        g = res["rates"][kind]
        r, c, se = (np.asarray(g[k]) for k in ("radii", "c", "c_se"))
        lin = g["rate_linear"]
        ax.errorbar(r, c, yerr=se, fmt="o", color=color, capsize=2,
                    label=f"{kind}: log C ≈ {lin['intercept']:.2f} + {lin['slope']:.2f} R")
        grid = np.linspace(r.min(), r.max(), 50)
        ax.plot(grid, np.exp(lin["intercept"] + lin["slope"] * grid), "-", color=color, alpha=0.6)
    ax.set(yscale="log", xlabel="query radius R", ylabel="C(R) = sqrt(n) E[sup error]",
           title="C(R) growth (measured)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_moments(res, out):
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ms = res["moments"]
    h = np.asarray([m["horizon"] for m in ms])
    for key, color in (("mean", "C0"), ("cov", "C1")):
        beta = -np.asarray([m[key]["fit"]["slope"] for m in ms])
        se = np.asarray([m[key]["fit"]["slope_se"] for m in ms])
        ax.errorbar(h, beta, yerr=se, fmt="o", color=color, capsize=2, label=f"β ({key})")
    grid = np.linspace(0, h.max() * 1.05, 100)
    ax.plot(grid, 0.5 / (1 + grid**2), "k-", label="1/(2(1+H²))")
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set(xlabel="horizon H = ||Σ^½ A Σ^½||₂ (A as in the exponent)", ylabel="moment exponent β",
           title="pushforward mean/covariance error ~ n^−β")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_hardmax(res, out):
    hmx = res["hardmax"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lam = hmx["in_lambda"]
    axes[0].plot(lam["lambdas"], lam["off_argmax"], "k-", label="1 − max p (jaxattn)")
    axes[0].plot(lam["lambdas"], lam["lower"], "C0--", label="e^(−λg)/(1+e^(−λg))")
    axes[0].plot(lam["lambdas"], lam["upper"], "C1--", label="(n−1)e^(−λg)/(1+(n−1)e^(−λg))")
    axes[0].set(xscale="log", yscale="log", xlabel="λ", ylabel="mass off the argmax",
                title=f"softmax(λ s) → hardmax (n=16, gap g={lam['gap']:.3f})")
    axes[0].legend(fontsize=7)
    colors = plt.cm.plasma(np.linspace(0, 0.8, len(hmx["in_n"])))
    for item, color in zip(hmx["in_n"], colors, strict=True):
        _line(axes[1], item, f"d={item['d']} (pred. {item['predicted_slope']:.2f})", color,
              predicted=item["predicted_slope"])
    axes[1].set(xscale="log", yscale="log", xlabel="n tokens", ylabel="E max_x |hardmax − ρ Ax/|Ax||",
                title="hardmax on sphere tokens: error vs n")
    axes[1].legend(fontsize=7)
    sw = hmx["scale_sweep"]
    axes[2].errorbar(sw["lambdas"], sw["slopes"], yerr=sw["slope_ses"], fmt="o-", capsize=2)
    axes[2].axhline(-0.5, color="gray", ls=":", label="−1/2")
    axes[2].set(xscale="log", xlabel="attention scale λ (A = λ A0)", ylabel="slope of log error on log n",
                title="Gaussian tokens: convergence slows as λ grows")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot(path) -> list:
    """Draws every figure of a results JSON beside it; returns the PNG paths."""
    path = pathlib.Path(path)
    res = json.loads(path.read_text())
    outs = []
    for name, fn in (("rates", plot_rates), ("growth", plot_growth), ("moments", plot_moments),
                     ("hardmax", plot_hardmax)):
        out = path.with_name(f"{path.stem}-{name}.png")
        fn(res, out)
        outs.append(out)
    return outs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a JSON written by experiments.convergence_rates")
    args = parser.parse_args(argv)
    for out in plot(args.results):
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
