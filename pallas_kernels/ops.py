"""Differentiable kernel-level ops: the fused kernels behind ``jax.custom_vjp``, over plain arrays.

The problem is the one of :mod:`pallas_kernels.common`,

.. math::

  z_{ij} = c_i \\, (a \\, q_i \\cdot k_j + b_j), \\qquad
  o_i = \\sum_j \\text{softmax}_j(z_{i\\cdot}) \\, v_j, \\qquad
  \\text{lse}_i = \\log \\sum_j e^{z_{ij}}

over the keys a :class:`~pallas_kernels.common.MaskSpec` leaves visible, with ``a`` a python float,
``c`` a float32 ``[B, N, T]`` array or None and ``b`` a float32 ``[B, K, S]`` array or None. These
ops know nothing of attention variants: the library (``jaxattn.fused``) turns a variant's plan into
``a``, ``b`` and ``c`` with ordinary, differentiable XLA ops around them.

* :func:`flash_attention` -- the output and logsumexp (and optionally the entropy and max weight);
  its VJP is the backward kernel pair, with gradients to ``q, k, v, c, b``.
* :func:`flash_entropy` -- the statistics sweep: each row's entropy and base-2 row max, without
  P @ V; its VJP reuses the attention backward kernels (see :func:`flash_entropy`).
* :func:`flash_entropy_scaled` -- attention whose per-query scale is a function of each row's
  base entropy, ``c_i = f(H_i)`` (adaptive temperature): the statistics sweep, then the main sweep;
  its VJP fuses the gradient through ``f`` into the backward kernel pair.
* :func:`flash_hardmax` -- hardmax attention (uniform weights over each row's maximal logits) on
  the forward kernel; forward-only.

Both run under ``jit`` and ``grad``. Cotangents reach the output and logsumexp of
:func:`flash_attention` and the entropy of :func:`flash_entropy`; the other statistics' are not
implemented (they raise).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import BaseEntropy, MaskSpec, fold_offset
from pallas_kernels.forward import (
    MASKED,
    _check_inputs,
    flash_forward,
    flash_stats,
    row_max_from_stats,
    scale_row_max,
)

__all__ = ["flash_attention", "flash_entropy", "flash_entropy_scaled", "flash_hardmax"]

_SymbolicZero = jax.custom_derivatives.SymbolicZero


def _zeros_like_spec(spec):
    return jax.tree.map(lambda x: np.zeros(np.shape(x), jax.dtypes.float0), spec)


def _value(x):
    """The primal of a ``symbolic_zeros`` custom_vjp argument (None passes through)."""
    return None if x is None else x.value


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _flash(q, k, v, c, b, spec, row_max, a, stats, c_nonneg, bias_key_grad, cap):
    out, lse, *rest = flash_forward(q, k, v, logit_scale=a, query_scale=c, key_bias=b, mask=spec,
                                    return_stats=stats, query_scale_nonnegative=c_nonneg,
                                    row_max=row_max, logits_soft_cap=cap)
    return (out, lse, *rest) if stats else (out, lse, None, None)


def _flash_fwd(q, k, v, c, b, spec, row_max, a, stats, c_nonneg, bias_key_grad, cap):
    c_perturbed = c is not None and c.perturbed
    q, k, v, c, b, row_max = (_value(x) for x in (q, k, v, c, b, row_max))
    spec = jax.tree.map(_value, spec)
    # The pytree structure says whether c's gradient is wanted: a zero-size marker, or None.
    want_dc = None if not c_perturbed else jnp.zeros((0,), jnp.float32)
    result = _flash(q, k, v, c, b, spec, row_max, a, stats, c_nonneg, bias_key_grad, cap)
    return result, (q, k, v, c, b, spec, result[0], result[1], result[2], want_dc)


def _fold(mask, q, k):
    """``(spec, empty)``: ``mask`` offset-free (:func:`~pallas_kernels.common.fold_offset`), and
    whether every row is known empty (no sequence key visible, no registers): then the ops return
    what the kernels give such rows without running them."""
    mask = MaskSpec() if mask is None else mask
    spec, no_keys = fold_offset(mask, q.shape[0], q.shape[1], k.shape[1])
    return spec, no_keys and not spec.num_registers


def _no_keys(q, k, v, logit_scale, return_stats):
    """What the forward kernel gives when no row sees a key: zero output and statistics (the
    inputs still checked)."""
    _check_inputs(q, k, v, logit_scale)
    B, T, N, _ = q.shape
    out = jnp.zeros((B, T, N, v.shape[3]), q.dtype)
    zeros = jnp.zeros((B, N, T), jnp.float32)
    return (out, zeros, zeros, zeros) if return_stats else (out, zeros)


def _is_zero(ct):
    return ct is None or isinstance(ct, _SymbolicZero)


def _output_cotangents(cts, out):
    """``(dout, dlse or None)`` of an op's ``(out, lse, entropy, max_weight)`` cotangents; the
    statistics' cotangents raise (their gradients are not implemented)."""
    dout, dlse, dent, dmw = cts
    for name, ct in (("entropy", dent), ("max_weight", dmw)):
        if not _is_zero(ct):
            raise NotImplementedError(
                f"differentiating the kernel's {name} statistic is not implemented; "
                "differentiate the output and the logsumexp, or use implementation='xla'")
    dout = jnp.zeros(out.shape, out.dtype) if isinstance(dout, _SymbolicZero) else dout
    return dout, (None if _is_zero(dlse) else dlse)


def _lse_scale_grad(dlse, lse, ent, c):
    """The logsumexp cotangent's part of ``dc``: ``dlse_i d lse_i / d c_i = dlse_i sum_j p_ij u_ij
    = dlse_i (lse_i - H_i) / c_i`` (``z = c u`` and ``sum_j p z = lse - H``); the dq kernel leaves
    it out. Rows with ``c_i = 0`` get none (there p is uniform and the mean of u is not in the
    statistics; SSMax's c = 0 at n_i = 1, where dc/ds = 0)."""
    ok = c != 0
    return jnp.where(ok, dlse * (lse - ent) / jnp.where(ok, c, 1.0), 0.0)


def _flash_bwd(a, stats, c_nonneg, bias_key_grad, cap, res, cts):
    del stats, c_nonneg
    q, k, v, c, b, spec, out, lse, ent, want_dc = res
    dout, dlse = _output_cotangents(cts, out)
    from pallas_kernels.backward import flash_backward
    dq, dk, dv, dc, db = flash_backward(q, k, v, out, lse, dout.astype(out.dtype), logit_scale=a,
                                        query_scale=c, key_bias=b, mask=spec,
                                        query_scale_grad=want_dc is not None,
                                        bias_key_grad=bias_key_grad, lse_cotangent=dlse,
                                        logits_soft_cap=cap)
    if dlse is not None and dc is not None:
        if cap is not None:
            raise NotImplementedError("the logsumexp's gradient to a per-query scale under a soft "
                                      "cap (d lse / dc = sum p (1 - t^2) u is not in the statistics)")
        if ent is None:
            ent = flash_stats(q, k, logit_scale=a, query_scale=c, key_bias=b, mask=spec)[1]
        dc = dc + _lse_scale_grad(dlse, lse, ent, c)
    if c is not None and dc is None:  # c's gradient is not wanted (not perturbed)
        dc = jnp.zeros(c.shape, c.dtype)
    return dq, dk, dv, dc, db, _zeros_like_spec(spec), None  # row_max: a shift, zero cotangent


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


def flash_attention(q, k, v, *, logit_scale: float, query_scale=None, key_bias=None,
                    mask: MaskSpec | None = None, row_max=None, return_stats: bool = False,
                    query_scale_nonnegative: bool = False, bias_key_grad: float | None = None,
                    logits_soft_cap: float | None = None):
    """Fused attention over plain arrays, differentiable in ``q, k, v, query_scale, key_bias``.

    .. math::

      z_{ij} = c_i (a \\, q_i \\cdot k_j + b_j), \\quad
      o_i = \\sum_j \\text{softmax}_j(z_{i\\cdot}) v_j, \\quad \\text{lse}_i = \\log \\sum_j e^{z_{ij}}

    Args:
      q: ``[B, T, N, H]`` bfloat16 or float16.
      k: ``[B, S, K, H]`` (registers first, ``mask.num_registers`` of them), ``N % K == 0``.
      v: ``[B, S, K, Hv]``.
      logit_scale: the python float ``a``.
      query_scale: ``c``, float32 ``[B, N, T]``, or None for 1.
      key_bias: ``b``, float32 ``[B, K, S]``, or None for 0.
      mask: the :class:`~pallas_kernels.common.MaskSpec` (None: every key visible). Its
        ``offset`` (a block of keys elsewhere in the sequence) becomes the kernels' causal /
        window flags (:func:`~pallas_kernels.common.fold_offset`); where it leaves no query a
        key and there are no registers, the op returns zeros (the kernels' empty rows) without
        running them.
      row_max: the exact row max of the base-2 logits (see
        :func:`~pallas_kernels.forward.flash_forward`), or None; it receives no gradient.
      return_stats: also return each row's entropy and max weight.
      query_scale_nonnegative: the caller guarantees ``c >= 0`` (a tiling hint).
      bias_key_grad: ``2 g`` when ``b_j = g ||k_j||^2`` was computed from ``stop_gradient(k)``:
        the backward kernel then adds the bias's key gradient ``2 g db_j k_j`` itself.
      logits_soft_cap: ``cap > 0`` or None: the softmax sees ``cap tanh(z / cap)`` (Gemma 2),
        forward and backward.

    Returns:
      ``(out [B, T, N, Hv], lse [B, N, T])``, and with ``return_stats`` also ``entropy`` and
      ``max_weight`` (float32 ``[B, N, T]``). Rows with no visible key give zeros. ``out`` and
      ``lse`` are differentiable (what combining attention over blocks of keys, or a sink logit,
      needs); a cotangent of ``lse`` with a per-query scale whose gradient is wanted costs a
      statistics sweep in the backward unless ``return_stats`` was set.

    Raises:
      NotImplementedError: what the kernels cannot run (float32 inputs, head dims above 256, a
        mask offset that hides every key from the block's first or last queries but not from all:
        :func:`~pallas_kernels.common.fold_offset`), and the gradient of the entropy or max weight.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels import MaskSpec, flash_attention
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 64, 2, 64), jnp.bfloat16)
      >>> out, lse = flash_attention(q, k, v, logit_scale=0.125, mask=MaskSpec(is_causal=True))
      >>> out.shape, lse.shape
      ((1, 64, 2, 64), (1, 2, 64))
    """
    mask, empty = _fold(mask, q, k)
    if empty:  # constants: their gradient to every input is zero
        return _no_keys(q, k, v, logit_scale, return_stats)
    out, lse, ent, mw = _flash(q, k, v, query_scale, key_bias, mask, row_max, float(logit_scale),
                               bool(return_stats), bool(query_scale_nonnegative), bias_key_grad,
                               None if logits_soft_cap is None else float(logits_soft_cap))
    return (out, lse, ent, mw) if return_stats else (out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _entropy(q, k, c, b, spec, a):
    return flash_stats(q, k, logit_scale=a, query_scale=c, key_bias=b, mask=spec,
                       return_row_max=True)[1:]


def _entropy_fwd(q, k, c, b, spec, a):
    q, k, c, b = (_value(x) for x in (q, k, c, b))
    spec = jax.tree.map(_value, spec)
    if b is not None:
        return _entropy(q, k, c, b, spec, a), (q, k, c, b, spec, None, None)
    out, lse, ent, mw = flash_forward(q, k, k, logit_scale=a, query_scale=c, mask=spec,
                                      return_stats=True)
    return (ent, row_max_from_stats(lse, mw)), (q, k, c, b, spec, out, lse)


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


def flash_entropy(q, k, *, logit_scale: float, query_scale=None, key_bias=None,
                  mask: MaskSpec | None = None, differentiable: bool = True,
                  logits_soft_cap: float | None = None):
    """Each row's entropy ``H_i`` of ``softmax(z)`` (nats) and base-2 row max, without P @ V.

    The statistics sweep of adaptive temperature. Its VJP reuses the attention backward kernels:
    ``dH_i / dz_ij = -p_ij (z_ij - sum_j p_ij z_ij)`` is the attention ``dZ = P (dP - delta)`` with
    ``dP_ij = -g_i z_ij = dO'_i . v'_j`` for values ``v' = k`` and output cotangent
    ``dO'_i = -g_i c_i a q_i`` (and ``delta_i = dO'_i . o'_i``, ``o'`` the forward output with
    ``v' = k``). Only the logits' gradients (dq, dk, dc) are kept: ``v' = k`` is a device to form
    dP, not a dependence. The row max gets no gradient (the softmax does not depend on it).

    Args:
      q, k, logit_scale, query_scale, key_bias, mask: as :func:`flash_attention`.
      differentiable: False runs the sweep alone on ``stop_gradient`` inputs (no residuals kept);
        True gives the VJP above (not implemented with a ``key_bias``: it raises when taken).
      logits_soft_cap: the entropy of ``softmax(cap tanh(z / cap))``; only with
        ``differentiable=False`` (the VJP above needs logits linear in ``k``).

    Returns:
      ``(entropy, row_max)``, float32 ``[B, N, T]`` (``row_max`` is ``-1e30`` on rows with no
      visible key: :func:`flash_attention`'s ``row_max`` input).
    """
    mask, empty = _fold(mask, q, k)
    if logits_soft_cap is not None and differentiable:
        raise NotImplementedError("the entropy sweep's gradient under a soft cap is not implemented "
                                  "(pass differentiable=False)")
    if empty:  # the kernels' rows without a visible key: entropy 0, row max MASKED
        _check_inputs(q, k, None, logit_scale)
        B, T, N, _ = q.shape
        return jnp.zeros((B, N, T), jnp.float32), jnp.full((B, N, T), MASKED, jnp.float32)
    if not differentiable:
        stop = jax.lax.stop_gradient
        q, k = stop(q), stop(k)
        query_scale = None if query_scale is None else stop(query_scale)
        key_bias = None if key_bias is None else stop(key_bias)
        return flash_stats(q, k, logit_scale=logit_scale, query_scale=query_scale,
                           key_bias=key_bias, mask=mask, return_row_max=True,
                           logits_soft_cap=logits_soft_cap)[1:]
    return _entropy(q, k, query_scale, key_bias, mask, float(logit_scale))


def _scale(scale_fn, entropy, operands):
    """``c = f(H, *operands)`` as float32 of the entropy's shape."""
    return jnp.broadcast_to(jnp.asarray(scale_fn(entropy, *operands), jnp.float32), entropy.shape)


def _scale_and_grad(scale_fn, entropy, operands):
    """``(c, f'(H))``: the scale and its elementwise derivative in the entropy, float32."""
    return jax.jvp(lambda h: _scale(scale_fn, h, operands), (entropy,), (jnp.ones_like(entropy),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _scaled(q, k, v, spec, operands, scale_fn, a, stats, c_nonneg):
    return _scaled_forward(q, k, v, spec, operands, scale_fn, a, stats, c_nonneg)[0]


def _scaled_fwd(q, k, v, spec, operands, scale_fn, a, stats, c_nonneg):
    q, k, v = (_value(x) for x in (q, k, v))
    spec, operands = (jax.tree.map(_value, x) for x in (spec, operands))
    return _scaled_forward(q, k, v, spec, operands, scale_fn, a, stats, c_nonneg)


def _scaled_forward(q, k, v, spec, operands, scale_fn, a, stats, c_nonneg):
    lse0, ent0, row_max0 = flash_stats(q, k, logit_scale=a, mask=spec, return_row_max=True)
    c, _ = _scale_and_grad(scale_fn, ent0, operands)
    # the main logits are c (>= 0) times the sweep's: their max is c times its max
    row_max = scale_row_max(row_max0, c) if c_nonneg else None
    out, lse, *rest = flash_forward(q, k, v, logit_scale=a, query_scale=c, mask=spec,
                                    return_stats=stats, query_scale_nonnegative=c_nonneg,
                                    row_max=row_max)
    ent, mw = rest if stats else (None, None)
    return (out, lse, ent, mw), (q, k, v, spec, operands, c, out, lse, ent, lse0, ent0)


def _scaled_bwd(scale_fn, a, stats, c_nonneg, res, cts):
    del stats, c_nonneg
    q, k, v, spec, operands, c, out, lse, ent, lse0, ent0 = res
    dout, dlse = _output_cotangents(cts, out)
    _, scale_grad = _scale_and_grad(scale_fn, ent0, operands)
    dc_lse = None
    if dlse is not None:
        if ent is None:
            ent = flash_stats(q, k, logit_scale=a, query_scale=c, mask=spec)[1]
        dc_lse = _lse_scale_grad(dlse, lse, ent, c)
    from pallas_kernels.backward import flash_backward
    base = BaseEntropy(lse0, ent0, scale_grad, None if dc_lse is None else scale_grad * dc_lse)
    dq, dk, dv, dc, _ = flash_backward(q, k, v, out, lse, dout.astype(out.dtype), logit_scale=a,
                                       query_scale=c, mask=spec, lse_cotangent=dlse,
                                       base_entropy=base)
    if dc_lse is not None:
        dc = dc + dc_lse
    # the operands' gradient: f's VJP at the forward's entropy, against c's whole cotangent
    d_operands = jax.vjp(lambda *ops: _scale(scale_fn, ent0, ops), *operands)[1](dc)
    return dq, dk, dv, _zeros_like_spec(spec), tuple(d_operands)


_scaled.defvjp(_scaled_fwd, _scaled_bwd, symbolic_zeros=True)


def flash_entropy_scaled(q, k, v, *, logit_scale: float, scale_fn, scale_operands=(),
                         mask: MaskSpec | None = None, return_stats: bool = False,
                         query_scale_nonnegative: bool = False):
    """Fused attention whose per-query scale is a function of each row's base entropy.

    .. math::

      H_i = -\\sum_j p^0_{ij} \\log p^0_{ij}, \\quad p^0_i = \\text{softmax}_j(a \\, q_i \\cdot k_j),
      \\quad c_i = f(H_i), \\quad
      o_i = \\sum_j \\text{softmax}_j(c_i a \\, q_i \\cdot k_j) \\, v_j

    over the keys ``mask`` leaves visible: adaptive temperature (Velickovic et al., 2025, "softmax
    is not enough") at the kernel level. The forward is the statistics sweep
    (:func:`~pallas_kernels.forward.flash_stats`) and the main sweep, handed the row max when
    ``c >= 0``. The backward is one pass of the backward kernel pair with the gradient through
    ``f`` fused (:class:`~pallas_kernels.common.BaseEntropy`): ``dH_i / du_ij = -p0_ij (u_ij -
    lse0_i + H_i)`` enters dq as a second accumulator and dk as a term of its ``dZ`` tile.

    Args:
      q, k, v, logit_scale, mask: as :func:`flash_attention`.
      scale_fn: ``f(entropy, *scale_operands)``, elementwise in the entropy (float32 ``[B, N, T]``,
        nats) and broadcastable to it: the kernels take its derivative ``f'(H_i)`` per row. A
        hashable callable (a module-level function, a method of a frozen dataclass).
      scale_operands: arrays ``f`` also reads; they get ``f``'s VJP of ``c``'s cotangent.
      return_stats: also return the main softmax's entropy and max weight.
      query_scale_nonnegative: the caller guarantees ``f >= 0`` (the main sweep then takes the
        row max from the statistics sweep).

    Returns:
      ``(out [B, T, N, Hv], lse [B, N, T])`` of the main softmax (with ``return_stats`` also its
      entropy and max weight); differentiable in ``q, k, v`` (and the operands) through the
      output and the logsumexp.

    Raises:
      TypeError: ``scale_fn`` is not callable.
      NotImplementedError: what the kernels cannot run (see :func:`flash_attention`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels import flash_entropy_scaled
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 64, 2, 64), jnp.bfloat16)
      >>> beta = lambda h: 1.0 + 0.5 * h  # sharper where the base weights are dispersed
      >>> out, lse = flash_entropy_scaled(q, k, v, logit_scale=0.125, scale_fn=beta)
      >>> jax.grad(lambda q: jnp.sum(flash_entropy_scaled(
      ...     q, k, v, logit_scale=0.125, scale_fn=beta)[0].astype(jnp.float32)))(q).shape
      (1, 64, 2, 64)
    """
    if not callable(scale_fn):
        raise TypeError(f"scale_fn must be a callable f(entropy, *scale_operands), got "
                        f"{type(scale_fn).__name__}")
    mask, empty = _fold(mask, q, k)
    if empty:
        return _no_keys(q, k, v, logit_scale, return_stats)
    out, lse, ent, mw = _scaled(q, k, v, mask, tuple(scale_operands), scale_fn,
                                float(logit_scale), bool(return_stats),
                                bool(query_scale_nonnegative))
    return (out, lse, ent, mw) if return_stats else (out, lse)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7, 8))
def _hardmax(q, k, v, c, b, spec, a, stats, cap):
    out, lse, *rest = flash_forward(q, k, v, logit_scale=a, query_scale=c, key_bias=b, mask=spec,
                                    return_stats=stats, logits_soft_cap=cap, hardmax=True)
    return (out, lse, *rest) if stats else (out, lse, None, None)


@_hardmax.defjvp
def _hardmax_jvp(a, stats, cap, primals, tangents):
    raise TypeError("flash_hardmax is forward-only: its weights are piecewise constant in the "
                    "logits (no gradient to q, k, c, b) and the kernels have no value gradient; "
                    "wrap its inputs in jax.lax.stop_gradient")


def flash_hardmax(q, k, v, *, logit_scale: float, query_scale=None, key_bias=None,
                  mask: MaskSpec | None = None, return_stats: bool = False,
                  logits_soft_cap: float | None = None):
    """Fused hardmax attention over plain arrays: the mean of the values of each row's maximal logits.

    .. math::

      M_i = \\{j : z_{ij} = \\max_{j'} z_{ij'}\\}, \\quad
      o_i = \\frac{1}{|M_i|} \\sum_{j \\in M_i} v_j, \\quad
      \\text{lse}_i = \\max_j z_{ij} + \\log |M_i|

    over the visible keys, ``z`` as :func:`flash_attention`'s (``cap tanh(z / cap)`` with a soft
    cap). Ties are equal float32 logits as the kernel computes them (bf16 products accumulated in
    float32): logits the XLA reference computes as equal can differ here by accumulation order only
    where they are not exact, e.g. never for small dyadic inputs. One sweep of the forward kernel:
    the online max keeps the argmax set and its count and empties them where the max grows.

    Args:
      q, k, v, logit_scale, query_scale, key_bias, mask, logits_soft_cap: as
        :func:`flash_attention`.
      return_stats: also return the entropy ``log |M_i|`` and max weight ``1 / |M_i|``.

    Returns:
      ``(out [B, T, N, Hv], lse [B, N, T])`` (and with ``return_stats`` the entropy and max
      weight); rows with no visible key give zeros.

    Raises:
      TypeError: when differentiated (forward-only; the library's hardmax backend adds the value
        gradient).
      NotImplementedError: what the kernels cannot run (see :func:`flash_attention`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels import flash_hardmax
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 64, 2, 64), jnp.bfloat16)
      >>> k = k.at[:, 5].set(k[:, 3])  # key 5 duplicates key 3: a tie wherever 3 is the max
      >>> out, lse = flash_hardmax(q, k, v, logit_scale=0.125)
      >>> out.shape
      (1, 64, 2, 64)
    """
    mask, empty = _fold(mask, q, k)
    if empty:
        return _no_keys(q, k, v, logit_scale, return_stats)
    out, lse, ent, mw = _hardmax(q, k, v, query_scale, key_bias, mask, float(logit_scale),
                                 bool(return_stats),
                                 None if logits_soft_cap is None else float(logits_soft_cap))
    return (out, lse, ent, mw) if return_stats else (out, lse)
