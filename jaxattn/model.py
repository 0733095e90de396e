"""A small pre-norm transformer language model built from :class:`jaxattn.MultiHeadAttention`, and its
jitted optax training step."""

import numbers

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxattn.modules import MultiHeadAttention

__all__ = ["Block", "Transformer", "make_optimizer", "train_step", "eval_step", "cross_entropy"]


class Block(nnx.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, *, variant, num_registers: int,
                 num_kv_heads: int | None = None, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.attn = MultiHeadAttention(num_heads, d_model, num_kv_heads=num_kv_heads,
                                       variant=variant, num_registers=num_registers, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, mlp_dim, rngs=rngs)
        self.down = nnx.Linear(mlp_dim, d_model, rngs=rngs)

    def __call__(self, x, *, return_stats=False):
        h, stats = self.attn(self.attn_norm(x), is_causal=True, return_stats=True)
        x = x + h
        x = x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))
        return (x, stats) if return_stats else x


class Transformer(nnx.Module):
    """A causal language model: token + learned position embeddings, pre-norm blocks, a linear head.

    Args:
      vocab_size: number of tokens.
      max_len: longest sequence.
      num_layers, d_model, num_heads, mlp_dim: the usual sizes.
      variant: attention variant of every layer (name or :class:`jaxattn.variants.Variant`).
      num_registers: learnable register tokens per layer.
      rngs: ``nnx.Rngs``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from jaxattn.model import Transformer
      >>> model = Transformer(256, 16, num_layers=1, d_model=32, num_heads=2, mlp_dim=64,
      ...                     variant="rbf", num_registers=1, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 16), jnp.int32)).shape
      (2, 16, 256)
    """

    def __init__(self, vocab_size: int, max_len: int, *, num_layers: int = 2, d_model: int = 64,
                 num_heads: int = 4, mlp_dim: int = 256, variant="softmax", num_registers: int = 0,
                 num_kv_heads: int | None = None, rngs: nnx.Rngs):
        for name, size, low in (("vocab_size", vocab_size, 1), ("max_len", max_len, 1),
                                ("num_layers", num_layers, 0), ("d_model", d_model, 1),
                                ("mlp_dim", mlp_dim, 1)):
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < low:
                raise ValueError(f"{name} must be an int >= {low}, got {size!r}")
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model)))
        self.blocks = nnx.List([
            Block(d_model, num_heads, mlp_dim, variant=variant, num_registers=num_registers,
                  num_kv_heads=num_kv_heads, rngs=rngs)
            for _ in range(num_layers)
        ])
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def __call__(self, tokens, *, return_stats=False):
        """``tokens [B, T]`` -> logits ``[B, T, V]`` (and per-layer :class:`jaxattn.AttentionStats`)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        max_len = self.pos.shape[0]
        if tokens.shape[1] > max_len:
            # the learned position table has max_len rows; slicing past it would fail later as a
            # broadcasting error between [T, d_model] and [max_len, d_model]
            raise ValueError(f"input length T={tokens.shape[1]} exceeds max_len={max_len} "
                             "(the learned position embeddings); build the Transformer with a "
                             "larger max_len")
        x = self.embed(tokens) + self.pos[None, : tokens.shape[1]]
        all_stats = []
        for block in self.blocks:
            x, stats = block(x, return_stats=True)
            all_stats.append(stats)
        logits = self.head(self.norm(x))
        return (logits, all_stats) if return_stats else logits


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy (nats)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def make_optimizer(model, learning_rate=3e-3, weight_decay=1e-4):
    """AdamW over the model's ``nnx.Param``s, with global-norm clipping."""
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(learning_rate, weight_decay=weight_decay))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def _loss(model, batch):
    return cross_entropy(model(batch[:, :-1]), batch[:, 1:])


@nnx.jit
def train_step(model, optimizer, batch):
    """One AdamW step on ``batch [B, T + 1]`` tokens; returns the loss before the step."""
    loss, grads = nnx.value_and_grad(_loss)(model, batch)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_step(model, batch):
    """Loss and per-layer attention statistics on ``batch [B, T + 1]``."""
    logits, stats = model(batch[:, :-1], return_stats=True)
    return cross_entropy(logits, batch[:, 1:]), stats
