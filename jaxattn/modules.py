"""Flax integration: an NNX multi-head attention module and a drop-in ``attention_fn``."""

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn import variants as V
from jaxattn.api import IMPLEMENTATIONS, attention, attention_weights
from jaxattn.parallel import Parallelism, sharded_attention

__all__ = ["MultiHeadAttention", "attention_fn"]


def _sow(module, weights):
    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    else:  # flax.linen
        module.sow("intermediates", "attention_weights", weights)


def attention_fn(variant="softmax", **options):
    """A drop-in ``attention_fn`` for nnx ``MultiHeadAttention`` and linen ``MultiHeadDotProductAttention``.

    Args:
      variant: a variant name or :class:`jaxattn.variants.Variant` (hyper-parameters are bound here).
      **options: further keyword arguments of :func:`jaxattn.attention` (e.g. ``implementation``,
        ``local_window_size``, ``scale``).

    Returns:
      ``fn(query, key, value, bias=None, mask=None, ...)`` with flax's keyword arguments. Attention
      dropout is not supported: a positive ``dropout_rate`` outside deterministic mode raises.
      With ``module`` given (``sow_weights=True``), the ``[B, N, T, S]`` weights are sown as
      ``attention_weights`` (``nnx.Intermediate`` / linen ``intermediates``).

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, jaxattn
      >>> mha = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
      ...                              attention_fn=jaxattn.attention_fn("rbf"), rngs=nnx.Rngs(0))
      >>> mha(jnp.ones((1, 5, 8))).shape
      (1, 5, 8)
    """
    variant = V.get_variant(variant)

    def fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
           dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
           is_causal=False, **kwargs):
        del broadcast_dropout, dropout_rng, precision, kwargs
        if dropout_rate > 0.0 and not deterministic:
            raise NotImplementedError("jaxattn.attention_fn does not implement attention dropout; "
                                      "set dropout_rate=0.0 or deterministic=True")
        if mask is not None and mask.dtype != jnp.bool_:
            mask = mask != 0  # flax's make_*_mask helpers return 0/1 floats
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        args = dict(variant=variant, bias=bias, mask=mask, is_causal=is_causal, **options)
        if module is not None:
            args.pop("implementation", None)
            _sow(module, attention_weights(query, key, **args))
        return attention(query, key, value, **args)

    return fn


def _register_init(variant, shape, dtype, rngs):
    if variant.zero_registers:  # RBF: the origin is the sink every query can fall back to
        return jnp.zeros(shape, dtype)
    return 0.02 * jax.random.normal(rngs.params(), shape, dtype)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with a :mod:`jaxattn` variant and its learnable parameters.

    Forked from ``flax.nnx.MultiHeadAttention`` (as the flax maintainers advise for custom
    attention) so that it can own the variant's parameters: one per query head for each of the
    variant's ``learned_fields`` (SSMax's ``s``, in ``variant_params['s']``), and
    ``num_registers`` learnable key/value registers (attention sinks) per layer, visible to every
    query, zero-initialised for RBF (the origin is the universal sink) and small random otherwise.

    Args:
      num_heads: query heads ``N``.
      in_features: input feature size.
      qkv_features: total q/k/v features (default ``in_features``); head dim = qkv / N.
      out_features: output size (default ``in_features``).
      num_kv_heads: key/value heads ``K`` (default ``N``; ``N % K == 0``).
      variant: name or :class:`jaxattn.variants.Variant`.
      num_registers: learnable register tokens per layer.
      sink_logits: learn one sink logit per query head (zero-initialised): ``e^{s_h}`` joins every
        row's normaliser and takes no value (see :func:`jaxattn.attention`).
      logits_soft_cap: soft-cap the logits at this static value (Gemma 2), or None.
      use_bias: add a learned bias to the query, key, value and output projections (BERT's
        layers have them; zero-initialised, as flax's).
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: parameter dtype.
      implementation: passed to :func:`jaxattn.attention`.
      parallelism: a :class:`jaxattn.Parallelism`: attend with :func:`jaxattn.sharded_attention`
        on arrays split over its mesh (batch, heads, sequence; ring or all-to-all), or None.
      rngs: ``nnx.Rngs``.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, jaxattn
      >>> mha = jaxattn.MultiHeadAttention(4, 32, variant="scalable_softmax", num_registers=1,
      ...                                  rngs=nnx.Rngs(0))
      >>> mha(jnp.ones((2, 7, 32)), is_causal=True).shape
      (2, 7, 32)
    """

    def __init__(self, num_heads: int, in_features: int, *, qkv_features: int | None = None,
                 out_features: int | None = None, num_kv_heads: int | None = None,
                 variant="softmax", num_registers: int = 0, sink_logits: bool = False,
                 logits_soft_cap: float | None = None, use_bias: bool = False, dtype=None,
                 param_dtype=jnp.float32, implementation=None, parallelism=None,
                 rngs: nnx.Rngs):
        # `is None`, not `or`: an explicit 0 is a bad size to report, not a request for the default
        qkv_features = in_features if qkv_features is None else qkv_features
        out_features = in_features if out_features is None else out_features
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, size in (("num_heads", num_heads), ("in_features", in_features),
                           ("qkv_features", qkv_features), ("out_features", out_features),
                           ("num_kv_heads", num_kv_heads)):
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        if isinstance(num_registers, bool) or not isinstance(num_registers, numbers.Integral):
            raise TypeError(f"num_registers must be an int, got {num_registers!r}")
        if not isinstance(use_bias, bool):
            raise TypeError(f"use_bias must be a bool, got {use_bias!r}")
        if not isinstance(sink_logits, bool):
            raise TypeError(f"sink_logits must be a bool (learn one sink logit per head), got "
                            f"{sink_logits!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got "
                             f"{implementation!r}")
        if parallelism is not None and not isinstance(parallelism, Parallelism):
            raise TypeError(f"parallelism must be a jaxattn.Parallelism or None, got "
                            f"{type(parallelism).__name__}")
        if qkv_features % num_heads:
            raise ValueError(f"qkv_features={qkv_features} must be a positive multiple of "
                             f"num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        self.variant = V.get_variant(variant)
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = qkv_features // num_heads
        self.dtype, self.implementation = dtype, implementation
        self.parallelism = parallelism
        dense = functools.partial(nnx.LinearGeneral, in_features=in_features, use_bias=use_bias,
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = dense(out_features=(num_heads, self.head_dim))
        self.key = dense(out_features=(num_kv_heads, self.head_dim))
        self.value = dense(out_features=(num_kv_heads, self.head_dim))
        self.out = nnx.LinearGeneral(in_features=(num_heads, self.head_dim),
                                     out_features=out_features, axis=(-2, -1), use_bias=use_bias,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # one parameter per query head for each field the variant learns (SSMax's s)
        self.variant_params = nnx.Dict({
            name: nnx.Param(jnp.broadcast_to(jnp.asarray(getattr(self.variant, name), param_dtype),
                                             (num_heads,)))
            for name in self.variant.learned_fields})
        key_registers = value_registers = None
        if num_registers:
            shape = (num_registers, num_kv_heads, self.head_dim)
            key_registers = nnx.Param(_register_init(self.variant, shape, param_dtype, rngs))
            value_registers = nnx.Param(_register_init(self.variant, shape, param_dtype, rngs))
        self.key_registers = nnx.data(key_registers)
        self.sink_logits = nnx.data(
            nnx.Param(jnp.zeros((num_heads,), param_dtype)) if sink_logits else None)
        self.logits_soft_cap = logits_soft_cap
        self.value_registers = nnx.data(value_registers)

    def _current_variant(self):
        if len(self.variant_params):
            return dataclasses.replace(self.variant,
                                       **{n: p[...] for n, p in self.variant_params.items()})
        return self.variant

    def __call__(self, inputs_q, inputs_kv=None, *, mask=None, is_causal: bool = False,
                 segment_ids=None, return_stats: bool = False):
        """Attends ``inputs_q [B, T, F]`` to ``inputs_kv`` (default: itself).

        Args:
          mask: bool, broadcastable to ``[B, N, T, S]`` (True = attend).
          is_causal: causal self-attention.
          segment_ids: int ``[B, T]`` for packed sequences (self-attention only).
          return_stats: also return :class:`jaxattn.AttentionStats`.
        """
        if segment_ids is not None and inputs_kv is not None and inputs_kv is not inputs_q:
            raise ValueError("segment_ids is for self-attention only: pass inputs_kv=None (for "
                             "cross-attention build a mask instead)")
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        q, k, v = self.query(inputs_q), self.key(inputs_kv), self.value(inputs_kv)
        registers = None
        if self.key_registers is not None:
            registers = (self.key_registers[...].astype(q.dtype),
                         self.value_registers[...].astype(q.dtype))
        args = dict(variant=self._current_variant(), is_causal=is_causal,
                    q_segment_ids=segment_ids, kv_segment_ids=segment_ids, registers=registers,
                    logits_soft_cap=self.logits_soft_cap,
                    sink_logits=None if self.sink_logits is None else self.sink_logits[...],
                    implementation=self.implementation, return_stats=return_stats)
        if self.parallelism is None:
            out = attention(q, k, v, mask=mask, **args)
        else:
            if mask is not None:
                raise ValueError("a dense mask is not taken on sharded arrays: use is_causal and "
                                 "segment_ids")
            out = sharded_attention(q, k, v, parallelism=self.parallelism, **args)
        if return_stats:
            out, stats = out
            return self.out(out), stats
        return self.out(out)
