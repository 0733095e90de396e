"""The committed speed summary and the README table made from it.

``python3 -m benchmarks speed ... --summary benchmarks/summary.json`` writes the summary at the end
of a run; ``python3 -m benchmarks summary RAW.json ... --out benchmarks/summary.json`` makes it from
raw rows (several files merge, e.g. a forward and a forward+backward run of one sweep on one
card); ``python3 -m benchmarks readme`` rewrites the README's table between its markers. A test
keeps the README's table equal to the render of the committed summary.

Every ratio is a same-process speed ratio (:func:`benchmarks.attention.speed_ratio`: the median of
per-round ratios of one interleaved comparison), so a row and its base always ran on the same card
in the same conditions.
"""

import argparse
import datetime
import json
import os
import pathlib

from benchmarks.attention import ROWS, speed_ratio

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "benchmarks" / "summary.json"
README = ROOT / "README.md"
START = "<!-- speed-table: made by `python3 -m benchmarks readme` from benchmarks/summary.json -->"
END = "<!-- speed-table end -->"
MODES = ("fwd", "fwdbwd")
RBF_PEERS = ("cudnn_rbf", "tokamax_rbf")


def summarize(raw, command):
    """The summary of one or more raw speed files' contents (``json.load`` of each).

    Args:
      raw: list of dicts as :func:`benchmarks.attention.main` writes (``device``, ``rows``...).
      command: the command line that produced them (stored, and shown under the README table).

    Returns:
      A dict: device, date, versions, the command, and one entry per (cell, implementation) with
      its TFLOP/s and its ratios to cuDNN and to our softmax in that cell.
    """
    if not raw:
        raise ValueError("summarize needs at least one raw speed file")
    devices = {r["device"] for r in raw}
    if len(devices) != 1:
        raise ValueError(f"raw files come from different devices {sorted(devices)}: ratios across "
                         "cards do not compare; summarise one card at a time")
    rows = [row for r in raw for row in r["rows"]]
    by_key = {(r["D"], r["N"], r["causal"], r["mode"], r["impl"]): r for r in rows}
    cells = []
    for (D, N, causal, mode, impl), row in sorted(by_key.items(), key=lambda kv: kv[0][:4]):
        if not row.get("tflops"):
            continue
        key = (D, N, causal, mode)
        cells.append(dict(D=D, N=N, causal=causal, mode=mode, impl=impl,
                          tflops=round(row["tflops"], 1),
                          vs_cudnn=_round(speed_ratio(by_key, key, impl, "cudnn")),
                          vs_softmax=_round(speed_ratio(by_key, key, impl, "softmax"))))
        if impl == "rbf":  # our RBF against the RBF workarounds of other libraries
            cells[-1]["vs_peers"] = {p: r for p in RBF_PEERS
                                     if (r := _round(speed_ratio(by_key, key, impl, p))) is not None}
    first = raw[0]
    return dict(device=first["device"], date=first.get("date") or datetime.date.today().isoformat(),
                jax=first.get("jax"), dtype="bfloat16", heads=first.get("heads"),
                tokens=first.get("tokens"), command=command, cells=cells)


def _round(x):
    return None if x is None else round(x, 3)


def _span(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def render(summary):
    """The README's markdown table of a summary: per row, the range over the measured cells."""
    impls = [i for i in ROWS if any(c["impl"] == i for c in summary["cells"])]
    dims = sorted({c["D"] for c in summary["cells"]})
    lengths = sorted({c["N"] for c in summary["cells"]})
    lines = [
        "| row | what runs | fwd TFLOP/s | fwd ÷ cuDNN | fwd ÷ our softmax "
        "| fwd+bwd TFLOP/s | fwd+bwd ÷ cuDNN | fwd+bwd ÷ our softmax |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for impl in impls:
        cells = [c for c in summary["cells"] if c["impl"] == impl]
        cols = []
        for mode in MODES:
            mine = [c for c in cells if c["mode"] == mode]
            cols += [_span([c["tflops"] for c in mine], "{:.0f}"),
                     "–" if impl == "cudnn" else _span([c["vs_cudnn"] for c in mine], "{:.2f}"),
                     "–" if impl == "softmax" else _span([c["vs_softmax"] for c in mine], "{:.2f}")]
        lines.append(f"| `{impl}` | {ROWS[impl]} | " + " | ".join(cols) + " |")
    rbf = [c for c in summary["cells"] if c["impl"] == "rbf"]
    for peer in RBF_PEERS:
        spans = [_span([c.get("vs_peers", {}).get(peer) for c in rbf if c["mode"] == m], "{:.2f}")
                 for m in MODES]
        if any(x != "–" for x in spans):
            lines += ["", f"Our `rbf` ÷ `{peer}` in the same cells: forward {spans[0]}, "
                          f"forward+backward {spans[1]}."]
    lines += [
        "",
        f"Ranges over head dims H in {{{', '.join(map(str, dims))}}} and sequence lengths T = S in "
        f"{{{', '.join(map(str, lengths))}}}, causal and not; {summary['dtype']}, N = {summary['heads']} "
        f"heads, B * T = {summary['tokens']} tokens. Measured on one {summary['device']} on "
        f"{summary['date']} with jax {summary['jax']} by `{summary['command']}`; every ratio is taken within "
        "one process (the median of per-round ratios of interleaved rounds).",
    ]
    return "\n".join(lines)


def update_readme(readme_text, summary):
    """``readme_text`` with the block between the table markers replaced by :func:`render`."""
    start, end = readme_text.find(START), readme_text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no speed-table markers ({START!r} ... {END!r})")
    return readme_text[:start] + START + "\n" + render(summary) + "\n" + readme_text[end:]


def write_summary(path, summary):
    """Writes ``summary`` as JSON atomically (a temporary file, then a rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks summary",
                                     description="The speed summary of raw speed runs.")
    parser.add_argument("files", nargs="+", help="raw JSON written by `python3 -m benchmarks speed`")
    parser.add_argument("--out", default=str(SUMMARY), help="summary path (default %(default)s)")
    parser.add_argument("--command", default=None,
                        help="the command line that made the raw files (default: theirs)")
    args = parser.parse_args(argv)
    raw = [json.loads(pathlib.Path(p).read_text()) for p in args.files]
    command = args.command or " ; ".join(dict.fromkeys(r.get("command", "?") for r in raw))
    summary = summarize(raw, command)
    write_summary(args.out, summary)
    print(render(summary))
    print(f"\nwrote {args.out}")
    return 0


def readme_main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks readme",
                                     description="Rewrites the README's speed table from the summary.")
    parser.add_argument("--summary", default=str(SUMMARY))
    parser.add_argument("--readme", default=str(README))
    args = parser.parse_args(argv)
    summary = json.loads(pathlib.Path(args.summary).read_text())
    readme = pathlib.Path(args.readme)
    readme.write_text(update_readme(readme.read_text(), summary))
    print(f"rewrote the speed table of {args.readme}")
    return 0
