"""The benchmark entry point: ``python3 -m benchmarks <command> [options]``.

Commands that time or check on a GPU (each exits at once with a message on a machine without one):

* ``speed``: every variant with its default options (and named non-default rows) against the peers,
  one process, interleaved rounds (:mod:`benchmarks.attention`); writes raw rows as JSON under
  ``out/bench/`` and, with ``--summary PATH``, the summary that the README's table is made from.
* ``memory``: forward and forward+backward of every variant at N = 131072 (one head group).
* ``tune``: the forward block-size sweep whose winners fill :mod:`pallas_kernels.tuning`.
* ``kernels``: per-kernel times (forward, dq, dk/dv, statistics sweep) per configuration.
* ``profile``: per-kernel GPU times of one call from a profiler trace.
* ``ab --base OTHER_CHECKOUT``: every variant's default timed in this tree and in another checkout,
  one process, interleaved rounds (:mod:`benchmarks.ab`): the no-speed-lost check of a change.
* ``check``: the GPU correctness checks (forward and backward kernels, and the API), fresh random
  inputs against float32 references.

Commands that read results (any machine):

* ``summary RAW.json [RAW.json ...] --out benchmarks/summary.json``: the summary of speed runs.
* ``readme``: rewrites the README's speed table from ``benchmarks/summary.json``.
* ``targets RAW.json ...``: the kernels' speed targets, cell by cell.
* ``same --base OTHER_CHECKOUT``: which cells of ``ab`` lower to the same GPU program and kernels
  in both checkouts (:mod:`benchmarks.same_kernels`; no GPU needed): the cells a change leaves
  alone, and the ones a GPU A/B must time.
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import require_gpu  # noqa: E402

GPU_COMMANDS = ("speed", "memory", "tune", "kernels", "profile", "check", "ab")
COMMANDS = GPU_COMMANDS + ("summary", "readme", "targets", "same")


def _check(argv):
    """The three GPU correctness scripts, one after the other; non-zero if any fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
    rc = 0
    # checks.backward also times by default; here only its correctness cases run, so the three
    # checks fit one GPU session's call (the timing has `python3 -m benchmarks speed`).
    for module, extra in (("checks.forward", []), ("checks.backward", ["--only", "check"]),
                          ("checks.api", [])):
        print(f"== python3 -m {module} {' '.join(extra + argv)}", flush=True)
        rc |= subprocess.call([sys.executable, "-m", module, *extra, *argv], env=env)
    return rc


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks", description=__doc__.split("\n\n")[0],
        epilog="Run `python3 -m benchmarks COMMAND --help` for a command's options.")
    parser.add_argument("command", choices=COMMANDS)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    rest = argv[1:]
    if args.command in GPU_COMMANDS and not any(a in ("-h", "--help") for a in rest):
        require_gpu(f"python3 -m benchmarks {args.command}")
    if args.command == "speed":
        from benchmarks import attention
        return attention.main(rest)
    if args.command == "memory":
        from benchmarks import attention
        return attention.main(["--memory", *rest])
    if args.command == "tune":
        from benchmarks import attention
        return attention.main(["--tune", *rest])
    if args.command == "kernels":
        from benchmarks import kernels
        return kernels.main(rest)
    if args.command == "profile":
        from benchmarks import profile
        return profile.main(rest)
    if args.command == "check":
        return _check(rest)
    if args.command == "ab":
        from benchmarks import ab
        return ab.main(rest)
    if args.command == "summary":
        from benchmarks import summary
        return summary.main(rest)
    if args.command == "readme":
        from benchmarks import summary
        return summary.readme_main(rest)
    if args.command == "same":
        from benchmarks import same_kernels
        return same_kernels.main(rest)
    from benchmarks import targets
    return targets.main(rest)


if __name__ == "__main__":
    sys.exit(main())
