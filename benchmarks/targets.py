"""The speed targets of the kernels issue, checked on benchmark JSON: ``python benchmarks/targets.py``.

Reads the rows that ``benchmarks/attention.py`` writes (one or more sweeps, forward and
forward+backward files alike) and prints, per target, each cell's ratio in every sweep and how many
cells meet it. The cells are those of the issue: N >= 4096, D in {64, 128}, causal and not. Ratios
are same-process speed ratios (:func:`benchmarks.attention.speed_ratio`: the median of per-round
ratios where the rows carry them).

  python3 -m benchmarks targets out/bench/h200-fwd-X.json out/bench/h200-fwdbwd-X.json
"""

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.attention import speed_ratio  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Target:
    impl: str  # the implementation measured
    base: str  # what it is compared with
    mode: str  # "fwd" or "fwdbwd"
    at_least: float  # impl's speed / base's speed

    @property
    def name(self):
        return f"{self.impl} {self.mode} >= {self.at_least}x {self.base}"


TARGETS = (
    Target("softmax", "cudnn", "fwd", 0.95),
    Target("softmax", "cudnn", "fwdbwd", 0.9),
    *(Target(impl, "softmax", mode, 0.9) for impl in ("temperature", "ssmax", "ssmax_learned", "rbf")
      for mode in ("fwd", "fwdbwd")),
    Target("rbf", "tokamax_rbf", "fwdbwd", 1.3),
    Target("rbf", "cudnn_rbf", "fwdbwd", 1.4),
    Target("adaptive", "softmax", "fwd", 0.6),
    Target("adaptive", "softmax", "fwdbwd", 0.55),
)


def _in_scope(key):
    D, N, _, _ = key
    return N >= 4096 and D in (64, 128)


def check(sweeps, targets=TARGETS):
    """Per target, ``(cells, met)``: ``cells`` maps ``(D, N, causal)`` to the ratio in each sweep
    (None where a sweep lacks the cell); ``met[i]`` counts the cells sweep ``i`` meets. ``sweeps``
    is a list of row lists; targets with no measured cell are left out."""
    indexed = [({(r["D"], r["N"], r["causal"], r["mode"], r["impl"]): r for r in rows},
                sorted({(r["D"], r["N"], r["causal"], r["mode"]) for r in rows})) for rows in sweeps]
    out = {}
    for t in targets:
        cells, met = {}, [0] * len(sweeps)
        for i, (by_key, keys) in enumerate(indexed):
            for key in keys:
                if key[3] != t.mode or not _in_scope(key):
                    continue
                ratio = speed_ratio(by_key, key, t.impl, t.base)
                if ratio is None:
                    continue
                cells.setdefault(key[:3], [None] * len(sweeps))[i] = ratio
                met[i] += ratio >= t.at_least
        if cells:
            out[t] = (cells, met)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+",
                        help="attention.py JSON; files with the same suffix after the mode "
                             "(h200-fwd-X.json, h200-fwdbwd-X.json) form one sweep")
    args = parser.parse_args(argv)
    groups = {}
    for path in args.files:
        tag = os.path.basename(path).replace("fwdbwd", "MODE").replace("fwd", "MODE")
        with open(path) as f:
            groups.setdefault(tag, []).extend(json.load(f)["rows"])
    names = list(groups)
    print("sweeps:", ", ".join(names))
    for t, (cells, met) in check([groups[n] for n in names]).items():
        counts = " / ".join(f"{m} of {len(cells)}" for m in met)
        print(f"\n{t.name}: met {counts}")
        for (D, N, causal), ratios in sorted(cells.items()):
            text = " / ".join("-" if r is None else f"{r:.3f}{'' if r >= t.at_least else ' x'}"
                              for r in ratios)
            print(f"  D={D:<4} N={N:<6} causal={int(causal)}  {text}")


if __name__ == "__main__":
    main()
