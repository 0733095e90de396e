"""The public functional API: validate, normalise, dispatch to a backend, fall back on XLA."""

import math

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from jaxattn.reference import AttentionStats, attention_reference, attention_weights_reference
from jaxattn.variants import get_variant

__all__ = ["attention", "attention_weights", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = (None, "xla", "pallas")
_FLOAT_DTYPES = tuple(np.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64))


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


def _prepare(query, key, value, *, variant, bias, mask, scale, is_causal, query_seq_lengths,
             key_value_seq_lengths, q_segment_ids, kv_segment_ids, local_window_size, registers):
    """Validates the arguments; returns (batched, kwargs) with batched arrays and plain options."""
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
    if variant.normalizer == "topk":
        R = 0 if registers is None else _shape(registers[0], "key_registers")[-3]
        if not 1 <= variant.k <= S + R:
            raise ValueError(f"TopK k must be in [1, S] = [1, {S + R}] (keys incl. registers), "
                             f"got {variant.k}")
    Hv = value.shape[-1] if value is not None else H
    options = dict(
        variant=variant, scale=scale, bias=bias, mask=mask, is_causal=bool(is_causal),
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        local_window_size=_window(local_window_size),
        registers=_registers(registers, B, K, H, Hv, query.dtype, batched),
    )
    return (query, key, value), batched, options


def _unbatch(x, batched):
    if batched:
        return x
    return jax.tree.map(lambda a: a[0], x)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def attention(query, key, value, *, variant="softmax", bias=None, mask=None, scale=None,
              is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
              q_segment_ids=None, kv_segment_ids=None, local_window_size=None, registers=None,
              implementation=None, return_stats=False):
    """Attention with any variant of :mod:`jaxattn.variants`, in ``jax.nn.dot_product_attention``'s layout.

    .. math::

      z_{ij} = c_i (a \\, q_i \\cdot k_j + b_j + \\text{bias}_{ij}), \\quad
      o_i = \\sum_j \\text{normalise}(z_{i\\cdot})_j \\, v_j

    with ``a``, ``b``, ``c`` and the normaliser given by the variant (see
    :mod:`jaxattn.variants`) and ``z`` restricted to the keys query ``i`` may attend.

    Args:
      query: ``[B, T, N, H]`` or unbatched ``[T, N, H]``.
      key: ``[B, S, K, H]`` with ``N % K == 0`` (grouped-query attention).
      value: ``[B, S, K, Hv]``.
      variant: a name from :data:`jaxattn.variants.VARIANT_NAMES` or a
        :class:`jaxattn.variants.Variant` (e.g. ``TopK(4)``).
      bias: additive float bias broadcastable to ``[B, N, T, S]``. A ``-inf`` entry hides its key
        exactly as a False ``mask`` entry does (so a row biased ``-inf`` on every key gives zeros).
      mask: bool mask broadcastable to ``[B, N, T, S]``; True = attend.
      scale: the logit scale, finite and ``> 0``; defaults to ``1/sqrt(H)`` (RBF uses it as
        ``gamma`` unless the variant sets one). A traced scale is not checked.
      is_causal: a static Python bool (under ``jax.jit``, a static argument); query ``i`` attends
        keys ``j <= i``.
      query_seq_lengths: int ``[B]`` in ``[0, T]``; query rows at or past the length output zeros.
      key_value_seq_lengths: int ``[B]`` in ``[0, S]``; keys at or past the length are hidden.
        Concrete lengths outside the range raise ValueError; traced ones cannot be checked and
        act as clipped to it (a length above the axis keeps all of it, a negative one none).
      q_segment_ids: int ``[B, T]``; with ``kv_segment_ids`` (int ``[B, S]``) a query attends a
        key only in the same segment.
      local_window_size: ``(left, right)`` or an int for both, static ints ``>= 0``: query ``i``
        attends ``i - left <= j <= i + right``.
      registers: optional ``(key_registers, value_registers)``, each ``[R, K, H]`` (or ``[B, R,
        K, H]``): R learnable keys/values prepended to the sequence and visible to every valid
        query (attention sinks).
      implementation: None (the fused kernel when it supports the call, else XLA), ``"xla"``
        (the reference) or ``"pallas"`` (the fused kernel; raises NotImplementedError when it
        cannot run the call).
      return_stats: also return :class:`~jaxattn.reference.AttentionStats` (``[B, N, T]``).

    Returns:
      ``out`` with the shape of query but head dim ``Hv``, in the query dtype; with
      ``return_stats``, ``(out, stats)``. A query with no visible key gives zeros.

    Examples:
      >>> import jax, jaxattn
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 16, 4, 32))
      >>> out, stats = jaxattn.attention(q, k, v, variant="rbf", is_causal=True,
      ...                                return_stats=True)
      >>> out.shape, stats.entropy.shape
      ((2, 16, 4, 32), (2, 4, 16))
    """
    if value is None:
        raise TypeError("value must be an array, got None")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got "
                         f"{implementation!r}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    (q, k, v), batched, options = _prepare(
        query, key, value, variant=variant, bias=bias, mask=mask, scale=scale,
        is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, local_window_size=local_window_size, registers=registers)
    result = None
    if implementation == "pallas" or (implementation is None and _on_gpu()):
        try:
            result = pallas_kernels.attention(q, k, v, return_stats=return_stats, **options)
            if return_stats:
                result = (result[0], AttentionStats(*result[1]))
        except NotImplementedError:
            if implementation == "pallas":
                raise
    if result is None:
        result = attention_reference(q, k, v, return_stats=return_stats, **options)
    return _unbatch(result, batched)


def attention_weights(query, key, *, variant="softmax", bias=None, mask=None, scale=None,
                      is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                      q_segment_ids=None, kv_segment_ids=None, local_window_size=None,
                      registers=None, return_stats=False):
    """The attention weights ``[B, N, T, R + S]`` (float32) of :func:`attention`'s arguments.

    Registers (if any) are the first ``R`` columns. Computed by the reference, so it materialises
    the full matrix: use it for analysis and small problems. With ``return_stats``, returns
    ``(weights, stats)``.

    Examples:
      >>> import jax, jaxattn
      >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 8, 2, 16))
      >>> w = jaxattn.attention_weights(q, k, variant="hardmax")
      >>> w.shape
      (1, 2, 8, 8)
    """
    if registers is not None:
        rk = registers[0]
        registers = (rk, jnp.zeros(rk.shape, rk.dtype))
    (q, k, _), batched, options = _prepare(
        query, key, None, variant=variant, bias=bias, mask=mask, scale=scale,
        is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, local_window_size=local_window_size, registers=registers)
    p, stats, _, _ = attention_weights_reference(q, k, **options)
    result = (p, stats) if return_stats else p
    return _unbatch(result, batched)


__all__ += ["AttentionStats"]
