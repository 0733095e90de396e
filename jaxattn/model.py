"""A small pre-norm transformer language model built from :class:`jaxattn.MultiHeadAttention`, and its
jitted optax training step.

Positions are either a learned absolute table (``positions="learned"``, limited to ``max_len``)
or rotary embeddings of the queries and keys (``positions="rope"``, Su et al. 2021, arXiv
2104.09864), which take any length: attention scores then depend on ``i - j`` only, so a model
trained at one length can be evaluated at longer ones."""

import numbers

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxattn.modules import MultiHeadAttention

__all__ = ["Block", "Transformer", "RotaryProjection", "rope", "POSITIONS", "make_optimizer",
           "train_step", "eval_step", "cross_entropy"]

POSITIONS = ("learned", "rope")


def rope(x, positions, *, base: float = 10000.0):
    """Rotary position embedding (RoPE, Su et al. 2021, arXiv 2104.09864) of per-head vectors.

    Each pair ``(x_{2i}, x_{2i+1})`` of a head vector at position ``m`` is rotated by the angle
    ``m theta_i`` with ``theta_i = base^(-2i/H)``, ``i < H/2`` (the paper's Eq. 34):

      y_{2i}   = x_{2i} cos(m theta_i) - x_{2i+1} sin(m theta_i)
      y_{2i+1} = x_{2i} sin(m theta_i) + x_{2i+1} cos(m theta_i)

    A rotation is orthogonal and ``R_m^T R_n = R_{n-m}``, so ``rope(q, m) . rope(k, n)`` depends on
    ``q``, ``k`` and ``n - m`` only (relative positions), at any ``m``, ``n``.

    Args:
      x: ``[..., T, N, H]`` (sequence, heads, head dim), ``H`` even.
      positions: int or float ``[T]``, the position of each row along the sequence axis.
      base: ``> 0``, the wavelength base (10000 in the paper).

    Returns:
      the rotated ``x``, same shape and dtype (computed in float32, or float64 for float64 ``x``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxattn.model import rope
      >>> x = jnp.ones((5, 2, 4))                      # [T, N, H]
      >>> y = rope(x, jnp.arange(5))
      >>> y.shape, bool(jnp.allclose(jnp.linalg.norm(y, axis=-1), 2.0))
      ((5, 2, 4), True)
    """
    if x.ndim < 3:
        raise ValueError(f"x must be [..., T, N, H], got shape {tuple(x.shape)}")
    t, h = x.shape[-3], x.shape[-1]
    if h % 2:
        raise ValueError(f"x's head dim H={h} must be even for rotary embeddings (pairs rotate)")
    positions = jnp.asarray(positions)
    if positions.shape != (t,):
        raise ValueError(f"positions must have shape [T]=({t},), got {tuple(positions.shape)}")
    if not base > 0:
        raise ValueError(f"base must be > 0, got {base!r}")
    ctype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    inv_freq = base ** (-jnp.arange(0, h, 2, dtype=ctype) / h)  # theta_i, [H/2]
    angles = jnp.einsum("t,f->tf", positions.astype(ctype), inv_freq)
    lead = (1,) * (x.ndim - 3)
    cos = jnp.cos(angles).reshape(*lead, t, 1, h // 2)  # broadcast over batch and heads
    sin = jnp.sin(angles).reshape(*lead, t, 1, h // 2)
    pairs = x.astype(ctype).reshape(*x.shape[:-1], h // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


class RotaryProjection(nnx.Module):
    """A query or key projection followed by :func:`rope` at positions ``0 .. T-1``.

    ``y = rope(projection(x), arange(T))`` for ``x [B, T, F]`` -> ``y [B, T, N, H]``. It replaces
    :class:`jaxattn.MultiHeadAttention`'s ``query`` and ``key`` projections in self-attention, so
    the module's registers (prepended after the projections) stay position-free sinks.

    Args:
      projection: the module that maps ``[B, T, F]`` to ``[B, T, N, H]``.
      base: RoPE's wavelength base.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from jaxattn.model import RotaryProjection
      >>> proj = nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))
      >>> RotaryProjection(proj, 10000.0)(jnp.ones((1, 3, 8))).shape
      (1, 3, 2, 4)
    """

    def __init__(self, projection, base: float):
        self.projection = projection
        self.base = base

    def __call__(self, x):
        y = self.projection(x)
        return rope(y, jnp.arange(y.shape[-3]), base=self.base)


class Block(nnx.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``; causal attention, rotary q/k with ``rope``.

    Args:
      d_model, num_heads, mlp_dim: sizes.
      variant, num_registers, num_kv_heads: passed to :class:`jaxattn.MultiHeadAttention`.
      rope: ``None`` (no positions inside attention) or the RoPE base: the query and key
        projections become :class:`RotaryProjection`.
      implementation, attention_dtype: the attention's ``implementation`` and computation dtype
        (the Pallas kernels take bfloat16 or float16).
      parallelism: the attention's :class:`jaxattn.Parallelism` (arrays split over a mesh), or
        None.
      rngs: ``nnx.Rngs``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from jaxattn.model import Block
      >>> block = Block(16, 2, 32, variant="softmax", num_registers=0, rope=10000.0,
      ...               rngs=nnx.Rngs(0))
      >>> block(jnp.ones((1, 5, 16))).shape
      (1, 5, 16)
    """

    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, *, variant, num_registers: int,
                 num_kv_heads: int | None = None, rope: float | None = None,
                 implementation=None, attention_dtype=None, parallelism=None,
                 rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.attn = MultiHeadAttention(num_heads, d_model, num_kv_heads=num_kv_heads,
                                       variant=variant, num_registers=num_registers,
                                       implementation=implementation, dtype=attention_dtype,
                                       parallelism=parallelism, rngs=rngs)
        if rope is not None:
            self.attn.query = RotaryProjection(self.attn.query, rope)
            self.attn.key = RotaryProjection(self.attn.key, rope)
        self.mlp_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, mlp_dim, rngs=rngs)
        self.down = nnx.Linear(mlp_dim, d_model, rngs=rngs)

    def __call__(self, x, *, return_stats=False):
        # stats only on request: a training step need not compute (or differentiate) them
        h = self.attn(self.attn_norm(x), is_causal=True, return_stats=return_stats)
        h, stats = h if return_stats else (h, None)
        x = x + h.astype(x.dtype)
        x = x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))
        return (x, stats) if return_stats else x


class Transformer(nnx.Module):
    """A causal language model: token embeddings, positions, pre-norm blocks, a linear head.

    ``logits = head(norm(blocks(embed(tokens) + pos)))`` with learned absolute positions ``pos``
    (``positions="learned"``), or ``logits = head(norm(blocks(embed(tokens))))`` with every block's
    queries and keys rotated by :func:`rope` (``positions="rope"``).

    Args:
      vocab_size: number of tokens.
      max_len: longest sequence for learned positions (the table's rows); with ``"rope"`` it is
        the training length only and does not limit the input.
      num_layers, d_model, num_heads, mlp_dim: the usual sizes.
      variant: attention variant of every layer (name or :class:`jaxattn.variants.Variant`).
      num_registers: learnable register tokens per layer.
      num_kv_heads: key/value heads (grouped-query attention).
      positions: ``"learned"`` (default) or ``"rope"``.
      rope_base: RoPE's wavelength base (``positions="rope"`` only).
      implementation: the attention's ``implementation`` (see :func:`jaxattn.attention`).
      attention_dtype: the attention's computation dtype (``jnp.bfloat16`` for the Pallas
        kernels); None infers it from inputs and parameters.
      parallelism: a :class:`jaxattn.Parallelism` for every layer's attention (batch, heads or
        sequence split over its mesh; the rest of the model is partitioned by XLA from the
        inputs' sharding), or None. Its layout must be ``"contiguous"`` (positions are
        ``0 .. T-1`` in order).
      rngs: ``nnx.Rngs``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> from jaxattn.model import Transformer
      >>> model = Transformer(256, 16, num_layers=1, d_model=32, num_heads=2, mlp_dim=64,
      ...                     variant="rbf", num_registers=1, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 16), jnp.int32)).shape
      (2, 16, 256)
      >>> rotary = Transformer(256, 16, num_layers=1, d_model=32, num_heads=2, mlp_dim=64,
      ...                      positions="rope", rngs=nnx.Rngs(0))
      >>> rotary(jnp.zeros((1, 64), jnp.int32)).shape    # past max_len: positions are relative
      (1, 64, 256)
    """

    def __init__(self, vocab_size: int, max_len: int, *, num_layers: int = 2, d_model: int = 64,
                 num_heads: int = 4, mlp_dim: int = 256, variant="softmax", num_registers: int = 0,
                 num_kv_heads: int | None = None, positions: str = "learned",
                 rope_base: float = 10000.0, implementation=None, attention_dtype=None,
                 parallelism=None, rngs: nnx.Rngs):
        for name, size, low in (("vocab_size", vocab_size, 1), ("max_len", max_len, 1),
                                ("num_layers", num_layers, 0), ("d_model", d_model, 1),
                                ("mlp_dim", mlp_dim, 1)):
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < low:
                raise ValueError(f"{name} must be an int >= {low}, got {size!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
        if positions == "rope":
            if (isinstance(num_heads, numbers.Integral) and num_heads > 0
                    and (d_model % num_heads or (d_model // num_heads) % 2)):
                raise ValueError(f"positions='rope' needs an even head dim: d_model={d_model} / "
                                 f"num_heads={num_heads} is not an even integer")
            if (isinstance(rope_base, bool) or not isinstance(rope_base, numbers.Real)
                    or not rope_base > 0):
                raise ValueError(f"rope_base must be a number > 0, got {rope_base!r}")
        if parallelism is not None and getattr(parallelism, "layout", None) != "contiguous":
            raise ValueError("the Transformer's positions are 0 .. T-1 in order: its parallelism "
                             "needs layout='contiguous'")
        self.positions = positions
        self.max_len = max_len
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        pos = None
        if positions == "learned":
            pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model)))
        self.pos = nnx.data(pos)
        self.blocks = nnx.List([
            Block(d_model, num_heads, mlp_dim, variant=variant, num_registers=num_registers,
                  num_kv_heads=num_kv_heads,
                  rope=float(rope_base) if positions == "rope" else None,
                  implementation=implementation, attention_dtype=attention_dtype,
                  parallelism=parallelism, rngs=rngs)
            for _ in range(num_layers)
        ])
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def __call__(self, tokens, *, return_stats=False):
        """``tokens [B, T]`` -> logits ``[B, T, V]`` (and per-layer :class:`jaxattn.AttentionStats`)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        x = self.embed(tokens)
        if self.pos is not None:
            if tokens.shape[1] > self.max_len:
                # the learned position table has max_len rows; slicing past it would fail later
                # as a broadcasting error between [T, d_model] and [max_len, d_model]
                raise ValueError(f"input length T={tokens.shape[1]} exceeds max_len={self.max_len} "
                                 "(the learned position embeddings); build the Transformer with a "
                                 "larger max_len, or with positions='rope'")
            x = x + self.pos[None, : tokens.shape[1]]
        all_stats = []
        for block in self.blocks:
            if return_stats:
                x, stats = block(x, return_stats=True)
                all_stats.append(stats)
            else:
                x = block(x)
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
