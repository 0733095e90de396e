"""Plot of ``experiments.max_retrieval`` from its JSON only (matplotlib, Agg backend).

Three panels against the set size (log scale; the training size marked): accuracy with 95 %
intervals over seeds, the attention head's mean max weight, and its mean entropy beside ``log n``
(the entropy of uniform weights). Writes ``<json stem>.png`` beside the JSON.

Usage::

  python -m experiments.plot_max_retrieval results/max_retrieval/cpu-<hash>.json
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot", "main"]


def plot(json_path, out_path=None) -> pathlib.Path:
    """Draws the figure of one results JSON; returns the PNG's path."""
    json_path = pathlib.Path(json_path)
    results = json.loads(json_path.read_text())
    out_path = json_path.with_suffix(".png") if out_path is None else pathlib.Path(out_path)
    sizes = np.asarray(results["sizes"], np.float64)
    train = results["config"]["max_train_items"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, row in enumerate(results["rows"].values()):
        color = f"C{i}"
        mean = np.asarray(row["accuracy_mean"], np.float64)
        half = np.nan_to_num(np.asarray(row["accuracy_ci95"], np.float64))
        # a small horizontal offset per row keeps overlapping error bars apart
        shift = sizes * 2 ** (0.05 * (i - 2))
        axes[0].errorbar(shift, mean, yerr=half, fmt="o-", ms=3, capsize=3, color=color,
                         label=row["label"])
        axes[1].plot(sizes, row["max_weight_mean"], "o-", ms=3, color=color, label=row["label"])
        axes[2].plot(sizes, row["entropy_mean"], "o-", ms=3, color=color, label=row["label"])
    axes[0].axhline(1 / results["config"]["num_classes"], color="grey", ls=":", label="chance")
    axes[2].plot(sizes, np.log(sizes), "k--", lw=1, label="log n (uniform)")
    titles = ("accuracy (95 % CI over seeds)", "head's max weight", "head's entropy (nats)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.axvline(train, color="grey", lw=0.8, alpha=0.6)
        ax.set_xlabel("items in the set (vertical line: largest training size)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    seeds = len(results["config"]["seeds"])
    fig.suptitle(f"Max retrieval, preset {results['config']['preset']} ({seeds} seeds, "
                 f"{results['config']['steps']} steps); stats from jaxattn.attention(return_stats=True)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv=None) -> pathlib.Path:
    p = argparse.ArgumentParser(prog="python -m experiments.plot_max_retrieval")
    p.add_argument("json", help="results JSON of experiments.max_retrieval")
    p.add_argument("--out", default=None, help="PNG path (default: beside the JSON)")
    args = p.parse_args(argv)
    path = plot(args.json, args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
