"""Convergence rates of attention on token samples (Bohbot et al., arXiv 2512.10656), and hardmax.

Writes ``results/convergence_rates/<preset>-<config-hash>.json`` (config, versions, every number)
and, through :mod:`experiments.plot_convergence_rates`, PNGs beside it.

Each study (``rates``, ``moments``, ``hardmax``) is written as soon as it finishes, atomically, to
``<preset>-<config-hash>.parts/<study>.json``; a rerun of the same config loads the finished
studies instead of recomputing them, so a run killed in its last study loses only that study. A
part written under another config or other versions is recomputed (the output says which).

* ``rates.png`` -- sup error over ``|x| = R`` against ``n`` (log-log), Gaussian and sphere tokens,
  several ``R``, with the fitted slope +- SE and the predicted ``-1/2`` line; each study's JSON
  carries the verdict of :func:`theory.sample_complexity.slope_verdict` (the claim table's rule;
  Gaussian tokens at ``R >= 2`` are pre-asymptotic over the small preset's ``n``, see
  ``theory.check.row_rate_large_radius``);
* ``growth.png`` -- ``C(R) = sqrt(n) E[sup error]`` against ``R``;
* ``moments.png`` -- measured moment exponents ``beta`` (mean, covariance) against the horizon
  ``H`` with the curve ``1/(2(1+H^2))``;
* ``hardmax.png`` -- softmax-to-hardmax: mass off the argmax against ``lambda`` (with the exact
  bounds), the hardmax error against ``n`` on the sphere, and the slope in ``n`` against ``lambda``.

Usage::

  python -m experiments.convergence_rates --preset small     # CPU, a few minutes
  python -m experiments.convergence_rates --preset paper     # the paper's sizes (GPU advised)
  python -m experiments.convergence_rates --preset small --replicates 128 --seed 3

Every estimate comes from :mod:`theory.sample_complexity` and :mod:`theory.hardmax` (attention by
:func:`jaxattn.attention`), in float64.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli, files
from theory import hardmax as hm
from theory import sample_complexity as sc

__all__ = ["Config", "PRESETS", "STUDIES", "run", "save", "parts_dir", "main"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on (the JSON embeds it; its hash names the file).

    ``a_scale`` multiplies a fixed random rotation ``A0``: ``A = a_scale A0`` is the matrix in the
    exponent (any ``1/sqrt(d)`` included), and the horizon is ``H = ||Sigma^(1/2) A Sigma^(1/2)||``.
    """

    preset: str = "small"
    seed: int = 0
    d: int = 4  # token dimension for the rate and growth studies
    sigma2: float = 0.5  # Gaussian tokens N(0, sigma2 I)
    a_scale: float = 1.0
    sphere_radius: float = 1.0  # sphere tokens' radius
    radii: tuple = (0.5, 1.0, 2.0, 3.0)  # query radii R
    ns: tuple = (64, 128, 256, 512, 1024, 2048, 4096)
    replicates: int = 64
    probes: int = 8  # points on |x| = R for the sup
    moment_d: int = 2
    horizons: tuple = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    moment_ns: tuple = (64, 128, 256, 512, 1024)
    moment_replicates: int = 32
    lambdas: tuple = (0.5, 1.0, 2.0, 4.0, 8.0)  # attention scales for the slowdown sweep
    hardmax_dims: tuple = (2, 3, 4)
    out_dir: str = "results/convergence_rates"

    def digest(self) -> str:
        """A short hash of the fields that change the numbers (not ``out_dir``)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "out_dir"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def _geom(lo, hi, k):
    return tuple(int(round(n)) for n in np.geomspace(lo, hi, k))


PRESETS = {
    "small": Config(),
    # The paper's Gaussian setting: d = 50, Sigma = 0.1 I, n in geomspace(1e3, 3e4, 12), 200 reps.
    "paper": Config(preset="paper", d=50, sigma2=0.1, radii=(1.0, 2.0, 4.0, 6.0, 8.0),
                    ns=_geom(1e3, 3e4, 12), replicates=200, probes=16, moment_d=8,
                    horizons=(0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0),
                    moment_ns=_geom(256, 8192, 8), moment_replicates=50,
                    lambdas=(0.5, 1.0, 2.0, 4.0, 8.0, 16.0), hardmax_dims=(2, 3, 4, 8)),
}


def _study_dict(st: sc.RateStudy) -> dict:
    return {"ns": np.asarray(st.ns).tolist(), "mean": np.asarray(st.mean).tolist(),
            "se": np.asarray(st.se).tolist(), "fit": st.fit._asdict()}


def _growth_dict(g: sc.GrowthStudy) -> dict:
    # The verdict on "slope -1/2" is theory.check's rule (sc.slope_verdict), so the experiment and
    # the claim table cannot disagree on the same numbers.
    return {"radii": g.radii.tolist(), "c": g.c.tolist(), "c_se": g.c_se.tolist(),
            "rate_linear": g.rate_linear._asdict(), "rate_quadratic": g.rate_quadratic._asdict(),
            "studies": [{**_study_dict(s), "verdict": sc.slope_verdict(s.fit, -0.5, sc.RATE_FLOOR)}
                        for s in g.studies]}


def rates_and_growth(config: Config, key) -> dict:
    """Sup error vs ``n`` at every radius, and ``C(R)``, for Gaussian and sphere tokens."""
    setup = sc.GaussianSetup(config.d, config.sigma2, config.a_scale)
    gauss = sc.growth_study(jax.random.fold_in(key, 0), setup, config.radii, config.ns,
                            config.replicates, config.probes)
    sphere = sc.growth_study(jax.random.fold_in(key, 1), None, config.radii, config.ns,
                             config.replicates, config.probes,
                             sphere=(config.d, config.sphere_radius, config.a_scale))
    return {"gaussian": _growth_dict(gauss), "sphere": _growth_dict(sphere),
            "gaussian_horizon": setup.horizon()}


def moments(config: Config, key) -> list:
    """Moment exponents of the pushforward for each horizon (Gaussian tokens, ``Sigma = I``)."""
    out = []
    for j, h in enumerate(config.horizons):
        m = sc.gaussian_moment_study(jax.random.fold_in(key, j), sc.GaussianSetup(config.moment_d, 1.0, h),
                                     config.moment_ns, config.moment_replicates)
        out.append({"horizon": m.horizon, "predicted_beta": m.predicted_beta,
                    "mean": _study_dict(m.mean), "cov": _study_dict(m.cov)})
    return out


def hardmax_results(config: Config, key) -> dict:
    """Softmax -> hardmax in ``lambda`` (exact bounds) and in ``n``; slowdown with ``lambda``."""
    logits = jax.random.normal(jax.random.fold_in(key, 0), (1, 16), jnp.float64)
    lams = np.geomspace(0.1, 100.0, 40)
    gaps = [hm.softmax_gap(logits, float(lam)) for lam in lams]
    in_lambda = {"lambdas": lams.tolist(), "gap": float(hm.top_gap(logits)[0]),
                 "off_argmax": [float(g.value[0]) for g in gaps],
                 "lower": [float(g.lower[0]) for g in gaps],
                 "upper": [float(g.upper[0]) for g in gaps]}
    in_n = []
    for d in config.hardmax_dims:
        st = hm.hardmax_sphere_study(jax.random.fold_in(key, 100 + d), d, 1.0, config.ns,
                                     config.replicates)
        want = hm.predicted_hardmax_slope(d)
        in_n.append({"d": d, "predicted_slope": want, **_study_dict(st),
                     "verdict": sc.slope_verdict(st.fit, want, sc.RATE_FLOOR)})
    sweep = hm.scale_sweep(jax.random.fold_in(key, 1), config.moment_d, 1.0, config.lambdas, 1.0,
                           config.ns, config.replicates, config.probes)
    return {"in_lambda": in_lambda, "in_n": in_n,
            "scale_sweep": {"lambdas": sweep.scales.tolist(), "horizons": sweep.horizons.tolist(),
                            "slopes": sweep.slopes.tolist(), "slope_ses": sweep.slope_ses.tolist(),
                            "studies": [_study_dict(s) for s in sweep.studies]}}


def versions() -> dict:
    """Versions of everything that could change the numbers."""
    return files.versions()


# (name, function, fold_in index of its key): the order is the run order.
STUDIES = (("rates", "rates_and_growth", 0), ("moments", "moments", 1), ("hardmax", "hardmax_results", 2))


parts_dir = files.parts_dir


def run(config: Config, progress=print, resume: bool = True) -> dict:
    """Runs every study under float64 and returns the results dict (config and versions included).

    Each finished study is written at once to :func:`parts_dir`; with ``resume``, a study already
    there for this config and these versions is loaded instead of recomputed.
    """
    key = jax.random.key(config.seed)
    vers = versions()
    identity = files.identity(config, vers)
    out = {"config": dataclasses.asdict(config), "versions": vers,
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    parts = parts_dir(config)
    with jax.enable_x64(True):
        for name, fn_name, k in STUDIES:
            path = parts / f"{name}.json"
            if resume:
                result, reason = files.load_part(path, identity, "result")
                if result is not None:
                    progress(f"{name}: finished in an earlier run, loaded from {path}")
                    out[name] = result
                    continue
                if reason is not None:
                    progress(f"{name}: {path} is not reusable, {reason}: recomputing")
            t0 = time.time()
            # Looked up by name at call time, so a caller (or test) can replace a study.
            result = globals()[fn_name](config, jax.random.fold_in(key, k))
            # Through JSON, so a fresh study and one loaded from its part are the same values.
            result = json.loads(json.dumps(result))
            files.write_part(path, identity, "result", result, indent=1)
            out[name] = result
            progress(f"{name}: {time.time() - t0:.1f}s, wrote {path}")
    return out


def save(results: dict, config: Config) -> pathlib.Path:
    """Writes the JSON (atomically); returns its path."""
    path = files.result_path(config)
    files.write_atomic(path, json.dumps(results, indent=1))
    return path


def _slope(study: dict) -> str:
    fit = study["fit"]
    return f"{fit['slope']:+.3f} ± {fit['slope_se']:.3f}"


def report_section(results_json_path, base_dir=None) -> str:
    """A markdown section for the report: the four plots, each with what it shows and the verdicts.

    Every number and verdict is read from the JSON (the verdicts are those of
    :func:`theory.sample_complexity.slope_verdict`, stored by :func:`run`). Plot paths are relative
    to ``base_dir`` (default: the folder above the JSON's, where the report lives).
    """
    path = pathlib.Path(results_json_path)
    res = json.loads(path.read_text())
    base = path.parent.parent if base_dir is None else pathlib.Path(base_dir)

    def png(name):
        return os.path.relpath(path.with_name(f"{path.stem}-{name}.png"), base)

    cfg, rates = res["config"], res["rates"]
    lines = ["## Token-sample convergence rates (Bohbot et al., arXiv 2512.10656) and hardmax", "",
             f"Preset `{cfg['preset']}`: d = {cfg['d']}, n from {min(cfg['ns'])} to {max(cfg['ns'])}, "
             f"{cfg['replicates']} replicates; float64 on {res['versions'].get('backend', 'cpu')}. "
             "Attention over n sampled tokens converges to attention over their distribution at rate "
             "n^(-1/2) (Theorem 1); the verdicts use the claim table's slope rule.", "",
             f"![rates]({png('rates')})", "",
             "Sup error over |x| = R against n, log-log, with the fitted slopes (claim: -1/2):", ""]
    for kind in ("gaussian", "sphere"):
        for radius, study in zip(rates[kind]["radii"], rates[kind]["studies"], strict=True):
            lines.append(f"- {kind} tokens, R = {radius:g}: slope {_slope(study)}, **{study['verdict']}**")
    lines.append("- a slope away from -1/2 at a large radius with Gaussian tokens is pre-asymptotic: the "
                 "constant n MSE / K(x) has not settled over these n (the claim table's large-radius row)")
    g = rates["gaussian"]
    lines += ["", f"![growth]({png('growth')})", "",
              "C(R) = sqrt(n) E[sup error] against R (how the constant grows with the radius): "
              f"Gaussian C from {min(g['c']):.3g} to {max(g['c']):.3g} over R = "
              f"{min(g['radii']):g}..{max(g['radii']):g}.", "",
              f"![moments]({png('moments')})", "",
              "Moment exponents beta of the pushforward (mean, covariance) against the horizon H, with "
              "the curve 1/(2(1+H^2)), a bound on the rate (a measured exponent above it agrees "
              "with the theorem; one below it beyond its error bar would refute it):", ""]
    for m in res["moments"]:
        lines.append(f"- H = {m['horizon']:.2f}: predicted {m['predicted_beta']:.3f}, mean "
                     f"{-m['mean']['fit']['slope']:.3f} ± {m['mean']['fit']['slope_se']:.3f}, covariance "
                     f"{-m['cov']['fit']['slope']:.3f} ± {m['cov']['fit']['slope_se']:.3f}")
    hmx = res["hardmax"]
    lines += ["", f"![hardmax]({png('hardmax')})", "",
              "Softmax to hardmax: the mass off the argmax against the scale lambda between its exact "
              "bounds, the hardmax error against n on the sphere, and the slope in n as lambda grows:", ""]
    for st in hmx["in_n"]:
        lines.append(f"- hardmax on the sphere, d = {st['d']}: slope {_slope(st)} against the predicted "
                     f"{st['predicted_slope']:+.3f}, **{st['verdict']}**")
    sw = hmx["scale_sweep"]
    lines.append(f"- Gaussian tokens: slope {sw['slopes'][0]:+.3f} at lambda = {sw['lambdas'][0]:g}, "
                 f"{sw['slopes'][-1]:+.3f} at lambda = {sw['lambdas'][-1]:g} (convergence slows as the "
                 "scale grows)")
    return "\n".join(lines) + "\n"


def _parser():
    return cli.parser("experiments.convergence_rates", __doc__, Config, PRESETS, default="small",
                      progress=False)


def _args_and_config(argv=None):
    """The parsed arguments and the preset with command-line overrides applied."""
    args = _parser().parse_args(argv)
    return args, cli.config(args, Config, PRESETS)


def config_from_args(argv=None) -> tuple[Config, bool]:
    """The preset with command-line overrides applied, and whether ``--no-plot`` was given."""
    args, config = _args_and_config(argv)
    return config, args.no_plot


def main(argv=None) -> pathlib.Path:
    args, config = _args_and_config(argv)
    no_plot = args.no_plot
    results = run(config, progress=lambda m: print(m, file=sys.stderr, flush=True),
                  resume=not args.no_resume)
    path = save(results, config)
    print(f"wrote {path}")
    if not no_plot:
        from experiments import plot_convergence_rates

        for png in plot_convergence_rates.plot(path):
            print(f"wrote {png}")
    return path


if __name__ == "__main__":
    main()
