"""Max retrieval (Velickovic et al., "Softmax is not Enough", arXiv 2410.01104, Sec. 2 and App. A).

Each item carries a priority ``p ~ U(0, 1)`` and a one-hot class of ``num_classes``; the target is
the class of the item with the largest priority. Item features go through an MLP encoder, a query
(a fixed input vector: it carries nothing about the set, so its MLP yields a learned query) through
another, one attention head (:func:`jaxattn.attention` with the row's variant, so a GPU runs the
fused kernels) attends from the query to the items, and an MLP decoder predicts the class.

Training uses sets of at most ``max_train_items`` items (each example's size drawn uniformly in
``[1, max_train_items]``, padding hidden by ``key_value_seq_lengths``); testing uses larger sets.

Rows (a trained model per row, except ``softmax+adaptive``, which is the softmax model itself):

* ``softmax`` -- trained and tested with softmax;
* ``softmax+adaptive`` -- the same softmax weights, adaptive temperature at inference only;
* ``ssmax`` -- trained with scalable-softmax, ``s`` learned (one per head, initialised at 0.43);
* ``rbf+reg`` -- trained with RBF attention and one register (the origin as sink);
* ``adaptive`` -- trained with adaptive temperature (gradient through beta).

A *unit* is one trained model (variant, seed) with every row it evaluates. Each finished unit is
written at once, atomically, to ``<preset>-<digest>.parts/<variant>-seed<k>.json``; a rerun of the
same config and versions loads it instead of training again. Inside a unit, training state is
saved with orbax-checkpoint every ``checkpoint_every`` steps (the GPU preset's trainings take
minutes), so a run killed mid-training continues from its last checkpoint, and the data of step
``t`` is drawn from ``fold_in(seed key, t)``, so the resumed run sees the batches it would have.

Results: ``results/max_retrieval/<preset>-<digest>.json`` (config, versions, per-seed numbers,
accuracy with 95 % t-intervals over seeds, the head's mean max weight and entropy per size, and
verdicts on the paper's claims computed from those numbers). Plot with
:mod:`experiments.plot_max_retrieval` (``main`` does so unless ``--no-plot``).

Usage::

  python -m experiments.max_retrieval --preset cpu      # about a minute on 2 CPU cores
  python -m experiments.max_retrieval --preset gpu      # paper size, one H100
  python -m experiments.max_retrieval --preset cpu --seeds 0,1,2 --steps 1500
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import jaxattn
from experiments import cli, files, stats
from jaxattn import variants as V

__all__ = ["Config", "PRESETS", "TRAINED", "ROWS", "make_batch", "MaxRetrievalModel", "train_unit",
           "run", "save", "result_path", "parts_dir", "report_section", "main"]

# The trained models, and the rows each evaluates: (row name, variant used at inference; None
# means the variant it was trained with).
TRAINED = ("softmax", "ssmax", "rbf", "adaptive")
UNIT_ROWS = {
    "softmax": (("softmax", None), ("softmax+adaptive", "adaptive")),
    "ssmax": (("ssmax", None),),
    "rbf": (("rbf+reg", None),),
    "adaptive": (("adaptive", None),),
}
ROWS = tuple(row for v in TRAINED for row, _ in UNIT_ROWS[v])
ROW_LABELS = {
    "softmax": "softmax",
    "softmax+adaptive": "softmax, adaptive temperature at inference",
    "ssmax": "scalable-softmax (learned s)",
    "rbf+reg": "RBF + 1 register",
    "adaptive": "softmax trained with adaptive temperature",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on (the JSON embeds it; its hash names the files)."""

    preset: str = "cpu"
    seeds: tuple = (0, 1)
    trained: tuple = TRAINED  # which models to train (a subset of TRAINED)
    num_classes: int = 10
    max_train_items: int = 16
    embed: int = 128  # MLP width and the head's dimension
    query_dim: int = 8  # size of the (constant) query input
    mlp_layers: int = 2  # hidden layers of each MLP
    batch: int = 128
    steps: int = 1000
    learning_rate: float = 1e-3
    weight_decay: float = 1e-3
    ssmax_s0: float = 0.43
    test_sizes: tuple = (16, 64, 256, 1024)
    test_examples: int = 512  # per size and seed
    eval_items: int = 1 << 16  # items per evaluation chunk (bounds memory)
    chunk_steps: int = 50  # training steps per jitted call (one progress-bar update)
    checkpoint_every: int = 0  # orbax checkpoint every this many steps (0: none)
    implementation: str | None = None  # passed to jaxattn.attention
    out_dir: str = "results/max_retrieval"

    def __post_init__(self):
        unknown = set(self.trained) - set(TRAINED)
        if unknown or not self.trained:
            raise ValueError(f"trained must be a non-empty subset of {TRAINED}, got {self.trained}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.checkpoint_every and self.checkpoint_every % self.chunk_steps:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                             f"chunk_steps={self.chunk_steps}")

    def digest(self) -> str:
        """A short hash of the fields that change the numbers (not ``out_dir`` or checkpointing)."""
        skip = {"out_dir", "checkpoint_every"}
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def rows(self) -> tuple:
        return tuple(row for v in self.trained for row, _ in UNIT_ROWS[v])


PRESETS = {
    # 2 CPU cores: narrower MLPs, fewer steps and seeds, sizes up to 1024.
    "cpu": Config(preset="cpu", seeds=(0, 1), embed=64, batch=64, steps=1000,
                  test_sizes=(16, 64, 256, 1024), test_examples=256, eval_items=1 << 15),
    # The paper's setting on one H100: embedding 128, batch 128, sizes up to 16384, 5 seeds.
    "gpu": Config(preset="gpu", seeds=(0, 1, 2, 3, 4), embed=128, batch=128, steps=20000,
                  test_sizes=(16, 64, 256, 1024, 4096, 16384), test_examples=2048,
                  eval_items=1 << 20, chunk_steps=500, checkpoint_every=2000),
}


# ---------------------------------------------------------------------------------------------
# Data


def make_batch(key, batch: int, num_items: int, num_classes: int, *, min_items: int | None = None):
    """A batch of sets.

    Args:
      key: PRNG key.
      batch, num_items: ``[B, S]`` item slots.
      num_classes: classes of the one-hot feature.
      min_items: when given, each set has a size drawn uniformly in ``[min_items, num_items]`` and
        the slots past it are padding; otherwise every set has ``num_items`` items.

    Returns:
      ``(features [B, S, 1 + C] float32, lengths [B] int32, labels [B] int32, priorities [B, S])``:
      features are the priority then the one-hot class; ``labels`` is the class of the valid item
      of largest priority.
    """
    kp, kc, kl = jax.random.split(key, 3)
    priorities = jax.random.uniform(kp, (batch, num_items))
    classes = jax.random.randint(kc, (batch, num_items), 0, num_classes)
    if min_items is None:
        lengths = jnp.full((batch,), num_items, jnp.int32)
    else:
        lengths = jax.random.randint(kl, (batch,), min_items, num_items + 1).astype(jnp.int32)
    valid = jnp.arange(num_items)[None, :] < lengths[:, None]
    best = jnp.argmax(jnp.where(valid, priorities, -1.0), axis=-1)
    labels = jnp.take_along_axis(classes, best[:, None], axis=-1)[:, 0]
    features = jnp.concatenate(
        [priorities[..., None], jax.nn.one_hot(classes, num_classes, dtype=jnp.float32)], axis=-1)
    return features, lengths, labels, priorities


# ---------------------------------------------------------------------------------------------
# Model


class MLP(nnx.Module):
    def __init__(self, din: int, width: int, dout: int, layers: int, *, rngs: nnx.Rngs):
        sizes = [din] + [width] * layers + [dout]
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairs])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


def _variant(name: str, s=None):
    if name == "softmax":
        return V.Softmax()
    if name == "adaptive":
        return V.AdaptiveTemperature()
    if name == "ssmax":
        return V.ScalableSoftmax(s=s)
    if name == "rbf":
        return V.RBF()
    raise ValueError(f"unknown variant {name!r}")


class MaxRetrievalModel(nnx.Module):
    """Item and query MLP encoders, one attention head from the query to the items, an MLP decoder.

    ``variant`` is the training variant; :meth:`__call__` takes another for inference
    (``"adaptive"`` on the softmax weights). SSMax owns its ``s``; RBF owns one register key and
    value, zero-initialised (the origin, a sink every query can fall back to).
    """

    def __init__(self, config: Config, variant: str, *, rngs: nnx.Rngs):
        d, layers = config.embed, config.mlp_layers
        self.variant = variant
        self.query_dim = config.query_dim
        self.implementation = config.implementation
        self.items = MLP(1 + config.num_classes, d, d, layers, rngs=rngs)
        self.query = MLP(config.query_dim, d, d, layers, rngs=rngs)
        self.wq = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.wk = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.wv = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.decoder = MLP(d, d, config.num_classes, layers, rngs=rngs)
        self.s = nnx.data(nnx.Param(jnp.full((1,), config.ssmax_s0)) if variant == "ssmax" else None)
        regs = (nnx.Param(jnp.zeros((1, 1, d))), nnx.Param(jnp.zeros((1, 1, d))))
        self.registers = nnx.data(regs if variant == "rbf" else None)

    def encode(self, features):
        """Item encodings ``[B, S, D]`` (shared by every inference variant of one model)."""
        return self.items(features)

    def head(self, encoded, lengths, variant: str | None = None):
        """Attention from the query to ``encoded`` items and the decoder: ``(logits, stats)``."""
        b = encoded.shape[0]
        qin = jnp.ones((b, self.query_dim), encoded.dtype)
        q = self.wq(self.query(qin))[:, None, None, :]  # [B, T=1, N=1, H]
        k = self.wk(encoded)[:, :, None, :]
        v = self.wv(encoded)[:, :, None, :]
        name = self.variant if variant is None else variant
        var = _variant(name, None if self.s is None else self.s[...])
        registers = None
        if self.registers is not None:
            registers = tuple(r[...] for r in self.registers)
        out, stats = jaxattn.attention(q, k, v, variant=var, key_value_seq_lengths=lengths,
                                       registers=registers, implementation=self.implementation,
                                       return_stats=True)
        return self.decoder(out[:, 0, 0, :]), stats

    def __call__(self, features, lengths, variant: str | None = None):
        return self.head(self.encode(features), lengths, variant)


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def _unit_key(seed: int, variant: str):
    # Every (variant, seed) gets its own stream; test sets depend on the seed only, so the rows
    # of one seed are scored on the same sets (paired comparisons).
    return jax.random.fold_in(jax.random.key(seed), TRAINED.index(variant) + 1)


def _loss(model, features, lengths, labels):
    logits, _ = model(features, lengths)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "num_steps"))
def _train_chunk(graphdef, state, key, start, *, config: Config, num_steps: int):
    def body(state, step):
        model, optimizer = nnx.merge(graphdef, state)
        features, lengths, labels, _ = make_batch(
            jax.random.fold_in(key, step), config.batch, config.max_train_items,
            config.num_classes, min_items=1)
        loss, grads = nnx.value_and_grad(_loss)(model, features, lengths, labels)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return jax.lax.scan(body, state, start + jnp.arange(num_steps))


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "size", "chunk", "chunks",
                                             "inference"))
def _evaluate(graphdef, state, key, *, config, size, chunk, chunks, inference):
    """Sums over ``chunks * chunk`` test sets of ``size`` items, per inference variant: correct
    predictions, the head's max weight and its entropy (from ``return_stats``)."""
    model = nnx.merge(graphdef, state)

    def body(carry, i):
        features, lengths, labels, _ = make_batch(jax.random.fold_in(key, i), chunk, size,
                                                  config.num_classes)
        encoded = model.encode(features)
        sums = []
        for variant in inference:
            logits, stats = model.head(encoded, lengths, variant)
            sums.append(jnp.stack([jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
                                   jnp.sum(stats.max_weight), jnp.sum(stats.entropy)]))
        return carry + jnp.stack(sums), None

    total, _ = jax.lax.scan(body, jnp.zeros((len(inference), 3)), jnp.arange(chunks))
    return total


def _checkpoint_manager(path: pathlib.Path, config: Config):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=1, save_interval_steps=config.checkpoint_every,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(path.absolute(), options=options)


def _kill_hook(event: str) -> None:
    """Test hook: ``JAXATTN_MR_KILL=<event>`` SIGKILLs this process when ``event`` happens, so a
    test can kill a run at an exact point (``unit:1`` after the first unit is written,
    ``step:K`` after the checkpoint of step K)."""
    if os.environ.get("JAXATTN_MR_KILL") == event:
        os.kill(os.getpid(), signal.SIGKILL)


def _float32(fn):
    """Runs ``fn`` with 64-bit types off: the numbers then do not depend on the caller's
    ``jax_enable_x64`` (a test session turns it on), and a resumed unit matches a fresh one."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(False):
            return fn(*args, **kwargs)

    return wrapped


@_float32
def train_unit(config: Config, variant: str, seed: int, *, progress: bool = True,
               checkpoint_dir: pathlib.Path | None = None) -> dict:
    """Trains one model and evaluates its rows at every test size. Returns the unit's numbers."""
    t0 = time.perf_counter()
    key = _unit_key(seed, variant)
    init_key, data_key = jax.random.split(key)
    model = MaxRetrievalModel(config, variant, rngs=nnx.Rngs(int(jax.random.randint(
        init_key, (), 0, 2**31 - 1))))
    tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    start, manager = 0, None
    if config.checkpoint_every and checkpoint_dir is not None:
        import orbax.checkpoint as ocp

        manager = _checkpoint_manager(checkpoint_dir, config)
        if manager.latest_step() is not None:
            start = manager.latest_step()
            target = nnx.to_pure_dict(state)
            restored = manager.restore(start, args=ocp.args.StandardRestore(target))
            nnx.replace_by_pure_dict(state, restored)
    losses = []
    with tqdm(total=config.steps, initial=start, desc=f"{variant} seed {seed}", unit="step",
              disable=not progress, leave=False) as bar:
        step = start
        while step < config.steps:
            n = min(config.chunk_steps, config.steps - step)
            state, chunk_losses = _train_chunk(graphdef, state, data_key, step, config=config,
                                               num_steps=n)
            step += n
            chunk_losses = np.asarray(chunk_losses)
            losses.append(float(chunk_losses.mean()))
            bar.update(n)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if manager is not None and step < config.steps:
                import orbax.checkpoint as ocp

                if manager.save(step, args=ocp.args.StandardSave(nnx.to_pure_dict(state))):
                    manager.wait_until_finished()
                    _kill_hook(f"step:{step}")
    if manager is not None:
        manager.close()
    train_s = time.perf_counter() - t0

    model, _ = nnx.merge(graphdef, state)
    model_state = nnx.state(model)
    model_def = nnx.graphdef(model)
    rows = UNIT_ROWS[variant]
    inference = tuple(variant if inf is None else inf for _, inf in rows)
    out = {row: {"accuracy": [], "max_weight": [], "entropy": []} for row, _ in rows}
    test_key = jax.random.fold_in(jax.random.key(seed), 0)
    for size in config.test_sizes:
        chunk = max(1, min(config.test_examples, config.eval_items // size))
        chunks = math.ceil(config.test_examples / chunk)
        sums = np.asarray(_evaluate(model_def, model_state, jax.random.fold_in(test_key, size),
                                    config=config, size=size, chunk=chunk, chunks=chunks,
                                    inference=inference), np.float64) / (chunk * chunks)
        for (row, _), (acc, mw, ent) in zip(rows, sums, strict=True):
            out[row]["accuracy"].append(float(acc))
            out[row]["max_weight"].append(float(mw))
            out[row]["entropy"].append(float(ent))
    result = {"variant": variant, "seed": seed, "rows": out,
              "loss_curve": {"every": config.chunk_steps, "start": start, "loss": losses},
              "final_loss": losses[-1] if losses else None,
              "seconds": {"train": train_s, "total": time.perf_counter() - t0}}
    if variant == "ssmax":
        result["learned_s"] = np.asarray(model.s[...]).tolist()
    return result


# ---------------------------------------------------------------------------------------------
# Files


def versions() -> dict:
    """Versions of everything that could change the numbers."""
    return files.versions("flax", "optax", "orbax.checkpoint")


result_path = files.result_path
parts_dir = files.parts_dir


def _identity(config: Config, vers: dict) -> dict:
    return files.identity(config, vers)


# ---------------------------------------------------------------------------------------------
# Statistics and claims


def summarise(config: Config, units: list) -> dict:
    """Per row and size: accuracy mean and 95 % CI over seeds, mean max weight and entropy; and
    the claims read from those numbers."""
    sizes = list(config.test_sizes)
    per_row = {}
    for row in config.rows():
        seeds = [u for u in units if row in u["rows"]]
        acc = np.array([u["rows"][row]["accuracy"] for u in seeds])  # [seeds, sizes]
        mw = np.array([u["rows"][row]["max_weight"] for u in seeds])
        ent = np.array([u["rows"][row]["entropy"] for u in seeds])
        acc_mean, acc_ci = stats.over_seeds(acc)
        per_row[row] = {"label": ROW_LABELS[row], "seeds": [u["seed"] for u in seeds],
                        "accuracy": acc.tolist(),
                        "accuracy_mean": acc_mean, "accuracy_ci95": acc_ci,
                        "max_weight_mean": mw.mean(0).tolist(), "entropy_mean": ent.mean(0).tolist()}
    claims = {}
    i_train = sizes.index(config.max_train_items) if config.max_train_items in sizes else 0
    big = len(sizes) - 1
    ood = [j for j, s in enumerate(sizes) if s > config.max_train_items]
    if "softmax" in per_row and big != i_train:
        acc = np.asarray(per_row["softmax"]["accuracy"])
        claims["softmax_falls"] = stats.verdict(
            acc[:, i_train] - acc[:, big],
            f"softmax accuracy falls from {sizes[i_train]} to {sizes[big]} items")
        claims["softmax_falls"]["monotone_mean"] = bool(
            np.all(np.diff(acc.mean(0)[i_train:]) <= 0))
    if "softmax" in per_row and "softmax+adaptive" in per_row and ood:
        base = np.asarray(per_row["softmax"]["accuracy"])
        adapt = np.asarray(per_row["softmax+adaptive"]["accuracy"])
        claims["adaptive_helps_ood"] = stats.verdict(
            (adapt - base)[:, ood].mean(1),
            "adaptive temperature at inference raises the softmax model's accuracy, averaged over "
            f"the out-of-distribution sizes {[sizes[j] for j in ood]}")
        claims["adaptive_not_cure"] = stats.verdict(
            adapt[:, i_train] - adapt[:, big],
            f"with adaptive temperature accuracy still falls from {sizes[i_train]} to {sizes[big]} items")
    return {"sizes": sizes, "rows": per_row, "claims": claims}


# ---------------------------------------------------------------------------------------------
# Running


@_float32
def run(config: Config, *, resume: bool = True, progress: bool = True, say=print) -> dict:
    """Trains and evaluates every (variant, seed) unit and returns the results dict.

    With ``resume``, a unit already written under ``parts_dir(config)`` for this config and these
    versions is loaded instead of recomputed, and an interrupted training continues from its last
    orbax checkpoint.
    """
    t0 = time.perf_counter()
    vers = versions()
    identity = _identity(config, vers)
    parts = parts_dir(config)
    if not resume and parts.exists():
        shutil.rmtree(parts)
    units, loaded, computed = [], [], []
    for variant in config.trained:
        for seed in config.seeds:
            name = f"{variant}-seed{seed}"
            path = parts / f"{name}.json"
            unit = files.resume_part(path, identity, "unit", say) if resume else None
            if unit is None:
                ckpt = parts / f"{name}.ckpt"
                if not resume and ckpt.exists():
                    shutil.rmtree(ckpt)
                unit = train_unit(config, variant, seed, progress=progress, checkpoint_dir=ckpt)
                files.write_atomic(path, json.dumps({**identity, "unit": unit}, indent=1))
                if ckpt.exists():  # the unit's JSON now holds everything the run needs
                    shutil.rmtree(ckpt)
                computed.append(name)
                say(f"{name}: trained ({unit['seconds']['total']:.1f} s, final loss "
                    f"{unit['final_loss']:.4f})")
                _kill_hook(f"unit:{len(computed)}")
            else:
                loaded.append(name)
                say(f"{name}: loaded from {path}")
            units.append(unit)
    summary = summarise(config, units)
    # Seconds are the only numbers that differ between runs of one config: they live under
    # "timing", so a resumed run's JSON equals an uninterrupted one's everywhere else.
    seconds = {f"{u['variant']}-seed{u['seed']}": u["seconds"] for u in units}
    units = [{k: v for k, v in u.items() if k != "seconds"} for u in units]
    return {"experiment": "max_retrieval", "config": dataclasses.asdict(config), "versions": vers,
            **summary, "units": units,
            "timing": {"wall_s": time.perf_counter() - t0, "units": seconds, "loaded": loaded,
                       "computed": computed}}


def save(results: dict, config: Config) -> pathlib.Path:
    path = result_path(config)
    files.write_atomic(path, json.dumps(results, indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(mean: float, half: float) -> str:
    return f"{mean:.3f} ± {half:.3f}" if np.isfinite(half) else f"{mean:.3f}"


def claims_text(results: dict) -> list[str]:
    """One line per claim, from the numbers in ``results``."""
    lines = []
    for claim in results["claims"].values():
        n = len(claim["per_seed"])
        spread = (f" ± {claim['ci95']:.3f}, 95 % t-interval over {n} seeds"
                  if np.isfinite(claim["ci95"]) else ", one seed")
        lines.append(f"{claim['claim']}: **{claim['status']}** (difference "
                     f"{claim['mean_diff']:+.3f}{spread})")
    return lines


def report_section(results_json_path, base_dir=None) -> str:
    """A markdown section for the report: accuracy ± 95 % CI per row and size, the plot, the claims.

    The plot's path is relative to ``base_dir`` (default: the folder above the JSON's, i.e.
    ``results/`` for ``results/max_retrieval/<file>.json``, where the report lives).
    """
    path = pathlib.Path(results_json_path)
    results = json.loads(path.read_text())
    base = path.parent.parent if base_dir is None else pathlib.Path(base_dir)
    plot = os.path.relpath(path.with_suffix(".png"), base)
    sizes = results["sizes"]
    cfg = results["config"]
    lines = ["## Max retrieval (Velickovic et al., arXiv 2410.01104)", "",
             f"Trained on sets of at most {cfg['max_train_items']} items ({cfg['steps']} steps, "
             f"batch {cfg['batch']}, width {cfg['embed']}), tested on {cfg['test_examples']} sets per "
             f"size; accuracy (mean ± 95 % t-interval over {len(cfg['seeds'])} seeds; chance "
             f"{1 / cfg['num_classes']:.2f}).", "",
             "| row | " + " | ".join(str(s) for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for row in results["rows"].values():
        cells = [_fmt(m, h) for m, h in zip(row["accuracy_mean"], row["accuracy_ci95"], strict=True)]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", f"![max retrieval]({plot})", "",
              "The plot shows accuracy, the head's max weight and its entropy against the set size "
              "(the entropy of uniform weights, log n, for scale); it bears on the claim that "
              "softmax attention disperses as sets grow beyond the training size and that adaptive "
              "temperature sharpens it without curing it:", ""]
    lines += [f"- {line}" for line in claims_text(results)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI


def _parser():
    return cli.parser("experiments.max_retrieval", __doc__, Config, PRESETS, default="cpu")


def config_from_args(argv=None):
    """The preset with the command line's overrides, and the parsed arguments."""
    args = _parser().parse_args(argv)
    return cli.config(args, Config, PRESETS), args


def main(argv=None) -> pathlib.Path:
    config, args = config_from_args(argv)
    t0 = time.perf_counter()
    results = run(config, resume=not args.no_resume, progress=not args.no_progress)
    path = save(results, config)
    print(f"wrote {path} ({time.perf_counter() - t0:.1f} s)")
    if not args.no_plot:
        from experiments import plot_max_retrieval

        print(f"wrote {plot_max_retrieval.plot(path)}")
    print(report_section(path))
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
