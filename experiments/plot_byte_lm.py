"""Plots of ``experiments.byte_lm`` from its JSON only (matplotlib, Agg backend).

Two PNGs beside the JSON:

* ``<stem>-loss.png`` -- training loss against step per variant: the mean over seeds with a band
  of the 95 % t-interval, and each seed's curve faintly;
* ``<stem>-length.png`` -- held-out loss against the evaluation length (log2 axis, the training
  length marked) per variant, mean with 95 % error bars; beside it the loss over each window's
  last ``seq_len`` positions (all past the training length) and the mean attention entropy.

Usage::

  python -m experiments.plot_byte_lm results/byte_lm/cpu-<hash>.json
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot", "main"]


def _band(ax, x, mean, half, color, label):
    mean = np.asarray(mean, np.float64)
    half = np.nan_to_num(np.asarray(half, np.float64))  # one seed: no band
    ax.plot(x, mean, color=color, lw=1.6, label=label)
    ax.fill_between(x, mean - half, mean + half, color=color, alpha=0.2, lw=0)


def plot(json_path, out_dir=None) -> list[pathlib.Path]:
    """Draws the figures of one results JSON; returns the PNGs' paths (loss curves, lengths)."""
    json_path = pathlib.Path(json_path)
    results = json.loads(json_path.read_text())
    out_dir = json_path.parent if out_dir is None else pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = results["config"]
    variants = results["variants"]
    title = (f"byte LM on Shakespeare, preset {cfg['preset']}: {cfg['num_layers']} layers, "
             f"d_model {cfg['d_model']}, {cfg['num_heads']} heads, {cfg['positions']} positions, "
             f"length {cfg['seq_len']}, {len(cfg['seeds'])} seeds")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(variants.values()):
        steps = np.asarray(row["loss_curve_steps"])
        for curve in row["loss_curve"]:
            ax.plot(steps, curve, color=f"C{i}", lw=0.6, alpha=0.35)
        _band(ax, steps, row["loss_curve_mean"], row["loss_curve_ci95"], f"C{i}", row["label"])
    ax.set_xlabel(f"step (each point: mean training loss of {cfg['chunk_steps']} steps)")
    ax.set_ylabel("training loss (nats per byte)")
    low = min(np.min(row["loss_curve_mean"]) for row in variants.values())
    first = max(np.max(row["loss_curve_mean"][: max(1, len(row["loss_curve_mean"]) // 4)])
                for row in variants.values())
    ax.set_ylim(low - 0.1, first + 0.1)  # the first points (about log 256) would flatten the rest
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("training loss: mean and 95 % t-interval over seeds", fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    loss_png = out_dir / f"{json_path.stem}-loss.png"
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    lengths = np.asarray(results["eval_lengths"], np.float64)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (("held_out", "held-out loss, all positions (nats per byte)"),
              ("tail_loss", f"held-out loss, last {cfg['seq_len']} positions of each window"))
    for i, row in enumerate(variants.values()):
        # a small horizontal offset per variant keeps overlapping error bars apart
        shift = lengths * 2 ** (0.03 * (i - (len(variants) - 1) / 2))
        for ax, (key, _) in zip(axes[:2], panels, strict=True):
            ax.errorbar(shift, row[f"{key}_mean"], yerr=np.nan_to_num(row[f"{key}_ci95"]),
                        fmt="o-", ms=3, capsize=3, color=f"C{i}", label=row["label"])
        axes[2].plot(lengths, row["entropy_mean"], "o-", ms=3, color=f"C{i}", label=row["label"])
    for ax, (_, name) in zip(axes, (*panels, (None, "mean attention entropy (nats)")), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(int(n)) for n in lengths])
        ax.axvline(cfg["seq_len"], color="grey", lw=0.8, alpha=0.6)
        ax.set_xlabel("evaluation length (vertical line: training length)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + "; mean ± 95 % t-interval over seeds", fontsize=9)
    fig.tight_layout()
    length_png = out_dir / f"{json_path.stem}-length.png"
    fig.savefig(length_png, dpi=120)
    plt.close(fig)
    return [loss_png, length_png]


def main(argv=None) -> list[pathlib.Path]:
    p = argparse.ArgumentParser(prog="python -m experiments.plot_byte_lm")
    p.add_argument("json", help="results JSON of experiments.byte_lm")
    p.add_argument("--out-dir", default=None, help="folder for the PNGs (default: the JSON's)")
    args = p.parse_args(argv)
    paths = plot(args.json, args.out_dir)
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
