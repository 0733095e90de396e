"""Swapping softmax for another variant inside the pretrained all-MiniLM-L6-v2, at inference.

all-MiniLM-L6-v2 was trained with softmax attention. Every one of its six attention layers is a
:class:`jaxattn.MultiHeadAttention`, so :func:`jaxattn.models.bert.with_variant` replaces the
normaliser in all of them at once, with the learned weights unchanged. Per variant, two readings:

* **Embedding cosine.** ``n`` sentences of real English text (:mod:`experiments.corpus`), each
  embedded as sentence-transformers does (mean pooling, L2 normalisation,
  :func:`jaxattn.models.bert.sentence_embeddings`) by the original model, ``e_i``, and by the
  swapped one, ``e'_i``; per sentence :math:`\\cos_i = e_i \\cdot e'_i`, summarised by its mean
  with a 95 % t-interval over sentences, its 5th percentile and minimum; and the share of
  sentences whose nearest other sentence (largest cosine) is the same under both models, which is
  what a retrieval user of the embedding sees.
* **Entropy change per layer against the context length.** Windows of ``L`` tokens of the text
  (``[CLS]``, ``L - 2`` consecutive tokens, ``[SEP]``; nested prefixes of shared starts,
  :func:`experiments.minilm_dispersion.token_windows`), each layer's attention entropy averaged
  over heads and queries (:func:`jaxattn.models.bert.attention_stats`: no ``T x S`` matrix), and
  the change :math:`\\Delta_\\ell(L) = \\bar H^{variant}_\\ell - \\bar H^{softmax}_\\ell`, paired
  over the same windows (mean, 95 % t-interval over windows).

The variants and their stated parameters (``Config``): adaptive temperature with the paper's
polynomial (Velickovic et al., arXiv 2410.01104; ``beta >= 1``, so at layer 0, whose input the
swap does not change, no row's entropy can rise); scalable-softmax at a fixed
``s = 1 / ln 256`` (Nakanishi, arXiv 2501.19399; the logits are multiplied by ``s ln n``, which
is 1 at ``n = 256`` keys, the length sentence-transformers trained this model at: below it SSMax
softens, above it sharpens); hardmax; top-k with ``k = 8``.

Results: ``<out>/<preset>-<digest>.json`` (config, versions, every number, the claims read from
them by :func:`claims_text`). Plots: :mod:`experiments.plot_minilm_variants` (``main`` draws them
unless ``--no-plot``). The run takes a minute or two on 2 CPU cores, so it is not checkpointed.

Usage::

  python -m experiments.minilm_variants --preset cpu --out results/minilm_variants
  python -m experiments.minilm_variants --preset gpu --out results/gpu/minilm_variants
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

import jaxattn
from experiments import cli, files, stats
from experiments import minilm_dispersion as md

__all__ = ["Config", "PRESETS", "VARIANTS", "make_variant", "text_sentences", "cosine_summary",
           "neighbour_agreement", "paired_change", "per_window_slopes", "rounding_floor", "run", "save",
           "result_path", "claims", "claims_text", "report_section", "main"]

VARIANTS = ("adaptive_temperature", "ssmax", "hardmax", "topk")
_LABELS = {"adaptive_temperature": "adaptive temperature", "ssmax": "scalable-softmax",
           "hardmax": "hardmax", "topk": "top-k"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on (the JSON embeds it; its hash names the file)."""

    preset: str = "cpu"
    seed: int = 0
    text: str = "shakespeare"  # "shakespeare" (experiments.corpus plays) or "pydoc"
    text_chars: int = 600_000
    variants: tuple = VARIANTS
    ssmax_s: float = 1.0 / math.log(256.0)  # s ln n = 1 at the model's training length
    topk_k: int = 8
    # embedding cosine
    sentences: int = 256
    min_words: int = 6
    max_words: int = 60
    # entropy change against L
    lengths: tuple = (16, 32, 64, 128, 256, 512)
    windows: int = 4
    out_dir: str = "results/minilm_variants"

    def __post_init__(self):
        if self.text not in ("shakespeare", "pydoc"):
            raise ValueError(f"text must be 'shakespeare' or 'pydoc', got {self.text!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if not self.variants or unknown:
            raise ValueError(f"variants must be a non-empty tuple of {VARIANTS}, got "
                             f"{self.variants!r}")
        if not (np.isfinite(self.ssmax_s) and self.ssmax_s > 0):
            raise ValueError(f"ssmax_s must be finite and > 0, got {self.ssmax_s}")
        if self.topk_k < 1:
            raise ValueError(f"topk_k must be >= 1, got {self.topk_k}")
        if self.sentences < 3:
            raise ValueError(f"sentences must be >= 3 (a nearest other sentence and a spread), "
                             f"got {self.sentences}")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words}, "
                             f"{self.max_words}")
        if (len(self.lengths) < 3 or any(not 3 <= L <= 512 for L in self.lengths)
                or list(self.lengths) != sorted(set(self.lengths))):
            raise ValueError(f"lengths must be >= 3 increasing ints in [3, 512] (a slope in L), "
                             f"got {self.lengths!r}")
        if self.windows < 2:
            raise ValueError(f"windows must be >= 2 (an interval needs two), got {self.windows}")
        if self.text_chars < 1:
            raise ValueError(f"text_chars must be >= 1, got {self.text_chars}")

    def digest(self) -> str:
        """A short hash of the fields that change the numbers (not ``out_dir``)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "out_dir"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


PRESETS = {
    # About a minute on 2 CPU cores.
    "cpu": Config(),
    # More sentences and windows, a longer stretch of text to draw them from.
    "gpu": Config(preset="gpu", sentences=2048, windows=32, text_chars=2_000_000),
}


def make_variant(name: str, config: Config):
    """The :mod:`jaxattn.variants` object of a variant name, with the config's parameters."""
    return {"adaptive_temperature": lambda: jaxattn.AdaptiveTemperature(),
            "ssmax": lambda: jaxattn.ScalableSoftmax(s=config.ssmax_s),
            "hardmax": lambda: jaxattn.Hardmax(),
            "topk": lambda: jaxattn.TopK(k=config.topk_k)}[name]()


# ---------------------------------------------------------------------------------------------
# Pieces (arrays in, arrays out)


def text_sentences(text: str, count: int, seed: int, *, min_words: int = 6,
                   max_words: int = 60) -> list[str]:
    """``count`` sentences of ``text``, drawn without replacement, in text order.

    The text's whitespace is collapsed, it is cut after ``.``, ``!`` or ``?`` followed by a space,
    and pieces of ``min_words`` to ``max_words`` words are the candidates; duplicates are dropped.

    Raises:
      ValueError: fewer candidates than ``count``.
    """
    pieces = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    seen, candidates = set(), []
    for p in pieces:
        if min_words <= len(p.split()) <= max_words and p not in seen:
            seen.add(p)
            candidates.append(p)
    if len(candidates) < count:
        raise ValueError(f"the text holds {len(candidates)} sentences of {min_words} to "
                         f"{max_words} words, fewer than count = {count}: use more text_chars")
    pick = np.sort(np.random.default_rng(seed).choice(len(candidates), count, replace=False))
    return [candidates[i] for i in pick]


def cosine_summary(reference, swapped) -> dict:
    """Per-row cosine of two sets of unit embeddings ``[n, F]`` and its summary.

    Returns:
      ``{"cosine": [n], "mean", "ci95" (half-width of the t-interval), "p05", "min"}``.
    """
    a, b = np.asarray(reference, np.float64), np.asarray(swapped, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"reference and swapped must be [n, F] of one shape, got {a.shape} and "
                         f"{b.shape}")
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    n = cos.size
    return {"cosine": cos, "mean": float(cos.mean()),
            "ci95": float(stats.t975(n) * cos.std(ddof=1) / math.sqrt(n)),
            "p05": float(np.percentile(cos, 5)), "min": float(cos.min())}


def neighbour_agreement(reference, swapped) -> float:
    """The share of rows whose nearest other row (largest cosine) is the same in both sets."""
    def nearest(e):
        e = np.asarray(e, np.float64)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    return float(np.mean(nearest(reference) == nearest(swapped)))


def paired_change(variant, softmax) -> dict:
    """Mean and 95 % t-interval over windows (axis 1) of ``variant - softmax``, per other cell.

    Args:
      variant, softmax: ``[L, W, ...]`` values on the same ``W`` windows.

    Returns:
      ``{"mean": [L, ...], "ci95": [L, ...]}``.
    """
    d = np.asarray(variant, np.float64) - np.asarray(softmax, np.float64)
    w = d.shape[1]
    return {"mean": d.mean(axis=1), "ci95": stats.t975(w) * d.std(axis=1, ddof=1) / math.sqrt(w)}


def per_window_slopes(lengths, values) -> dict:
    """The least-squares slope of ``values`` on ``log L`` per window, then its mean and SE.

    Each window holds every length (nested prefixes), so a slope per window and the spread of
    those slopes is a paired reading of the trend in ``L``.

    Args:
      lengths: ``[L]``.
      values: ``[L, W, ...]``.

    Returns:
      ``{"slope": [...], "se": [...]}`` over the trailing cells.
    """
    x = np.log(np.asarray(lengths, np.float64))
    x = x - x.mean()
    v = np.asarray(values, np.float64)
    slopes = np.tensordot(x, v - v.mean(axis=0), axes=(0, 0)) / np.sum(x * x)  # [W, ...]
    return {"slope": slopes.mean(axis=0),
            "se": slopes.std(axis=0, ddof=1) / math.sqrt(slopes.shape[0])}


# ---------------------------------------------------------------------------------------------
# Running


def _layer_means(model, windows, field: str) -> np.ndarray:
    """Per window and layer, the mean over heads and queries of ``field``: ``[W, layers]``."""
    from jaxattn.models import bert

    return md.window_means(bert.attention_stats(model, windows))[field].mean(axis=-1)


def run(config: Config, *, progress: bool = True, say=print, encoder=None) -> dict:
    """Embeds the sentences and measures the entropies with softmax and every variant."""
    from jaxattn.models import bert

    t0 = time.perf_counter()
    out = {"experiment": "minilm_variants", "config": dataclasses.asdict(config),
           "versions": md.versions()}
    with jax.enable_x64(False):
        enc = md.minilm_encoder() if encoder is None else encoder
        text = md.load_text(dataclasses.replace(md.Config(), text=config.text,
                                                text_chars=config.text_chars))
        sentences = text_sentences(text, config.sentences, config.seed,
                                   min_words=config.min_words, max_words=config.max_words)
        ids = md.token_stream(enc.tokenizer, text)
        windows = [md.token_windows(ids, L, config.windows, config.seed, cls_id=enc.cls_id,
                                    sep_id=enc.sep_id, slot=max(config.lengths))
                   for L in config.lengths]
        models = {"softmax": enc.model}
        models.update({name: bert.with_variant(enc.model, make_variant(name, config))
                       for name in config.variants})
        emb, ent, mw = {}, {}, {}
        for name, model in tqdm(models.items(), desc="variants", disable=not progress,
                                leave=False, file=sys.stderr):
            t1 = time.perf_counter()
            emb[name] = bert.sentence_embeddings(model, enc.tokenizer, sentences)
            ent[name] = np.stack([_layer_means(model, w, "entropy") for w in windows])
            mw[name] = np.stack([_layer_means(model, w, "max_weight") for w in windows])
            say(f"{name}: {time.perf_counter() - t1:.1f} s")
    tokens = [len(e.ids) for e in enc.tokenizer.encode_batch(sentences)]
    out["data"] = {"text": config.text, "sentences": len(sentences),
                   "sentence_tokens_median": float(np.median(tokens)),
                   "sentence_tokens_max": int(max(tokens)), "examples": sentences[:3]}
    out["lengths"] = list(config.lengths)
    out["softmax"] = {"entropy": ent["softmax"], "max_weight": mw["softmax"]}  # [L, W, layers]
    out["variants"] = {}
    for name in config.variants:
        cos = cosine_summary(emb["softmax"], emb[name])
        change = paired_change(ent[name], ent["softmax"])
        out["variants"][name] = {
            "label": _LABELS[name], "variant": repr(make_variant(name, config)),
            "cosine": cos, "neighbour_agreement": neighbour_agreement(emb["softmax"], emb[name]),
            "entropy": ent[name], "max_weight": mw[name],
            "entropy_change": change,
            "entropy_change_slope": per_window_slopes(config.lengths, ent[name] - ent["softmax"])}
    out = json.loads(json.dumps(files.jsonable(out)))
    out["claims"] = claims(out)
    out["timing"] = {"wall_s": time.perf_counter() - t0}
    return out


result_path = files.result_path


def save(results: dict, config: Config) -> pathlib.Path:
    """Writes the results JSON (atomically); returns its path."""
    path = result_path(config)
    files.write_atomic(path, json.dumps(files.jsonable(results), indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# Claims, read from the numbers


def _status(mask) -> str:
    mask = np.asarray(mask, bool)
    return "holds" if mask.all() else ("not observed" if not mask.any() else "partly")


def rounding_floor(lengths) -> np.ndarray:
    """The smallest entropy change (nats) a float32 run resolves at each length.

    A row's entropy sums ``L`` float32 terms of total at most ``log L``; the worst-case error of
    that sum is ``L * 2^-24 * log L`` (``1.9e-4`` nats at ``L = 512``). Two normalisers that
    agree exactly (adaptive temperature with ``beta = 1``) can differ by that much.
    """
    L = np.asarray(lengths, np.float64)
    return L * 2.0 ** -24 * np.log(L)


def _moves(mean, se, floor):
    """``(rises, falls)``: beyond 3 standard errors and beyond the rounding floor."""
    big = np.abs(mean) > floor
    return big & (mean - 3 * se > 0), big & (mean + 3 * se < 0)


def claims(results: dict) -> list[dict]:
    """What the numbers say about each variant, with a status where a claim is exact.

    Rules: a change "rises" or "falls" when it is beyond 3 standard errors of the paired mean
    from 0 (the 95 % half-width over windows divided by the t quantile, times 3) and beyond
    :func:`rounding_floor`.
    """
    out = []
    L = np.asarray(results["lengths"])
    w = results["config"]["windows"]
    q = stats.t975(w)
    floor = rounding_floor(L)[:, None]
    var = results["variants"]
    if "adaptive_temperature" in var:
        ch = var["adaptive_temperature"]["entropy_change"]
        mean, se = np.asarray(ch["mean"]), np.asarray(ch["ci95"]) / q  # [L, layers]
        rises, falls = _moves(mean, se, floor)
        out.append({
            "source": "Velickovic et al., adaptive temperature (beta >= 1)",
            "claim": "layer 0's entropy never rises (exact: a larger inverse temperature lowers a "
                     "row's entropy, and the swap leaves layer 0's input unchanged)",
            "status": "holds" if not rises[:, 0].any() else "refuted",
            "numbers": (f"layer 0 change {mean[0, 0]:+.3f} at L={int(L[0])} to "
                        f"{mean[-1, 0]:+.3f} at L={int(L[-1])} nats; falls beyond 3 SE at "
                        f"{int(falls[:, 0].sum())}/{len(L)} lengths")})
        out.append({
            "source": "Velickovic et al., adaptive temperature",
            "claim": "it lowers the entropy of every layer at every length (deeper layers see "
                     "changed inputs, so this is measured, not implied)",
            "status": _status(falls),
            "numbers": (f"falls beyond 3 SE in {int(falls.sum())}/{falls.size} (L, layer) cells, "
                        f"rises in {int(rises.sum())}; largest drop {mean.min():+.3f} nats")})
        # Paired per window: the change at the largest L minus the change at the smallest.
        d = (np.asarray(var["adaptive_temperature"]["entropy"])
             - np.asarray(results["softmax"]["entropy"]))  # [L, W, layers]
        gap = d[-1] - d[0]
        gap_mean, gap_se = gap.mean(axis=0), gap.std(axis=0, ddof=1) / math.sqrt(gap.shape[0])
        grows = gap_mean + 3 * gap_se < 0
        peak = L[np.argmin(mean, axis=0)]
        out.append({
            "source": "Velickovic et al., dispersion grows with L",
            "claim": f"the entropy adaptive temperature removes is larger at L={int(L[-1])} than "
                     f"at L={int(L[0])}, in every layer",
            "status": _status(grows),
            "numbers": (f"larger beyond 3 SE in {int(grows.sum())}/{grows.size} layers; change at "
                        f"L={int(L[-1])} minus at L={int(L[0])} per layer: "
                        + ", ".join(f"{g:+.3f}" for g in gap_mean)
                        + "; the drop is largest at L = " + ", ".join(str(int(x)) for x in peak)
                        + " (past a peak the drop shrinks: beta is 1 again for entropies above "
                        "5.94 nats, docs/science.md)")})
    if "ssmax" in var:
        ch = var["ssmax"]["entropy_change"]
        mean, se = np.asarray(ch["mean"]), np.asarray(ch["ci95"]) / q
        s = results["config"]["ssmax_s"]
        factor = s * np.log(L)
        rises, falls = _moves(mean[:, 0], se[:, 0], floor[:, 0])
        # At a factor of 1 (to float rounding) the row is unchanged: no direction is predicted.
        same = np.isclose(factor, 1.0, rtol=1e-6, atol=0)
        ok = np.where(same, True, np.where(factor < 1, rises, falls))
        out.append({
            "source": "Nakanishi, scalable-softmax (s ln n times the logits)",
            "claim": f"with s = {s:.4f}, layer 0's entropy rises where s ln L < 1 and falls where "
                     "s ln L > 1 (exact for a scaled row)",
            "status": "holds" if ok.all() else "refuted",
            "numbers": ", ".join(f"L={int(x)}: x{f:.2f} {m:+.3f}"
                                 for x, f, m in zip(L, factor, mean[:, 0], strict=True))})
    for name in var:
        v = var[name]
        c = v["cosine"]
        out.append({
            "source": "measured",
            "claim": f"{v['label']} in place of softmax: sentence embeddings",
            "status": "measured",
            "numbers": (f"cosine to the original {c['mean']:.4f} ± {c['ci95']:.4f} (5th "
                        f"percentile {c['p05']:.4f}, min {c['min']:.4f}); nearest neighbour kept "
                        f"for {100 * v['neighbour_agreement']:.1f} % of sentences")})
    return out


def claims_text(results: dict) -> list[str]:
    """One line per claim."""
    return [f"{c['source']}: {c['claim']}: **{c['status']}** ({c['numbers']})"
            for c in results["claims"]]


def report_section(results_json_path, base_dir=None) -> str:
    """A markdown section: the cosine table, the entropy-change table, both plots, the claims."""
    path = pathlib.Path(results_json_path)
    results = json.loads(path.read_text())
    base = path.parent.parent if base_dir is None else pathlib.Path(base_dir)
    cfg, data = results["config"], results["data"]
    L = results["lengths"]
    lines = ["## Swapping the variant inside all-MiniLM-L6-v2", "",
             f"Softmax replaced at inference in all six layers, weights unchanged. Embeddings of "
             f"{data['sentences']} sentences of {data['text']} (median "
             f"{data['sentence_tokens_median']:.0f} tokens), cosine to the original model's "
             f"(mean ± 95 % t-interval over sentences); entropy change per layer against the "
             f"window length L, paired over {cfg['windows']} windows. Scalable-softmax at "
             f"s = {cfg['ssmax_s']:.4f} (s ln n = 1 at 256 keys), top-k at k = {cfg['topk_k']}.", "",
             "| variant | cosine | 5th pct | min | nearest neighbour kept | "
             + " | ".join(f"ΔH L={x}" for x in L) + " |",
             "|---|---|---|---|---|" + "---|" * len(L)]
    for v in results["variants"].values():
        c = v["cosine"]
        change = np.asarray(v["entropy_change"]["mean"]).mean(axis=1)  # over layers
        lines.append(f"| {v['label']} | {c['mean']:.4f} ± {c['ci95']:.4f} | {c['p05']:.4f} | "
                     f"{c['min']:.4f} | {100 * v['neighbour_agreement']:.1f} % | "
                     + " | ".join(f"{d:+.3f}" for d in change) + " |")
    lines += ["", "ΔH: the change of attention entropy (nats), averaged over heads, queries and "
              "layers; per layer in the plot.", ""]
    for fig, what in (("cosine", "how far each swap moves the sentence embedding (the spread "
                                 "over sentences)"),
                      ("entropy", "the entropy change per layer against L: how each variant "
                                  "counters softmax's dispersion as the context grows")):
        rel = os.path.relpath(path.with_name(f"{path.stem}-{fig}.png"), base)
        lines += [f"![{fig}]({rel})", "", f"The plot shows {what}.", ""]
    lines += [f"- {line}" for line in claims_text(results)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI


def _parser():
    return cli.parser("experiments.minilm_variants", __doc__, Config, PRESETS, default="cpu", resume=False)


def config_from_args(argv=None):
    """The preset with the command line's overrides, and the parsed arguments."""
    args = _parser().parse_args(argv)
    return cli.config(args, Config, PRESETS), args


def main(argv=None) -> pathlib.Path:
    config, args = config_from_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results = run(config, progress=not args.no_progress, say=say)
    path = save(results, config)
    print(f"wrote {path} ({results['timing']['wall_s']:.1f} s)")
    if not args.no_plot:
        from experiments import plot_minilm_variants

        for png in plot_minilm_variants.plot(path):
            print(f"wrote {png}")
    for line in claims_text(results):
        print(f"- {line}")
    return path


if __name__ == "__main__":
    main()
