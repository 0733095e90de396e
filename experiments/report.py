"""The report of the main job: every experiment's plots, tables and verdicts in one markdown file.

Reads what the experiments wrote under a results folder (``results/`` for the CPU presets,
``results/gpu/`` for the GPU preset) and writes ``<results>/report.md``. Each experiment module
renders its own section (``report_section(json_path, base_dir)``), from its JSON only, so the
report never holds a number that its JSON does not; this module adds the header (machine,
versions, wall times) and the theory claim table (``theory.check --out``).

Usage::

  python -m experiments.report                        # results/report.md
  python -m experiments.report --results results/gpu  # the GPU preset's report
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import platform
import sys

__all__ = ["EXPERIMENTS", "latest_json", "json_timings", "theory_section", "build", "main"]

# (results subfolder, module with report_section); the report's order.
EXPERIMENTS = (
    ("max_retrieval", "experiments.max_retrieval"),
    ("minilm_dispersion", "experiments.minilm_dispersion"),
    ("minilm_variants", "experiments.minilm_variants"),
    ("byte_lm", "experiments.byte_lm"),
    ("convergence_rates", "experiments.convergence_rates"),
    ("long_dispersion", "experiments.long_dispersion"),
)
THEORY_JSON = "theory/claims.json"


def latest_json(folder: pathlib.Path) -> pathlib.Path | None:
    """The newest ``*.json`` directly in ``folder`` (an experiment's results; parts live deeper)."""
    files = sorted(pathlib.Path(folder).glob("*.json"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def theory_section(path: pathlib.Path) -> str:
    """The claim table of ``theory.check`` with a count of each status."""
    doc = json.loads(pathlib.Path(path).read_text())
    rows = doc["rows"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = ["## The papers' claims, checked numerically (`python -m theory.check`)", "",
             f"{len(rows)} claims ({tally}), {doc['settings']} settings, {doc['seconds']:.0f} s. "
             "`verified`: the check passes with its bound shown tight on extremal inputs; `refuted`: "
             "a counterexample is in the numbers column (a finding, see docs/science.md); `measured`: "
             "a quantity the papers state no bound for, reported with its rule.", "",
             "| claim | source | status | numbers |", "|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['source']} | {r['status']} | {r['numbers']} |" for r in rows]
    return "\n".join(lines) + "\n"


def json_timings(results) -> dict:
    """``{step: seconds}`` from the JSON files themselves, for a report built without ``run.sh``'s
    timings (e.g. steps run in separate calls): each experiment's last invocation, which for a
    resumed run is only the part it computed."""
    results = pathlib.Path(results)
    out = {}
    theory = results / THEORY_JSON
    if theory.is_file():
        out["theory"] = float(json.loads(theory.read_text())["seconds"])
    for sub, _ in EXPERIMENTS:
        path = latest_json(results / sub)
        timing = json.loads(path.read_text()).get("timing") if path else None
        if isinstance(timing, dict) and "wall_s" in timing:
            out[sub] = float(timing["wall_s"])
    return out


def _header(results: pathlib.Path, timings: dict) -> str:
    import jax

    dev = jax.devices()[0]
    lines = ["# jaxattn: the papers' experiments", "",
             f"Written {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} by "
             f"`python -m experiments.report --results {results}`; Python {platform.python_version()}, "
             f"jax {jax.__version__} on {dev.platform} ({getattr(dev, 'device_kind', dev.platform)}), "
             f"{os.cpu_count()} CPU cores. Each section is rendered from its experiment's JSON, which "
             "also holds the config and versions; every verdict is computed from the numbers."]
    if timings:
        lines += ["", "| step | wall time |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} s |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def build(results, *, timings: dict | None = None) -> tuple[str, list]:
    """The report's markdown and the list of missing parts.

    Args:
      results: the results folder the experiments wrote into.
      timings: optional ``{step: seconds}`` for the header (``run.sh`` passes its own).

    Returns:
      ``(markdown, missing)``: missing holds the subfolders with no results JSON.
    """
    results = pathlib.Path(results)
    parts, missing = [_header(results, timings or json_timings(results))], []
    theory = results / THEORY_JSON
    if theory.is_file():
        parts.append(theory_section(theory))
    else:
        missing.append(str(theory))
    for sub, module_name in EXPERIMENTS:
        path = latest_json(results / sub)
        if path is None:
            missing.append(str(results / sub))
            parts.append(f"## {sub}\n\nNot run: no results JSON in `{results / sub}`.\n")
            continue
        module = importlib.import_module(module_name)
        parts.append(module.report_section(path, base_dir=results))
    return "\n".join(parts), missing


def _timings(text: str | None) -> dict:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        name, _, secs = item.partition("=")
        out[name.strip()] = float(secs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results", help="the folder the experiments wrote into")
    p.add_argument("--timings", default=None, help="step=seconds,... for the header (run.sh)")
    p.add_argument("--allow-missing", action="store_true",
                   help="write the report even when an experiment has no results (exit 0)")
    args = p.parse_args(argv)
    text, missing = build(args.results, timings=_timings(args.timings))
    out = pathlib.Path(args.results) / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    for m in missing:
        print(f"missing: {m}", file=sys.stderr)
    return 0 if (not missing or args.allow_missing) else 1


if __name__ == "__main__":
    sys.exit(main())
