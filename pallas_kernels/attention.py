"""The fused attention entry: variant dispatch in XLA around a ``jax.custom_vjp`` of the kernels.

For a variant spec (``logit_scale``, ``key_bias``, ``query_scale``, ``needs_stats``,
``normalizer``, ``query_offset``) this computes, with ordinary (differentiable) XLA ops,

.. math::

  a = \\text{logit\\_scale}(s), \\quad b_j = \\text{key\\_bias}(k)_j, \\quad
  c_i = \\text{query\\_scale}(n_i, H_i)

and runs the fused kernel on ``z_ij = c_i (a q_i . k_j + b_j)``. The kernel's ``custom_vjp`` is
over ``(q, k, v, c, b)``, so gradients reach the variant's parameters (SSMax ``s``, RBF ``gamma``,
a temperature), the keys through ``b`` and register keys/values through XLA autodiff. A traced
``a`` (a learned scale) is folded into ``c`` and ``b`` (``c a (q.k + b / a)``), keeping the
kernel's ``a`` a python float.

Adaptive temperature runs a statistics sweep first (:func:`~pallas_kernels.forward.flash_stats`,
no P @ V) for the entropy ``H_i`` of ``softmax(z / c)``, then the main sweep with ``c = beta(H)``.
The streamed entropy is exact; the paper's ``-sum p log(p + eps)`` is smaller by at most
``n_i * eps`` nats (``p log(1 + eps / p) <= eps`` per key), i.e. <= 1.6e-5 nats at n = 16384 and
eps = 1e-9. The gradient through ``beta`` (``stop_gradient_beta=False``) reuses the backward kernel (see
:func:`_entropy`); with ``stop_gradient_beta=True`` the statistics sweep sees no tangent at all.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import forward as _fwd
from pallas_kernels.common import MaskSpec
from pallas_kernels.forward import count_visible, flash_forward, flash_stats

__all__ = ["attention"]

_SymbolicZero = jax.custom_derivatives.SymbolicZero


def _unsupported(variant, query, bias, mask):
    if variant.normalizer != "softmax":
        raise NotImplementedError(f"the Pallas kernels run softmax variants only, not "
                                  f"{variant.normalizer!r} ({variant.name}); use the XLA path")
    if bias is not None:
        raise NotImplementedError("the Pallas kernels take no [B, N, T, S] bias array (only the "
                                  "variant's per-key bias); use the XLA path")
    if mask is not None:
        raise NotImplementedError("the Pallas kernels take no bool mask array (causal, window, "
                                  "lengths and segment ids are supported); use the XLA path")
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"the Pallas kernels take bfloat16 or float16 inputs, got "
                                  f"{query.dtype}; use the XLA path")


def _is_static(x):
    return isinstance(x, (int, float, np.number)) or (
        isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)
        and np.ndim(x) == 0)


def _split_scale(a):
    """``(a_static, a_traced)``: a python float for the kernel, and what is folded into c / b."""
    if _is_static(a):
        return float(a), None
    return 1.0, jnp.asarray(a, jnp.float32)


def _zeros_like_spec(spec):
    def zero(x):
        return np.zeros(np.shape(x), jax.dtypes.float0)
    return jax.tree.map(zero, spec)


def _value(x):
    """The primal of a ``symbolic_zeros`` custom_vjp argument (None passes through)."""
    return None if x is None else x.value


def _nonneg_hint(variant, c, a_traced):
    """The forward's ``query_scale_nonnegative``: True where the variant guarantees c >= 0 (and no
    traced logit scale of unknown sign is folded into c). Else False: the forward's folding tiles
    then negate Q's rows where ``c < 0`` (``BlockSizes.fold_scale``), with no test of c's values
    (the earlier ``lax.cond`` on ``all(c >= 0)`` synchronised the host with the GPU every call)."""
    return c is not None and a_traced is None and variant.query_scale_nonnegative()


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, c, b, spec, row_max, a, stats, c_nonneg=False, bias_key_grad=None):
    """The attention forward; ``row_max``: the exact row max of the base-2 logits or None (a
    shift the softmax does not depend on: its cotangent is zero); ``bias_key_grad``: ``2 g`` when
    ``b = g ||k||^2`` (from ``stop_gradient(k)``): the backward kernel adds its key gradient."""
    out, lse, *rest = flash_forward(q, k, v, logit_scale=a, query_scale=c, key_bias=b, mask=spec,
                                    return_stats=stats, query_scale_nonnegative=c_nonneg,
                                    row_max=row_max)
    return (out, lse, *rest) if stats else (out, lse, None, None)


def _fwd_rule(q, k, v, c, b, spec, row_max, a, stats, c_nonneg, bias_key_grad):
    c_perturbed = c is not None and c.perturbed
    q, k, v, c, b, row_max = (_value(x) for x in (q, k, v, c, b, row_max))
    spec = jax.tree.map(_value, spec)
    # The pytree structure says whether c's gradient is wanted: a zero-size marker, or None.
    want_dc = None if not c_perturbed else jnp.zeros((0,), jnp.float32)
    result = _flash(q, k, v, c, b, spec, row_max, a, stats, c_nonneg, bias_key_grad)
    return result, (q, k, v, c, b, spec, result[0], result[1], want_dc)


def _bwd(a, stats, c_nonneg, bias_key_grad, res, cts):
    del stats, c_nonneg
    q, k, v, c, b, spec, out, lse, want_dc = res
    dout, dlse, dent, dmw = cts
    for name, ct in (("logsumexp", dlse), ("entropy", dent), ("max_weight", dmw)):
        if ct is not None and not isinstance(ct, _SymbolicZero):
            raise NotImplementedError(
                f"differentiating the kernel's {name} statistic is not implemented; "
                "differentiate the output, or use implementation='xla'")
    if isinstance(dout, _SymbolicZero):
        dout = jnp.zeros(out.shape, out.dtype)
    try:
        from pallas_kernels.backward import flash_backward
    except ImportError as e:  # pragma: no cover - only before the backward module exists
        raise NotImplementedError("backward kernel not available") from e
    dq, dk, dv, dc, db = flash_backward(q, k, v, out, lse, dout.astype(out.dtype), logit_scale=a,
                                        query_scale=c, key_bias=b, mask=spec,
                                        query_scale_grad=want_dc is not None,
                                        bias_key_grad=bias_key_grad)
    if c is not None and dc is None:  # c's gradient is not wanted (not perturbed)
        dc = jnp.zeros(c.shape, c.dtype)
    return dq, dk, dv, dc, db, _zeros_like_spec(spec), None  # row_max: zero


_flash.defvjp(_fwd_rule, _bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _entropy(q, k, c, b, spec, a):
    """Entropy ``H_i`` of ``softmax(z0)``, ``z0_ij = c_i (a q_i . k_j + b_j)``, ``[B, N, T]``, and
    the row max of ``z0 log2(e)`` (``flash_stats``'s ``row_max``; no gradient flows through it).

    Its VJP reuses the attention backward kernel: ``dH_i / dz0_ij = -p_ij (z0_ij - sum_j p_ij z0_ij)``
    is the attention ``dZ = P (dP - delta)`` with ``dP_ij = -g_i z0_ij = dO'_i . v'_j`` for values
    ``v' = k`` and output cotangent ``dO'_i = -g_i c_i a q_i`` (and ``delta_i = dO'_i . o'_i``, ``o'`` the
    forward output with ``v' = k``). Only the logits' gradients (dq, dk, dc) are kept: ``v' = k`` is a
    device to form dP, not a dependence. With a key bias the VJP is not implemented (it raises).
    """
    return flash_stats(q, k, logit_scale=a, query_scale=c, key_bias=b, mask=spec,
                       return_row_max=True)[1:]


def _entropy_fwd(q, k, c, b, spec, a):
    q, k, c, b = (_value(x) for x in (q, k, c, b))
    spec = jax.tree.map(_value, spec)
    if b is not None:
        return _entropy(q, k, c, b, spec, a), (q, k, c, b, spec, None, None)
    out, lse, ent, mw = flash_forward(q, k, k, logit_scale=a, query_scale=c, mask=spec,
                                      return_stats=True)
    return (ent, _fwd.row_max_from_stats(lse, mw)), (q, k, c, b, spec, out, lse)


def _entropy_bwd(a, res, cts):
    q, k, c, b, spec, out, lse = res
    ct = cts[0]  # the row max's cotangent is ignored (the softmax does not depend on it)
    zeros = lambda x: None if x is None else jnp.zeros(x.shape, x.dtype)
    if isinstance(ct, _SymbolicZero):
        return zeros(q), zeros(k), zeros(c), zeros(b), _zeros_like_spec(spec)
    if b is not None:
        raise NotImplementedError(
            "the gradient through the entropy of logits with a per-key bias (adaptive temperature "
            "with stop_gradient_beta=False on a biased variant) is not implemented in the Pallas "
            "kernels; use stop_gradient_beta=True or implementation='xla'")
    from pallas_kernels.backward import flash_backward
    g = jnp.transpose(ct, (0, 2, 1)).astype(jnp.float32)  # [B, T, N]
    if c is not None:
        g = g * jnp.transpose(c, (0, 2, 1))
    dout = (-a * g[..., None] * q.astype(jnp.float32)).astype(q.dtype)
    dq, dk, _, dc, _ = flash_backward(q, k, k, out, lse, dout, logit_scale=a, query_scale=c,
                                      mask=spec)
    return dq, dk, dc, None, _zeros_like_spec(spec)


_entropy.defvjp(_entropy_fwd, _entropy_bwd, symbolic_zeros=True)


def _bias_key_grad(variant, scale, a_traced, dtype):
    """``2 g`` (a python float) when the variant's key bias is ``g ||k_j||^2`` with a static ``g``
    and the backward kernel can add its key gradient (``flash_backward(bias_key_grad=)``); else
    None (XLA differentiates the bias)."""
    if a_traced is not None or dtype not in (jnp.bfloat16, jnp.float16):
        return None
    g = variant.key_bias_norm(scale)
    return 2.0 * float(g) if g is not None and _is_static(g) else None


def _with_registers(key, value, registers):
    if registers is None:
        return key, value, 0
    rk, rv = registers
    return (jnp.concatenate([rk.astype(key.dtype), key], axis=1),
            jnp.concatenate([rv.astype(value.dtype), value], axis=1), rk.shape[1])


def attention(query, key, value, *, variant, scale, bias=None, mask=None, is_causal=False,
              query_seq_lengths=None, key_value_seq_lengths=None, q_segment_ids=None,
              kv_segment_ids=None, local_window_size=None, registers=None, return_stats=False):
    """Fused attention for batched, validated inputs (the arguments of :func:`jaxattn.attention`).

    .. math::

      z_{ij} = c_i (a \\, q_i \\cdot k_j + b_j), \\quad o_i = \\sum_j \\text{softmax}_j(z_{i\\cdot}) v_j

    Args:
      query: ``[B, T, N, H]`` bfloat16 / float16.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      variant: a variant spec (softmax normaliser).
      scale: the call's logit scale (a float or a traced scalar).
      bias: must be None (no dense bias in the kernels).
      mask: must be None (no dense mask in the kernels).
      is_causal, query_seq_lengths, key_value_seq_lengths, q_segment_ids, kv_segment_ids,
      local_window_size: the structured mask (see :class:`~pallas_kernels.common.MaskSpec`).
      registers: ``([B, R, K, H], [B, R, K, Hv])`` keys/values prepended, visible to every query.
      return_stats: also return ``(logsumexp, entropy, max_weight)``, float32 ``[B, N, T]``, with
        the semantics of ``jaxattn.reference.AttentionStats`` (for RBF the logsumexp includes the
        ``-gamma ||q||^2`` offset).

    Returns:
      ``out [B, T, N, Hv]`` in the query dtype, or ``(out, (logsumexp, entropy, max_weight))``
      (callers wrap the triple in their stats type).

    Raises:
      NotImplementedError: hardmax / top-k, a bias or mask array, float32 inputs, head dims above
        256 -- the caller falls back to XLA.
    """
    _unsupported(variant, query, bias, mask)
    B, T, N, _ = query.shape
    key, value, R = _with_registers(key, value, registers)
    S = key.shape[1]
    spec = MaskSpec(q_lengths=query_seq_lengths, kv_lengths=key_value_seq_lengths,
                    q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                    is_causal=bool(is_causal), local_window_size=local_window_size,
                    num_registers=R)
    a_static, a_traced = _split_scale(variant.logit_scale(scale))
    bias_key_grad = _bias_key_grad(variant, scale, a_traced, key.dtype)
    # [B, S, K] or None; when the kernel adds the bias's key gradient, XLA must not
    b = variant.key_bias(key if bias_key_grad is None else jax.lax.stop_gradient(key), scale)
    if b is not None:
        b = jnp.transpose(b, (0, 2, 1)).astype(jnp.float32)
        if a_traced is not None:
            b = b / a_traced
    num_visible = jnp.broadcast_to(count_visible(spec, B, T, S)[:, None, :], (B, N, T))
    entropy = None
    if variant.needs_stats:
        c0 = None if a_traced is None else jnp.broadcast_to(a_traced, (B, N, T))
        if getattr(variant, "stop_gradient_beta", False):
            stop = jax.lax.stop_gradient
            _, entropy, row_max0 = flash_stats(
                stop(query), stop(key), logit_scale=a_static,
                query_scale=None if c0 is None else stop(c0),
                key_bias=None if b is None else stop(b), mask=spec, return_row_max=True)
        else:
            entropy, row_max0 = _entropy(query, key, c0, b, spec, a_static)
    with jax.ensure_compile_time_eval():  # a constant c (temperature) stays a constant under jit
        c_variant = variant.query_scale(num_visible, entropy)
    row_max = None
    if entropy is not None and variant.query_scale_nonnegative():
        # the main logits are c_variant (>= 0) times the sweep's
        row_max = jax.lax.stop_gradient(_fwd.scale_row_max(row_max0, c_variant))
    c = c_variant
    if c is not None and _is_static(c):
        # One constant c: z = (c a) q.k + c b, the constant-scale kernels (no row vector, no dc).
        a_static *= float(c)
        b = None if b is None else b * float(c)
        bias_key_grad = None if bias_key_grad is None else bias_key_grad * float(c)
        c = None
    if a_traced is not None:
        c = a_traced if c is None else c * a_traced
    if c is not None:
        c = jnp.broadcast_to(jnp.asarray(c, jnp.float32), (B, N, T))
    c_nonneg = _nonneg_hint(variant, c, a_traced)
    out, lse, ent, max_weight = _flash(query, key, value, c, b, spec, row_max, a_static,
                                       return_stats, c_nonneg, bias_key_grad)
    if not return_stats:
        return out
    offset = variant.query_offset(query, scale)  # [B, T, N] or None
    if offset is not None:
        offset = jnp.transpose(offset, (0, 2, 1)).astype(jnp.float32)
        if c_variant is not None:
            offset = jnp.broadcast_to(jnp.asarray(c_variant, jnp.float32), (B, N, T)) * offset
        lse = lse + jnp.where(num_visible > 0, offset, 0.0)
    return out, (lse, ent, max_weight)
