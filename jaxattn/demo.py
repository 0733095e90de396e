"""The CPU demo: train a small language model on pydoc text with each attention variant.

Prints a table of the final held-out loss and the dispersion of attention (mean entropy and mean
max weight, per layer) for each variant; the forward-only variants (hardmax, top-k) are evaluated
by swapping them into the softmax-trained model. Writes the table as JSON under ``results/demo/``.

Run: ``python -m jaxattn.demo [--steps 200] [--json PATH]``.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import variants as V
from jaxattn.data import VOCAB_SIZE, TextBatches, load_pydoc_bytes
from jaxattn.model import Transformer, eval_step, make_optimizer, train_step


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 150
    batch_size: int = 16
    seq_len: int = 64
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    mlp_dim: int = 256
    learning_rate: float = 3e-3
    seed: int = 0


# (row label, variant to train with, registers)
TRAINED = (
    ("softmax", V.Softmax(), 0),
    ("softmax T=0.5", V.Softmax(temperature=0.5), 0),
    ("adaptive_temperature", V.AdaptiveTemperature(), 0),
    ("scalable_softmax", V.ScalableSoftmax(), 0),
    ("rbf + 1 register", V.RBF(), 1),
)
# (row label, variant swapped into the softmax-trained model at evaluation)
SWAPPED = (("hardmax (eval only)", V.Hardmax()), ("top-4 (eval only)", V.TopK(4)))


def progress(label: str, step: int, total: int, loss: float, width: int = 24) -> None:
    """A one-line progress bar on stderr."""
    done = int(width * step / total)
    bar = "#" * done + "." * (width - done)
    end = "\n" if step == total else ""
    sys.stderr.write(f"\r  {label:<22} [{bar}] {step:>4}/{total} loss {loss:6.3f}{end}")
    sys.stderr.flush()


def _summary(loss, stats):
    return dict(
        eval_loss=float(loss),
        entropy=[float(jnp.mean(s.entropy)) for s in stats],
        max_weight=[float(jnp.mean(s.max_weight)) for s in stats],
    )


def train(cfg: Config, label: str, variant, num_registers: int, tokens: np.ndarray):
    """Trains one model; returns (model, train-loss history)."""
    model = Transformer(VOCAB_SIZE, cfg.seq_len, num_layers=cfg.num_layers, d_model=cfg.d_model,
                        num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, variant=variant,
                        num_registers=num_registers, rngs=nnx.Rngs(cfg.seed))
    optimizer = make_optimizer(model, cfg.learning_rate)
    data = TextBatches(tokens, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    losses = []
    for step in range(1, cfg.steps + 1):
        losses.append(float(train_step(model, optimizer, jnp.asarray(data.next_train()))))
        if step % 10 == 0 or step == cfg.steps:
            progress(label, step, cfg.steps, losses[-1])
    return model, losses, data


def swap_variant(model: Transformer, variant) -> None:
    """Uses ``variant`` in every attention layer of ``model`` (parameters unchanged)."""
    for block in model.blocks:
        block.attn.variant = variant
        block.attn.variant_params = nnx.Dict({})


def run(cfg: Config):
    tokens = load_pydoc_bytes()
    rows = []
    softmax_model = None
    for label, variant, regs in TRAINED:
        t0 = time.perf_counter()
        model, losses, data = train(cfg, label, variant, regs, tokens)
        batch = jnp.asarray(data.eval_batch())
        row = dict(variant=label, first_loss=losses[0], **_summary(*eval_step(model, batch)),
                   seconds=time.perf_counter() - t0)
        rows.append(row)
        if label == "softmax":
            softmax_model, eval_data = model, batch
    for label, variant in SWAPPED:
        swap_variant(softmax_model, variant)
        rows.append(dict(variant=label, first_loss=float("nan"),
                         **_summary(*eval_step(softmax_model, eval_data)), seconds=0.0))
    return rows


def format_table(rows, num_layers: int) -> str:
    head = f"{'variant':<22} {'loss start':>10} {'eval loss':>9}"
    for layer in range(num_layers):
        head += f" {'H L' + str(layer):>7} {'maxw L' + str(layer):>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        start = "-" if np.isnan(r["first_loss"]) else f"{r['first_loss']:.3f}"
        line = f"{r['variant']:<22} {start:>10} {r['eval_loss']:>9.3f}"
        for h, w in zip(r["entropy"], r["max_weight"], strict=True):
            line += f" {h:>7.3f} {w:>8.3f}"
        lines.append(line)
    lines.append("H: mean attention entropy (nats) over heads and queries; maxw: mean max weight.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Config):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default),
                            default=field.default)
    parser.add_argument("--json", default="results/demo/demo.json", help="where to write results")
    args = parser.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    print(f"jaxattn demo: {cfg.num_layers}-layer byte-level LM on pydoc_data.topics, "
          f"{cfg.steps} AdamW steps per variant (jax {jax.__version__}, {jax.default_backend()})")
    rows = run(cfg)
    print(format_table(rows, cfg.num_layers))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), jax=jax.__version__, rows=rows), f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
