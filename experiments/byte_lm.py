"""Byte-level language models on Shakespeare with each attention variant, and their length generalisation.

A causal transformer (:class:`jaxattn.model.Transformer`, rotary positions by default so that it
can read sequences longer than its training length) is trained on the bytes of Shakespeare's
plays (:func:`experiments.corpus.shakespeare_split`: whole plays, the last tenth held out) with
each variant:

* ``softmax`` -- softmax attention;
* ``softmax_t`` -- softmax at a fixed temperature (``temperature``, 0.5 by default);
* ``rbf`` -- RBF attention with one register (zero-initialised: the origin as sink; the RBF
  post's setting);
* ``ssmax`` -- scalable-softmax, ``s`` learned per layer and head (initialised at 0.43;
  Nakanishi, arXiv 2501.19399);
* ``adaptive`` -- adaptive temperature (Velickovic et al., arXiv 2410.01104) during training and
  evaluation, gradient through ``beta``.

Measured per (variant, seed): the training loss every ``chunk_steps`` steps, and the held-out loss
(mean next-byte cross-entropy, nats) at every evaluation length ``L`` in ``eval_lengths``, from the
training length ``seq_len`` to 16 times it. Every length scores the same held-out bytes: ``n =
eval_tokens / max(eval_lengths)`` spans of ``max(eval_lengths) + 1`` bytes, evenly spaced over the
held-out plays, each cut into windows of ``L + 1`` bytes, so only the context differs between
lengths. Two readings per length:

  loss(L)      = mean over all L positions of each window,
  tail_loss(L) = mean over the window's last seq_len positions (all past the training length
                 when L > seq_len),

and the degradation ``loss(16 seq_len) - loss(seq_len)``, the quantity of the SSMax paper's
length-generalisation claim (SSMax degrades less than softmax). The mean attention entropy per
length is recorded too (attention disperses as the context grows).

Determinism: the parameters of seed ``k`` are drawn from ``fold_in(key(k), 1)`` and the batch of
step ``t`` from ``fold_in(fold_in(key(k), 2), t)``: every variant of a seed starts from the same
draws and reads the same batches (paired comparisons), and a resumed run reads what it would have.

A *unit* is one (variant, seed). Each finished unit is written at once, atomically, to
``<preset>-<digest>.parts/<variant>-seed<k>.json``; a rerun of the same config and versions loads
it. Inside a unit, the training state and the loss curve so far are saved with orbax-checkpoint
every ``checkpoint_every`` steps, so a run killed mid-training continues from its last checkpoint
and its numbers equal an uninterrupted run's.

Throughput: for every variant and every implementation in ``throughput_implementations``
(``("pallas", "xla")`` in the GPU preset), training tokens per second over ``throughput_steps``
steps after a warm-up call, under ``timing`` in the JSON (seconds are the only numbers that differ
between runs).

Results: ``results/byte_lm/<preset>-<digest>.json``; plots by :mod:`experiments.plot_byte_lm`
(``main`` draws them unless ``--no-plot``).

Usage::

  python -m experiments.byte_lm --preset cpu --out results/byte_lm   # a few minutes, 2 cores
  python -m experiments.byte_lm --preset gpu                         # the RBF post's size, a GPU
  python -m experiments.byte_lm --preset cpu --seeds 0,1,2 --steps 600
"""

import dataclasses
import functools
import hashlib
import json
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

from experiments import cli, files, stats
from jaxattn import variants as V
from jaxattn.model import POSITIONS, Transformer

__all__ = ["Config", "PRESETS", "VARIANTS", "LABELS", "load_bytes", "train_batch", "eval_windows",
           "make_variant", "build_model", "train_unit", "measure_throughput", "run", "save",
           "result_path", "parts_dir", "summarise", "claims_text", "report_section", "main"]

VOCAB = 256  # bytes
VARIANTS = ("softmax", "softmax_t", "rbf", "ssmax", "adaptive")
LABELS = {
    "softmax": "softmax",
    "softmax_t": "softmax, fixed temperature",
    "rbf": "RBF + 1 register",
    "ssmax": "scalable-softmax (learned s)",
    "adaptive": "adaptive temperature",
}
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on (the JSON embeds it; its hash names the files)."""

    preset: str = "cpu"
    seeds: tuple = (0, 1)
    variants: tuple = VARIANTS  # a subset of VARIANTS
    held_out_fraction: float = 0.1  # of the plays (whole plays)
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    mlp_dim: int = 256
    positions: str = "rope"  # or "learned" (then no evaluation past seq_len)
    rope_base: float = 10000.0
    seq_len: int = 64  # training length
    batch: int = 16
    steps: int = 400
    learning_rate: float = 3e-3
    warmup_steps: int = 40  # linear warm-up, then cosine decay to a tenth
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    temperature: float = 0.5  # softmax_t's fixed temperature
    ssmax_s0: float = 0.43  # SSMax's initial s (the paper's figure)
    eval_lengths: tuple = (64, 128, 256, 512, 1024)
    eval_tokens: int = 16384  # held-out bytes scored at every length
    eval_batch_tokens: int = 8192  # tokens per evaluation call (bounds memory)
    chunk_steps: int = 25  # training steps per jitted call (one loss-curve point)
    checkpoint_every: int = 0  # orbax checkpoint every this many steps (0: none)
    implementation: str | None = None  # passed to jaxattn.attention
    attention_dtype: str = "float32"  # attention's computation dtype (Pallas: bfloat16)
    throughput_implementations: tuple = ()  # e.g. ("pallas", "xla")
    throughput_steps: int = 20
    out_dir: str = "results/byte_lm"

    def __post_init__(self):
        unknown = set(self.variants) - set(VARIANTS)
        if unknown or not self.variants:
            raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got "
                             f"{self.variants}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.attention_dtype not in DTYPES:
            raise ValueError(f"attention_dtype must be one of {DTYPES}, got "
                             f"{self.attention_dtype!r}")
        for name in ("seq_len", "batch", "steps", "chunk_steps", "eval_tokens",
                     "eval_batch_tokens", "throughput_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        lengths = self.eval_lengths
        if self.seq_len not in lengths or list(lengths) != sorted(set(lengths)):
            raise ValueError(f"eval_lengths must be increasing and contain seq_len={self.seq_len}, "
                             f"got {lengths}")
        if min(lengths) < self.seq_len:
            raise ValueError(f"eval_lengths start at the training length seq_len={self.seq_len}, "
                             f"got {lengths}")
        if self.positions == "learned" and max(lengths) > self.seq_len:
            raise ValueError(f"eval_lengths up to {max(lengths)} need positions='rope': learned "
                             f"positions stop at seq_len={self.seq_len}")
        bad = [n for n in lengths if max(lengths) % n]
        if bad or self.eval_tokens % max(lengths):
            raise ValueError(f"every eval length must divide max(eval_lengths)={max(lengths)} "
                             f"(got {bad}) and eval_tokens={self.eval_tokens} must be a multiple "
                             "of it")
        if self.checkpoint_every and self.checkpoint_every % self.chunk_steps:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                             f"chunk_steps={self.chunk_steps}")

    def digest(self) -> str:
        """A short hash of the fields that change the numbers (not the output folder, the
        checkpointing or the throughput measurement, which goes under ``timing``)."""
        skip = {"out_dir", "checkpoint_every", "throughput_implementations", "throughput_steps"}
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


PRESETS = {
    # 2 CPU cores, all five variants and two seeds in a few minutes: 2 layers, width 64, 4 heads
    # (head dim 16), length 64, evaluated up to 1024 (16x).
    "cpu": Config(preset="cpu"),
    # The RBF post's setting (4 layers, d_model 256, 4 heads, length 256, batch 64, AdamW lr 1e-3,
    # warm-up then cosine) on one GPU with the fused kernels (bfloat16 attention), evaluated up to
    # 4096 (16x); tokens/s of the Pallas and XLA paths per variant.
    "gpu": Config(preset="gpu", seeds=(0, 1, 2), num_layers=4, d_model=256, num_heads=4,
                  mlp_dim=1024, seq_len=256, batch=64, steps=3000, learning_rate=1e-3,
                  warmup_steps=300, eval_lengths=(256, 512, 1024, 2048, 4096),
                  eval_tokens=1 << 18, eval_batch_tokens=1 << 16, chunk_steps=100,
                  checkpoint_every=500, implementation="pallas", attention_dtype="bfloat16",
                  throughput_implementations=("pallas", "xla"), throughput_steps=100),
}


# ---------------------------------------------------------------------------------------------
# Data


@functools.cache
def load_bytes(held_out_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out bytes of Shakespeare's plays (whole plays held out).

    Args:
      held_out_fraction: the fraction of plays held out (see
        :func:`experiments.corpus.shakespeare_split`).

    Returns:
      ``(train, held_out)``, uint8 arrays of the UTF-8 bytes (vocabulary 256).

    Example:
      >>> from experiments import byte_lm
      >>> train, held = byte_lm.load_bytes(0.1)     # doctest: +SKIP
      >>> train.dtype, len(train) > 10 * len(held)  # doctest: +SKIP
      (dtype('uint8'), True)
    """
    from experiments import corpus

    train, held = corpus.shakespeare_split(held_out_fraction)
    return (np.frombuffer(train.encode("utf-8"), np.uint8),
            np.frombuffer(held.encode("utf-8"), np.uint8))


def train_batch(tokens, key, batch: int, seq_len: int):
    """A training batch: ``batch`` windows of ``seq_len + 1`` bytes at uniform random starts.

    ``out[b] = tokens[s_b : s_b + seq_len + 1]``, ``s_b ~ U{0, ..., len(tokens) - seq_len - 1}``.

    Args:
      tokens: uint8 ``[n]`` (a jax or numpy array), ``n > seq_len``.
      key: PRNG key (the step's key: the batch is a function of it).
      batch, seq_len: the batch's shape is ``[batch, seq_len + 1]``.

    Returns:
      int32 ``[batch, seq_len + 1]``: inputs ``[:, :-1]``, targets ``[:, 1:]``.

    Example:
      >>> import jax, numpy as np
      >>> from experiments.byte_lm import train_batch
      >>> train_batch(np.arange(100, dtype=np.uint8), jax.random.key(0), 3, 8).shape
      (3, 9)
    """
    n = tokens.shape[0]
    if n <= seq_len:
        raise ValueError(f"tokens must hold more than seq_len={seq_len} bytes, got {n}")
    starts = jax.random.randint(key, (batch,), 0, n - seq_len)
    idx = starts[:, None] + jnp.arange(seq_len + 1)[None, :]
    return jnp.asarray(tokens)[idx].astype(jnp.int32)


def eval_windows(held_out: np.ndarray, length: int, eval_tokens: int, max_length: int) -> np.ndarray:
    """Held-out windows of ``length + 1`` bytes that predict the same bytes at every length.

    ``n = eval_tokens / max_length`` spans of ``max_length + 1`` bytes start at ``i * stride``,
    ``stride = (len(held_out) - max_length - 1) // n`` (evenly spaced over the held-out plays);
    each span is cut into ``max_length / length`` windows overlapping by one byte, so the
    predicted bytes (every window's ``[1:]``) are the spans' last ``max_length`` bytes whatever
    ``length`` is.

    Args:
      held_out: uint8 ``[m]``.
      length: the evaluation length (divides ``max_length``).
      eval_tokens: predicted bytes in all (a multiple of ``max_length``).
      max_length: the longest evaluation length.

    Returns:
      int32 ``[eval_tokens / length, length + 1]``.

    Example:
      >>> import numpy as np
      >>> from experiments.byte_lm import eval_windows
      >>> w = eval_windows(np.arange(200, dtype=np.uint8), 4, 16, 8)
      >>> w.shape, w[0].tolist(), w[1].tolist()
      ((4, 5), [0, 1, 2, 3, 4], [4, 5, 6, 7, 8])
    """
    if max_length % length or eval_tokens % max_length:
        raise ValueError(f"length={length} must divide max_length={max_length}, which must divide "
                         f"eval_tokens={eval_tokens}")
    spans = eval_tokens // max_length
    stride = (len(held_out) - max_length - 1) // spans
    if stride < max_length:
        raise ValueError(f"held_out has {len(held_out)} bytes, too few for {spans} disjoint spans "
                         f"of {max_length + 1}: lower eval_tokens")
    per_span = max_length // length
    starts = (np.arange(spans)[:, None] * stride + np.arange(per_span)[None, :] * length).ravel()
    return held_out[starts[:, None] + np.arange(length + 1)[None, :]].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Model and training


def make_variant(name: str, config: Config):
    """``(variant, num_registers)`` of a variant name (see :data:`VARIANTS`)."""
    if name == "softmax":
        return V.Softmax(), 0
    if name == "softmax_t":
        return V.Softmax(temperature=config.temperature), 0
    if name == "rbf":
        return V.RBF(), 1
    if name == "ssmax":
        # jaxattn.MultiHeadAttention learns s per head, initialised at the variant's s
        return V.ScalableSoftmax(s=config.ssmax_s0), 0
    if name == "adaptive":
        return V.AdaptiveTemperature(), 0
    raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")


def build_model(config: Config, variant: str, seed: int, *, implementation="config"):
    """The seed's transformer with ``variant`` (parameters from ``fold_in(key(seed), 1)``)."""
    var, registers = make_variant(variant, config)
    init = int(jax.random.randint(jax.random.fold_in(jax.random.key(seed), 1), (), 0, 2**31 - 1))
    impl = config.implementation if implementation == "config" else implementation
    return Transformer(VOCAB, config.seq_len, num_layers=config.num_layers,
                       d_model=config.d_model, num_heads=config.num_heads,
                       mlp_dim=config.mlp_dim, variant=var, num_registers=registers,
                       positions=config.positions, rope_base=config.rope_base,
                       implementation=impl, attention_dtype=jnp.dtype(config.attention_dtype),
                       rngs=nnx.Rngs(init))


def _optimizer(model, config: Config):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.steps,
        end_value=0.1 * config.learning_rate)
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm),
                     optax.adamw(schedule, weight_decay=config.weight_decay))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def _token_losses(model, windows):
    """Per-token next-byte cross-entropy ``[B, L]`` (nats) of ``windows [B, L + 1]``."""
    logits = model(windows[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]


def _loss(model, batch):
    return jnp.mean(_token_losses(model, batch))


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "num_steps"))
def _train_chunk(graphdef, state, tokens, key, start, *, config: Config, num_steps: int):
    def body(state, step):
        model, optimizer = nnx.merge(graphdef, state)
        batch = train_batch(tokens, jax.random.fold_in(key, step), config.batch, config.seq_len)
        loss, grads = nnx.value_and_grad(_loss)(model, batch)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return jax.lax.scan(body, state, start + jnp.arange(num_steps))


@functools.partial(jax.jit, static_argnames=("graphdef", "tail"))
def _eval_sums(graphdef, state, windows, *, tail: int):
    """Sums over ``windows [B, L + 1]``: loss over all positions, over the last ``tail``, and
    the attention entropy averaged over layers (summed over batch, heads and queries)."""
    model = nnx.merge(graphdef, state)
    logits, stats = model(windows[:, :-1], return_stats=True)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    losses = -jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
    entropy = sum(jnp.sum(s.entropy.astype(jnp.float32)) for s in stats) / max(len(stats), 1)
    return jnp.stack([jnp.sum(losses), jnp.sum(losses[:, -tail:]), entropy])


def _checkpoint_manager(path: pathlib.Path, config: Config):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=1, save_interval_steps=config.checkpoint_every,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(path.absolute(), options=options)


def _kill_hook(event: str) -> None:
    """Test hook: ``JAXATTN_BLM_KILL=<event>`` SIGKILLs this process when ``event`` happens, so a
    test can kill a run at an exact point (``unit:1`` after the first unit is written,
    ``step:K`` after the checkpoint of step K)."""
    if os.environ.get("JAXATTN_BLM_KILL") == event:
        os.kill(os.getpid(), signal.SIGKILL)


def _float32(fn):
    """Runs ``fn`` with 64-bit types off: the numbers then do not depend on the caller's
    ``jax_enable_x64`` (a test session turns it on), and a resumed unit matches a fresh one."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(False):
            return fn(*args, **kwargs)

    return wrapped


def evaluate(model, config: Config, held_out: np.ndarray, *, progress: bool = False) -> dict:
    """Held-out loss, tail loss and mean attention entropy at every evaluation length."""
    graphdef, state = nnx.split(model)
    out = {"loss": [], "tail_loss": [], "entropy": []}
    top = max(config.eval_lengths)
    for length in tqdm(config.eval_lengths, desc="held-out lengths", leave=False,
                       disable=not progress):
        windows = eval_windows(held_out, length, config.eval_tokens, top)
        per_call = max(1, min(len(windows), config.eval_batch_tokens // length))
        sums = np.zeros(3)
        for i in range(0, len(windows), per_call):
            sums += np.asarray(_eval_sums(graphdef, state, jnp.asarray(windows[i:i + per_call]),
                                          tail=config.seq_len), np.float64)
        n_tail = len(windows) * config.seq_len
        out["loss"].append(float(sums[0] / config.eval_tokens))
        out["tail_loss"].append(float(sums[1] / n_tail))
        out["entropy"].append(float(sums[2] / (config.eval_tokens * config.num_heads)))
    return out


@_float32
def train_unit(config: Config, variant: str, seed: int, *, progress: bool = True,
               checkpoint_dir: pathlib.Path | None = None) -> dict:
    """Trains one model and evaluates it on the held-out plays. Returns the unit's numbers."""
    t0 = time.perf_counter()
    train, held_out = load_bytes(config.held_out_fraction)
    tokens = jnp.asarray(train)
    data_key = jax.random.fold_in(jax.random.key(seed), 2)
    model = build_model(config, variant, seed)
    optimizer = _optimizer(model, config)
    graphdef, state = nnx.split((model, optimizer))

    start, losses, manager = 0, [], None
    if config.checkpoint_every and checkpoint_dir is not None:
        import orbax.checkpoint as ocp

        manager = _checkpoint_manager(checkpoint_dir, config)
        if manager.latest_step() is not None:
            start = manager.latest_step()
            restored = manager.restore(start, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(nnx.to_pure_dict(state)),
                curve=ocp.args.JsonRestore()))
            nnx.replace_by_pure_dict(state, restored["state"])
            losses = list(restored["curve"]["loss"])
    steady_s, steady_steps = 0.0, 0
    with tqdm(total=config.steps, initial=start, desc=f"{variant} seed {seed}", unit="step",
              disable=not progress, leave=False) as bar:
        step = start
        while step < config.steps:
            n = min(config.chunk_steps, config.steps - step)
            tc = time.perf_counter()
            state, chunk_losses = _train_chunk(graphdef, state, tokens, data_key, step,
                                               config=config, num_steps=n)
            chunk_losses = np.asarray(chunk_losses)
            if step > start:  # the first call of a process compiles
                steady_s += time.perf_counter() - tc
                steady_steps += n
            step += n
            losses.append(float(chunk_losses.mean()))
            bar.update(n)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if manager is not None and step < config.steps:
                import orbax.checkpoint as ocp

                saved = manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
                    curve=ocp.args.JsonSave({"loss": losses})))
                if saved:
                    manager.wait_until_finished()
                    _kill_hook(f"step:{step}")
    if manager is not None:
        manager.close()
    train_s = time.perf_counter() - t0

    model, _ = nnx.merge(graphdef, state)
    held = evaluate(model, config, held_out, progress=progress)
    result = {"variant": variant, "seed": seed,
              "loss_curve": {"every": config.chunk_steps, "loss": losses},
              "final_train_loss": losses[-1],
              "held_out": held,
              "seconds": {"train": train_s, "total": time.perf_counter() - t0,
                          "train_tokens_per_s": (steady_steps * config.batch * config.seq_len
                                                 / steady_s if steady_s else None)}}
    if variant == "ssmax":
        result["learned_s"] = [np.asarray(b.attn.variant_params["s"][...]).tolist() for b in model.blocks]
    return result


@_float32
def measure_throughput(config: Config, variant: str, implementation: str | None) -> float:
    """Training tokens per second of ``variant`` on ``implementation``: one jitted call of
    ``throughput_steps`` steps timed after a warm-up call of the same shape."""
    train, _ = load_bytes(config.held_out_fraction)
    tokens = jnp.asarray(train)
    model = build_model(config, variant, 0, implementation=implementation)
    graphdef, state = nnx.split((model, _optimizer(model, config)))
    key = jax.random.key(0)
    call = functools.partial(_train_chunk, graphdef, config=config,
                             num_steps=config.throughput_steps)
    state, losses = call(state, tokens, key, 0)
    jax.block_until_ready(losses)
    t0 = time.perf_counter()
    state, losses = call(state, tokens, key, config.throughput_steps)
    jax.block_until_ready((state, losses))
    seconds = time.perf_counter() - t0
    return config.throughput_steps * config.batch * config.seq_len / seconds


# ---------------------------------------------------------------------------------------------
# Files


def versions() -> dict:
    """Versions of everything that could change the numbers."""
    return files.versions("flax", "optax", "orbax.checkpoint")


result_path = files.result_path
parts_dir = files.parts_dir


def _identity(config: Config, vers: dict) -> dict:
    return files.identity(config, vers, skip=("out_dir", "throughput_implementations", "throughput_steps"))


# ---------------------------------------------------------------------------------------------
# Statistics and claims


def summarise(config: Config, units: list) -> dict:
    """Per variant: loss curve, held-out loss and tail loss per length, attention entropy, and
    the degradation from the training length to the longest, each with mean and 95 %
    t-interval over seeds; and the claims read from those numbers."""
    lengths = list(config.eval_lengths)
    i_train, i_long = lengths.index(config.seq_len), len(lengths) - 1
    per = {}
    for name in config.variants:
        seeds = sorted((u for u in units if u["variant"] == name), key=lambda u: u["seed"])
        curve = [u["loss_curve"]["loss"] for u in seeds]
        loss = np.asarray([u["held_out"]["loss"] for u in seeds])
        tail = np.asarray([u["held_out"]["tail_loss"] for u in seeds])
        ent = np.asarray([u["held_out"]["entropy"] for u in seeds])
        degr = loss[:, i_long] - loss[:, i_train]
        row = {"label": LABELS[name], "seeds": [u["seed"] for u in seeds],
               "loss_curve_steps": [config.chunk_steps * (k + 1) for k in range(len(curve[0]))],
               "loss_curve": curve, "held_out": loss.tolist(), "tail_loss": tail.tolist(),
               "degradation": degr.tolist()}
        row["loss_curve_mean"], row["loss_curve_ci95"] = stats.over_seeds(curve)
        row["held_out_mean"], row["held_out_ci95"] = stats.over_seeds(loss)
        row["tail_loss_mean"], row["tail_loss_ci95"] = stats.over_seeds(tail)
        row["entropy_mean"] = ent.mean(0).tolist()
        row["degradation_mean"], row["degradation_ci95"] = stats.mean_ci(degr)
        if name == "ssmax":
            row["learned_s_mean"] = [float(np.mean(u["learned_s"])) for u in seeds]
        per[name] = row
    return {"eval_lengths": lengths, "variants": per,
            "claims": _claims(per, lengths[i_train], lengths[i_long])}


def _claims(per: dict, short: int, long: int) -> dict:
    claims = {}
    if long == short:
        return claims
    span = f"from length {short} to {long}"
    deg = {name: np.asarray(row["degradation"]) for name, row in per.items()}
    at_train = {name: np.asarray(row["held_out"])[:, 0] for name, row in per.items()}
    if "softmax" in per:
        claims["softmax_degrades"] = stats.verdict(
            deg["softmax"], f"softmax's held-out loss rises {span} (it does not generalise "
            "past its training length)")
    if "softmax" in per and "ssmax" in per:
        claims["ssmax_degrades_less"] = stats.verdict(
            deg["softmax"] - deg["ssmax"],
            f"scalable-softmax's held-out loss degrades less than softmax's {span} (Nakanishi's "
            "length-generalisation claim)")
        claims["ssmax_better_at_train_length"] = stats.verdict(
            at_train["softmax"] - at_train["ssmax"],
            f"scalable-softmax's held-out loss at the training length {short} is below softmax's")
    if "softmax" in per and "rbf" in per:
        claims["rbf_better_at_train_length"] = stats.verdict(
            at_train["softmax"] - at_train["rbf"],
            f"RBF + register's held-out loss at the training length {short} is below softmax's "
            "(the RBF post's 'slightly better')")
    if len(per) > 1:
        order = sorted(per, key=lambda name: float(deg[name].mean()))
        best, second = order[0], order[1]
        verdict = stats.verdict(deg[second] - deg[best],
                           f"{per[best]['label']} degrades least {span}, ahead of "
                           f"{per[second]['label']}")
        verdict["ranking"] = order
        verdict["degradation_means"] = {name: float(deg[name].mean()) for name in order}
        claims["least_degradation"] = verdict
    return claims


# ---------------------------------------------------------------------------------------------
# Running


@_float32
def run(config: Config, *, resume: bool = True, progress: bool = True, say=print) -> dict:
    """Trains and evaluates every (variant, seed) unit, measures throughput, returns the results.

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
    for variant in config.variants:
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
                held = unit["held_out"]["loss"]
                say(f"{name}: trained ({unit['seconds']['total']:.1f} s, held-out loss "
                    f"{held[0]:.4f} at {config.eval_lengths[0]}, {held[-1]:.4f} at "
                    f"{config.eval_lengths[-1]})")
                _kill_hook(f"unit:{len(computed)}")
            else:
                loaded.append(name)
                say(f"{name}: loaded from {path}")
            units.append(unit)
    throughput = {}
    for variant in tqdm(config.variants if config.throughput_implementations else (),
                        desc="throughput", disable=not progress, leave=False):
        throughput[variant] = {str(impl): measure_throughput(config, variant, impl)
                               for impl in config.throughput_implementations}
    summary = summarise(config, units)
    # Seconds are the only numbers that differ between runs of one config: they live under
    # "timing", so a resumed run's JSON equals an uninterrupted one's everywhere else.
    seconds = {f"{u['variant']}-seed{u['seed']}": u["seconds"] for u in units}
    units = [{k: v for k, v in u.items() if k != "seconds"} for u in units]
    return {"experiment": "byte_lm", "config": dataclasses.asdict(config), "versions": vers,
            **summary, "units": units,
            "timing": {"wall_s": time.perf_counter() - t0, "units": seconds,
                       "tokens_per_s": throughput, "loaded": loaded, "computed": computed}}


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
                     f"{claim['mean_diff']:+.3f} nats{spread})")
    return lines


def report_section(results_json_path, base_dir=None) -> str:
    """A markdown section: held-out loss ± 95 % CI per variant and length, tokens/s, the plots,
    the claims. Plot paths are relative to ``base_dir`` (default: the folder above the JSON's)."""
    path = pathlib.Path(results_json_path)
    results = json.loads(path.read_text())
    base = path.parent.parent if base_dir is None else pathlib.Path(base_dir)
    lengths = results["eval_lengths"]
    cfg = results["config"]
    lines = ["## Byte-level language model on Shakespeare (each variant)", "",
             f"{cfg['num_layers']} layers, d_model {cfg['d_model']}, {cfg['num_heads']} heads, "
             f"{cfg['positions']} positions, trained at length {cfg['seq_len']} for {cfg['steps']} "
             f"steps of batch {cfg['batch']}; held-out loss (nats per byte, mean ± 95 % "
             f"t-interval over {len(cfg['seeds'])} seeds) on {cfg['eval_tokens']} bytes of the "
             "held-out plays at each evaluation length.", "",
             "| variant | " + " | ".join(str(n) for n in lengths) + " | degradation |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for row in results["variants"].values():
        cells = [_fmt(m, h) for m, h in zip(row["held_out_mean"], row["held_out_ci95"],
                                            strict=True)]
        cells.append(_fmt(row["degradation_mean"], row["degradation_ci95"]))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    tps = results["timing"].get("tokens_per_s") or {}
    if tps:
        impls = list(next(iter(tps.values())))
        lines += ["", f"Training tokens per second ({results['versions']['device']}):", "",
                  "| variant | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
        for name, row in tps.items():
            lines.append(f"| {LABELS[name]} | " + " | ".join(f"{row[i]:,.0f}" for i in impls)
                         + " |")
    for suffix, what in (("-loss.png", "loss curves"), ("-length.png", "held-out loss by length")):
        plot = os.path.relpath(path.with_name(path.stem + suffix), base)
        lines += ["", f"![{what}]({plot})"]
    lines += ["", "Claims, read from the numbers above:", ""]
    lines += [f"- {line}" for line in claims_text(results)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI


def _parser():
    return cli.parser("experiments.byte_lm", __doc__, Config, PRESETS, default="cpu")


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
        from experiments import plot_byte_lm

        for png in plot_byte_lm.plot(path):
            print(f"wrote {png}")
    print(report_section(path))
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
