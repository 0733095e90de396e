"""Dispersion of one attention head against context length, sequence-parallel over a mesh.

Velickovic et al.'s Theorem 2.2 (``docs/science.md``): with every logit in ``[-D, D]`` a softmax
weight is at most ``e^D / (e^D + (N - 1) e^-D)``, so as the context grows the max weight falls like
``1/N`` and the entropy climbs to ``log N``: attention disperses. This runs the claim at lengths
one device need not hold: for each ``N`` in the preset's lengths, one head attends ``N`` keys with
:func:`jaxattn.sharded_attention` (the sequence split over every device of the mesh, the ring
strategy) and ``return_stats=True``, which returns per-query statistics sharded like the queries
(never the ``T x S`` weights). Logits are bounded by construction: queries and keys are uniform on
the sphere of radius ``r`` in ``H`` dimensions, with scale ``1/sqrt(H)``, so ``|z| <= r^2 /
sqrt(H) = D``.

For softmax, scalable-softmax (``s log N`` times the logits: its max weight should not vanish) and
adaptive temperature it records the mean entropy and mean max weight over queries, the largest max
weight against the theorem's bound, and the fitted slopes of ``log max weight`` and of entropy on
``log N`` (theory's claim for softmax: ``-1`` and ``+1``). Each length is checked on sampled
query rows against the single-device float32 reference of those rows.

On the CPU the mesh is 8 host devices (set before jax is imported); on a GPU, the GPU(s)
(``--preset gpu``: lengths up to 2^20 on one device, which runs the fused kernels).

Example::

  PYTHONPATH=. python3 -m experiments.long_dispersion --preset cpu
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import time

if "jax" not in sys.modules and os.environ.get("JAXATTN_HOST_DEVICES", "8") != "0":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={os.environ.get('JAXATTN_HOST_DEVICES', '8')}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxattn  # noqa: E402
from experiments import cli, files  # noqa: E402

__all__ = ["Config", "PRESETS", "VARIANTS", "run", "save", "report_section", "main"]

VARIANTS = ("softmax", "scalable_softmax", "adaptive_temperature")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on (the JSON embeds it; its hash names the file)."""

    preset: str = "cpu"
    seed: int = 0
    head_dim: int = 64
    radius: float = 4.0  # |q| = |k| = r: logits within +-r^2 / sqrt(H) = 2 at H = 64
    lengths: tuple = (512, 1024, 2048, 4096, 8192, 16384)
    check_rows: int = 64
    dtype: str = "float32"
    out_dir: str = "results/long_dispersion"

    def digest(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "out_dir"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


PRESETS = {
    "cpu": Config(),
    "gpu": Config(preset="gpu", lengths=tuple(2 ** p for p in range(12, 21)), dtype="bfloat16",
                  out_dir="results/gpu/long_dispersion"),
}


def _sphere(key, n, dim, radius):
    x = jax.random.normal(key, (1, n, 1, dim), jnp.float32)
    return radius * x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _bound(n, delta):
    """Theorem 2.2's largest possible weight over ``n`` keys with logits in ``[-delta, delta]``."""
    return float(np.exp(delta) / (np.exp(delta) + (n - 1) * np.exp(-delta)))


def measure(config: Config, variant: str, n: int, mesh) -> dict:
    """One head at length ``n``: statistics over the mesh, and the check on sampled rows."""
    kq, kk = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), n))
    dtype = jnp.dtype(config.dtype)
    q = _sphere(kq, n, config.head_dim, config.radius)
    k = _sphere(kk, n, config.head_dim, config.radius)
    par = jaxattn.Parallelism(mesh, sequence_axis="seq", strategy="ring")

    @jax.jit
    def stats(q, k):
        return jaxattn.sharded_attention(q, k, k, parallelism=par, variant=variant,
                                         return_stats=True)[1]

    qd, kd = q.astype(dtype), k.astype(dtype)
    st = jax.block_until_ready(stats(qd, kd))  # compile and run
    t0 = time.perf_counter()
    st = jax.block_until_ready(stats(qd, kd))
    seconds = time.perf_counter() - t0
    ent, mw = np.asarray(st.entropy[0, 0], np.float64), np.asarray(st.max_weight[0, 0], np.float64)
    rows = np.unique(np.linspace(0, n - 1, config.check_rows).astype(np.int64))
    _, ref = jaxattn.attention(qd[:, rows].astype(jnp.float32), kd.astype(jnp.float32),
                               kd.astype(jnp.float32), variant=variant, implementation="xla",
                               return_stats=True)
    err = {"entropy": float(np.abs(ent[rows] - np.asarray(ref.entropy[0, 0])).max()),
           "max_weight": float(np.abs(mw[rows] - np.asarray(ref.max_weight[0, 0])).max())}
    delta = config.radius ** 2 / np.sqrt(config.head_dim)
    return {"n": n, "seconds": seconds, "mean_entropy": float(ent.mean()),
            "mean_max_weight": float(mw.mean()), "largest_max_weight": float(mw.max()),
            "softmax_bound": _bound(n, delta), "check_error": err}


def _slope(x, y):
    slope, _ = np.polyfit(np.log(x), y, 1)
    return float(slope)


def run(config: Config, progress=print) -> dict:
    """Every variant at every length; returns the results dict (config and versions included)."""
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("seq",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    n_dev = len(devices)
    lengths = [n for n in config.lengths if n % n_dev == 0]
    out = {"config": dataclasses.asdict(config), "versions": files.versions(),
           "devices": {"count": n_dev, "kind": devices[0].device_kind},
           "delta": config.radius ** 2 / np.sqrt(config.head_dim), "variants": {}}
    for variant in VARIANTS:
        rows = []
        for n in lengths:
            t0 = time.time()
            rows.append(measure(config, variant, n, mesh))
            progress(f"{variant} N={n}: max weight {rows[-1]['mean_max_weight']:.3g}, entropy "
                     f"{rows[-1]['mean_entropy']:.3f} ({time.time() - t0:.1f}s)")
        ns = np.array([r["n"] for r in rows], float)
        out["variants"][variant] = {
            "rows": rows,
            "log_max_weight_slope": _slope(ns, np.log([r["mean_max_weight"] for r in rows])),
            "entropy_slope": _slope(ns, np.array([r["mean_entropy"] for r in rows])),
            "bound_holds": variant != "softmax" or all(
                r["largest_max_weight"] <= r["softmax_bound"] * (1 + 1e-5) for r in rows),
        }
    return out


def save(results: dict, config: Config) -> pathlib.Path:
    path = files.result_path(config)
    files.write_atomic(path, json.dumps(results, indent=1))
    return path


def plot(path) -> list:
    """``<stem>-dispersion.png``: mean max weight (log-log) and mean entropy against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    res = json.loads(path.read_text())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, v in res["variants"].items():
        ns = [r["n"] for r in v["rows"]]
        ax1.loglog(ns, [r["mean_max_weight"] for r in v["rows"]], "o-", label=variant)
        ax2.semilogx(ns, [r["mean_entropy"] for r in v["rows"]], "o-", label=variant)
    ns = [r["n"] for r in res["variants"]["softmax"]["rows"]]
    ax1.loglog(ns, [r["softmax_bound"] for r in res["variants"]["softmax"]["rows"]], "k--",
               label="Theorem 2.2 bound")
    ax1.loglog(ns, [1 / n for n in ns], "k:", label="1/N")
    ax2.semilogx(ns, np.log(ns), "k:", label="log N")
    ax1.set(xlabel="context length N", ylabel="mean max weight")
    ax2.set(xlabel="context length N", ylabel="mean entropy (nats)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"one head, logits within ±{res['delta']:.2f}, sequence split over "
                 f"{res['devices']['count']} {res['devices']['kind']} device(s)")
    fig.tight_layout()
    png = path.with_name(f"{path.stem}-dispersion.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [png]


def report_section(results_json_path, base_dir=None) -> str:
    """The report's section, read from the JSON only."""
    import os as _os

    path = pathlib.Path(results_json_path)
    res = json.loads(path.read_text())
    base = path.parent.parent if base_dir is None else pathlib.Path(base_dir)
    png = _os.path.relpath(path.with_name(f"{path.stem}-dispersion.png"), base)
    d = res["devices"]
    lines = ["## Dispersion against context length, sequence-parallel (Velickovic et al., "
             "Theorem 2.2)", "",
             f"One head, logits within ±{res['delta']:.2f}, statistics from "
             f"`jaxattn.sharded_attention` (ring) over {d['count']} {d['kind']} device(s); each "
             "length checked on sampled rows against the single-device float32 reference.", "",
             f"![dispersion]({png})", ""]
    for variant, v in res["variants"].items():
        rows = v["rows"]
        worst = max(max(r["check_error"].values()) for r in rows)
        lines.append(f"- {variant}: slope of log max weight on log N {v['log_max_weight_slope']:+.3f}"
                     f", of entropy {v['entropy_slope']:+.3f}; N = {rows[0]['n']}..{rows[-1]['n']}"
                     f" (longest {rows[-1]['seconds']:.2f} s); largest check error {worst:.1e}"
                     + ("; the theorem's bound holds at every N" if variant == "softmax"
                        and v["bound_holds"] else "")
                     + ("; **the bound fails**" if not v["bound_holds"] else ""))
    lines.append("")
    return "\n".join(lines)


def _parser():
    return cli.parser("experiments.long_dispersion", __doc__, Config, PRESETS, default="cpu",
                      resume=False, progress=False)


def main(argv=None) -> pathlib.Path:
    args = _parser().parse_args(argv)
    config = cli.config(args, Config, PRESETS)
    results = run(config, progress=lambda m: print(m, file=sys.stderr, flush=True))
    path = save(results, config)
    print(f"wrote {path}")
    if not args.no_plot:
        for png in plot(path):
            print(f"wrote {png}")
    return path


if __name__ == "__main__":
    main()
