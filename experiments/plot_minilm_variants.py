"""Plots of ``experiments.minilm_variants`` from its results JSON only (matplotlib, Agg, PNG).

Two figures beside the JSON, named ``<json stem>-<figure>.png``:

* ``cosine`` -- per variant, the distribution over sentences of the cosine between the swapped
  model's embedding and the original's (box: quartiles, whiskers: 5th and 95th percentiles);
* ``entropy`` -- per layer, the entropy change (variant minus softmax, nats, mean and 95 %
  t-interval over windows) against the window length ``L``, one line per variant, with softmax's
  own entropy and ``log L`` in each panel's title for scale.

Usage::

  python -m experiments.plot_minilm_variants results/minilm_variants/cpu-<hash>.json
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _cosine(results, path):
    var = results["variants"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    data = [np.asarray(v["cosine"]["cosine"]) for v in var.values()]
    ax.boxplot(data, whis=(5, 95), showfliers=True, flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(data) + 1), [v["label"] for v in var.values()])
    ax.set_ylabel("cosine to the softmax embedding")
    ax.set_title(f"all-MiniLM-L6-v2, {results['data']['sentences']} sentences: the variant "
                 "swapped in at inference", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _entropy(results, path):
    L = np.asarray(results["lengths"])
    base = np.asarray(results["softmax"]["entropy"])  # [L, W, layers]
    layers = base.shape[-1]
    cols = 3
    rows = -(-layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.1 * rows), sharex=True,
                             constrained_layout=True, squeeze=False)
    for layer, ax in enumerate(axes.ravel()):
        if layer >= layers:
            ax.set_visible(False)
            continue
        for v in results["variants"].values():
            ch = v["entropy_change"]
            mean = np.asarray(ch["mean"])[:, layer]
            half = np.asarray(ch["ci95"])[:, layer]
            ax.errorbar(L, mean, yerr=half, marker="o", ms=3, capsize=2, label=v["label"])
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        h = base[:, :, layer].mean(axis=1)
        ax.set_title(f"layer {layer}: softmax H = {h[0]:.2f} .. {h[-1]:.2f} "
                     f"(log L = {np.log(L[0]):.2f} .. {np.log(L[-1]):.2f})", fontsize=8)
        ax.grid(alpha=0.3)
        if layer % cols == 0:
            ax.set_ylabel("entropy change (nats)")
        if layer >= layers - cols:
            ax.set_xlabel("window length L (tokens)")
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle("Attention entropy with the variant minus with softmax (mean over heads and "
                 "queries; 95 % over windows)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES = (("cosine", _cosine), ("entropy", _entropy))


def plot(json_path, out_dir=None) -> list[pathlib.Path]:
    """Draws both figures; returns the PNGs' paths.

    Args:
      json_path: a results JSON of :mod:`experiments.minilm_variants`.
      out_dir: where to write (default: beside the JSON).
    """
    json_path = pathlib.Path(json_path)
    results = json.loads(json_path.read_text())
    if results.get("experiment") != "minilm_variants":
        raise ValueError(f"{json_path} is not a results JSON of experiments.minilm_variants")
    out_dir = json_path.parent if out_dir is None else pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in FIGURES:
        path = out_dir / f"{json_path.stem}-{name}.png"
        draw(results, path)
        written.append(path)
    return written


def main(argv=None) -> list[pathlib.Path]:
    p = argparse.ArgumentParser(prog="python -m experiments.plot_minilm_variants")
    p.add_argument("json", help="results JSON of experiments.minilm_variants")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: beside the JSON)")
    args = p.parse_args(argv)
    paths = plot(args.json, args.out)
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
