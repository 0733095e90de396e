"""One validated, typed plan per attention call: what every backend reads.

:func:`make_plan` checks the arguments of :func:`jaxattn.attention` once (shapes, dtypes, ranges,
static flags; a clear error naming the argument otherwise) and returns the batched arrays and a
frozen :class:`Plan`:

* the variant spec (its logit terms ``a``, ``b_j``, ``c_i``, its normaliser and whether it needs a
  statistics sweep: :mod:`jaxattn.variants`) and the call's logit scale;
* one mask description, :class:`pallas_kernels.MaskSpec` (causal, window, lengths, segment ids,
  the number of registers): the same object the kernels take, so the reference and the kernels
  apply one visibility rule (:func:`pallas_kernels.common.visible`);
* what only the XLA reference runs: a dense bool ``mask`` and a dense additive ``bias``;
* the register keys and values.

The reference (:mod:`jaxattn.reference`) and the fused backend (:mod:`jaxattn.fused`) both take
the plan; neither re-validates.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.variants import Variant, get_variant
from pallas_kernels import MaskSpec

__all__ = ["Plan", "make_plan"]

_FLOAT_DTYPES = tuple(np.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated attention call, for batched arrays ``q [B, T, N, H]``, ``k [B, S, K, H]``.

    Attributes:
      variant: the :class:`~jaxattn.variants.Variant` spec.
      scale: the logit scale (a python float or a traced scalar).
      mask: the structured visibility (:class:`pallas_kernels.MaskSpec`; its ``num_registers`` is
        the number of registers, which come first among the keys).
      dense_mask: bool ``[B, N | 1, T, S]`` (True = attend) or None; the XLA reference only.
      bias: additive float ``[B, N | 1, T, S]`` or None; the XLA reference only.
      registers: ``(key_registers [B, R, K, H], value_registers [B, R, K, Hv])`` or None.
      logits_soft_cap: ``cap > 0`` or None: the normaliser sees ``cap tanh(z / cap)`` of the
        logits ``z`` as the variant defines them (Gemma 2's soft-capping).
      sink_logits: float ``[N]`` or None: one sink logit per query head, ``e^{s_h}`` added to every
        row's normaliser, with no value (gpt-oss's attention sinks); may be traced (learned).
      batched: whether the caller's arrays had a batch axis (the API strips it again).
    """

    variant: Variant
    scale: Any
    mask: MaskSpec
    dense_mask: jax.Array | None = None
    bias: jax.Array | None = None
    registers: tuple | None = None
    logits_soft_cap: float | None = None
    sink_logits: jax.Array | None = None
    batched: bool = True

    @property
    def num_registers(self) -> int:
        return self.mask.num_registers

    @property
    def logit_scale(self):
        """``a``, the scalar multiplying ``q . k``."""
        return self.variant.logit_scale(self.scale)

    def key_bias(self, key):
        """``b_j``, float32 ``[B, S, K]`` of ``key`` (registers included), or None."""
        return self.variant.key_bias(key, self.scale)

    def query_offset(self, query):
        """The per-query constant the logits drop (``[B, T, N]``) or None; only the reported
        logsumexp adds it back."""
        return self.variant.query_offset(query, self.scale)

    def query_scale(self, num_visible, entropy):
        """``c_i`` from the visible-key counts (int32 ``[B, N, T]``) and the statistics sweep's
        entropy (float32 ``[B, N, T]`` when the variant needs it, else None)."""
        return self.variant.query_scale(num_visible, entropy)


def _shape(x, name):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    return tuple(x.shape)


def _check_float(x, name):
    if np.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype bfloat16, float16, float32 or float64, got "
                        f"{x.dtype}")


def _check_int(x, name, shape):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    return x


def _broadcastable(x, name, target):
    shape = tuple(x.shape)
    if len(shape) > len(target):
        raise ValueError(f"{name} of shape {shape} has more dims than [B, N, T, S] = {target}")
    padded = (1,) * (len(target) - len(shape)) + shape
    for got, want in zip(padded, target, strict=True):
        if got not in (1, want):
            raise ValueError(f"{name} of shape {shape} does not broadcast to [B, N, T, S] = "
                             f"{target}")
    return jnp.reshape(x, padded)


def _is_traced(x) -> bool:
    """True for a value known only at run time (a tracer under jit, vmap, grad or scan)."""
    return isinstance(x, jax.core.Tracer)


def _check_range(x, name, high, axis_name):
    """Raises ValueError if a concrete int array has an entry outside ``[0, high]``.

    Traced values cannot be inspected at trace time and go unchecked; the mask then treats them as
    clipped to the range (see :func:`attention`).
    """
    if _is_traced(x):
        return
    values = np.asarray(x)
    if values.size and (values.min() < 0 or values.max() > high):
        raise ValueError(f"{name} must be in [0, {axis_name}] = [0, {high}], got "
                         f"{values.tolist()}")


def _window(local_window_size):
    if local_window_size is None:
        return None
    if _is_traced(local_window_size) or (isinstance(local_window_size, (tuple, list))
                                         and any(_is_traced(w) for w in local_window_size)):
        raise TypeError("local_window_size must be a static Python int or (left, right) pair of "
                        "static ints, not a traced value: it fixes the mask's structure at trace "
                        "time (under jax.jit pass it through static_argnames)")
    if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
        local_window_size = (local_window_size, local_window_size)
    if (not isinstance(local_window_size, (tuple, list)) or len(local_window_size) != 2
            or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool)
                       for w in local_window_size)):
        raise TypeError("local_window_size must be a static int or a (left, right) pair of "
                        f"static ints, got {local_window_size!r}")
    left, right = (int(w) for w in local_window_size)
    if left < 0 or right < 0:
        raise ValueError(f"local_window_size must be >= 0, got {(left, right)}")
    return (left, right)


def _registers(registers, B, K, H, Hv, dtype, batched):
    if registers is None:
        return None
    if not isinstance(registers, (tuple, list)) or len(registers) != 2:
        raise TypeError("registers must be a pair (key_registers, value_registers)")
    rk, rv = registers
    out = []
    for x, name, h in ((rk, "key_registers", H), (rv, "value_registers", Hv)):
        shape = _shape(x, name)
        _check_float(x, name)
        if len(shape) == 3:
            x = jnp.broadcast_to(x[None], (B, *shape))
        elif len(shape) != 4 or shape[0] != B or not batched:
            raise ValueError(f"{name} must be [R, K, H] or [B, R, K, H], got {shape}")
        if x.shape[2:] != (K, h):
            raise ValueError(f"{name} must have {K} kv heads of dim {h}, got shape {shape}")
        out.append(x.astype(dtype))
    if out[0].shape[1] != out[1].shape[1]:
        raise ValueError("key_registers and value_registers must hold the same number of "
                         f"registers, got {out[0].shape[1]} and {out[1].shape[1]}")
    return tuple(out)


def make_plan(query, key, value, *, variant, bias=None, mask=None, scale=None, is_causal=False,
              query_seq_lengths=None, key_value_seq_lengths=None, q_segment_ids=None,
              kv_segment_ids=None, local_window_size=None, registers=None, logits_soft_cap=None,
              sink_logits=None):
    """Validates :func:`jaxattn.attention`'s arguments; returns ``((q, k, v), plan)``.

    The arrays come back batched (``[B, ...]``; ``value`` may be None for weights only) and the
    plan holds everything else (see :class:`Plan`). Raises TypeError or ValueError naming the
    argument and the constraint it breaks.
    """
    qs, ks = _shape(query, "query"), _shape(key, "key")
    vs = _shape(value, "value") if value is not None else None
    if len(qs) not in (3, 4):
        raise ValueError(f"query must be [B, T, N, H] or unbatched [T, N, H], got shape {qs}")
    batched = len(qs) == 4
    for name, shape in (("key", ks), ("value", vs)):
        if shape is not None and len(shape) != len(qs):
            raise ValueError(f"{name} must have the rank of query ({len(qs)}), got shape {shape}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x is not None:
            _check_float(x, name)
            if x.dtype != query.dtype:
                raise TypeError(f"{name} dtype {x.dtype} differs from query dtype {query.dtype}")
    if not batched:
        query, key = query[None], key[None]
        value = value[None] if value is not None else None
    B, T, N, H = query.shape
    _, S, K, Hk = key.shape
    if key.shape[0] != B:
        raise ValueError(f"key batch {key.shape[0]} differs from query batch {B}")
    if Hk != H:
        raise ValueError(f"key head dim {Hk} differs from query head dim {H}")
    if value is not None and value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value must match key in [B, S, K] = {key.shape[:3]}, got "
                         f"{value.shape[:3]}")
    if K == 0 or N % K:
        raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={K}")
    if T == 0 or S == 0 or H == 0:
        raise ValueError(f"sequence lengths and head dim must be positive, got T={T}, S={S}, "
                         f"H={H}")
    target = (B, N, T, S)
    if bias is not None:
        _shape(bias, "bias")
        _check_float(bias, "bias")
        bias = _broadcastable(bias, "bias", target)
    if mask is not None:
        _shape(mask, "mask")
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be a bool array (True = attend), got dtype {mask.dtype}; "
                            "pass additive masks as bias")
        mask = _broadcastable(mask, "mask", target)
    if scale is None:
        scale = 1.0 / math.sqrt(H)
    elif not _is_traced(scale):
        values = np.asarray(scale)
        if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
            raise TypeError(f"scale must be a real number, got {scale!r}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"scale must be finite, got {scale}")
        # 0 makes every visible key weigh the same and a negative scale ranks keys by
        # dissimilarity (for RBF it is a negative gamma); neither is a logit scale.
        if np.any(values <= 0):
            raise ValueError(f"scale must be positive, got {scale}")
    if _is_traced(is_causal):
        raise TypeError("is_causal must be a static Python bool, not a traced value: it fixes the "
                        "mask's structure at trace time (under jax.jit pass it through "
                        "static_argnames)")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a static Python bool, got {is_causal!r}")

    def seq(x, name, length):
        if x is None:
            return None
        x = jnp.asarray(x)
        if not batched and x.ndim == len(length) - 1:
            x = x[None]
        return _check_int(x, name, length)

    query_seq_lengths = seq(query_seq_lengths, "query_seq_lengths", (B,))
    key_value_seq_lengths = seq(key_value_seq_lengths, "key_value_seq_lengths", (B,))
    if query_seq_lengths is not None:
        _check_range(query_seq_lengths, "query_seq_lengths", T, "T")
    if key_value_seq_lengths is not None:
        _check_range(key_value_seq_lengths, "key_value_seq_lengths", S, "S")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    q_segment_ids = seq(q_segment_ids, "q_segment_ids", (B, T))
    kv_segment_ids = seq(kv_segment_ids, "kv_segment_ids", (B, S))
    variant = get_variant(variant)
    Hv = value.shape[-1] if value is not None else H
    registers = _registers(registers, B, K, H, Hv, query.dtype, batched)
    R = 0 if registers is None else registers[0].shape[1]
    variant.check_num_keys(S + R)
    spec = MaskSpec(q_lengths=query_seq_lengths, kv_lengths=key_value_seq_lengths,
                    q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                    is_causal=bool(is_causal), local_window_size=_window(local_window_size),
                    num_registers=R)
    if logits_soft_cap is not None:
        if _is_traced(logits_soft_cap) or isinstance(logits_soft_cap, bool) or not isinstance(
                logits_soft_cap, (int, float, np.integer, np.floating)):
            raise TypeError(f"logits_soft_cap must be a static python float > 0 or None, got "
                            f"{logits_soft_cap!r}")
        if not 0 < logits_soft_cap < np.inf:
            raise ValueError(f"logits_soft_cap must be finite and > 0, got {logits_soft_cap}")
        logits_soft_cap = float(logits_soft_cap)
    if sink_logits is not None:
        _shape(sink_logits, "sink_logits")
        _check_float(sink_logits, "sink_logits")
        if tuple(sink_logits.shape) != (N,):
            raise ValueError(f"sink_logits must have shape [N] = ({N},) (one per query head), got "
                             f"{tuple(sink_logits.shape)}")
        if not _is_traced(sink_logits) and not np.all(np.isfinite(np.asarray(sink_logits))):
            raise ValueError("sink_logits must be finite")
        if variant.normalizer != "softmax":
            raise ValueError(f"sink_logits need a softmax normaliser; {variant.name} normalises "
                             f"by {variant.normalizer}")
    plan = Plan(variant=variant, scale=scale, mask=spec, dense_mask=mask, bias=bias,
                registers=registers, logits_soft_cap=logits_soft_cap, sink_logits=sink_logits,
                batched=batched)
    return (query, key, value), plan
