"""The fused backend: a plan's logit terms computed in XLA around the kernel ops of :mod:`pallas_kernels`.

For a plan (variant spec and logit scale ``s``) this computes, with ordinary differentiable ops,

.. math::

  a = \\text{logit\\_scale}(s), \\quad b_j = \\text{key\\_bias}(k)_j, \\quad
  c_i = \\text{query\\_scale}(n_i, H_i)

and runs :func:`pallas_kernels.flash_attention` on ``z_ij = c_i (a q_i . k_j + b_j)``. Its VJP is
over ``(q, k, v, c, b)``, so gradients reach the variant's parameters (SSMax ``s``, RBF ``gamma``, a
temperature), the keys through ``b`` and register keys/values through XLA autodiff. A traced ``a``
(a learned scale) is folded into ``c`` and ``b`` (``c a (q.k + b / a)``), keeping the kernel's ``a``
a python float.

Adaptive temperature runs the statistics sweep first (no P @ V) for the entropy ``H_i`` of
``softmax(z / c)``, then the main sweep with ``c = beta(H)``. With its default (gradient through
beta), a static logit scale and no key bias or soft cap, both sweeps and the backward are one op,
:func:`pallas_kernels.flash_entropy_scaled`, whose backward fuses the gradient through beta into the
backward kernels; otherwise :func:`pallas_kernels.flash_entropy` gives ``H`` and XLA forms ``c``
(the entropy's gradient then costs a second backward pass). The streamed entropy is exact;
the paper's ``-sum p log(p + eps)`` is smaller by at most ``n_i * eps`` nats
(``p log(1 + eps / p) <= eps`` per key), i.e. <= 1.6e-5 nats at n = 16384 and eps = 1e-9.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from jaxattn import chunked
from jaxattn.plan import Plan
from jaxattn.reference import _forward_only

__all__ = ["attention"]


def _unsupported(plan: Plan, query):
    variant = plan.variant
    if variant.normalizer not in ("softmax", "hardmax"):
        raise NotImplementedError(f"the Pallas kernels run softmax and hardmax variants, not "
                                  f"{variant.normalizer!r} ({variant.name}); use the chunked or "
                                  f"XLA path")
    if plan.bias is not None:
        raise NotImplementedError("the Pallas kernels take no [B, N, T, S] bias array (only the "
                                  "variant's per-key bias); use the XLA path")
    if plan.dense_mask is not None:
        raise NotImplementedError("the Pallas kernels take no bool mask array (causal, window, "
                                  "lengths and segment ids are supported); use the XLA path")
    if plan.logits_soft_cap is not None:
        if plan.query_offset(query) is not None:
            raise NotImplementedError("a soft cap with a per-query logit offset (RBF's -gamma "
                                      "||q||^2, which the kernels drop) is not fused; use the XLA "
                                      "path")
        if plan.sink_logits is not None:
            raise NotImplementedError("a soft cap with sink logits is not fused; use the XLA path")
        if plan.variant.needs_stats and plan.variant.stats_gradient():
            raise NotImplementedError("a soft cap with a gradient through the statistics sweep "
                                      "(adaptive temperature's beta) is not fused; use "
                                      "stop_gradient_beta=True or the XLA path")
    if plan.sink_logits is not None and plan.variant.needs_stats:
        raise NotImplementedError("sink logits with a statistics sweep (adaptive temperature: its "
                                  "entropy must count the sink) are not fused; use the XLA path")
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


def _bias_key_grad(plan: Plan, a_traced, dtype):
    """``2 g`` (a python float) when the variant's key bias is ``g ||k_j||^2`` with a static ``g``
    and the backward kernel can add its key gradient; else None (XLA differentiates the bias)."""
    if a_traced is not None or dtype not in (jnp.bfloat16, jnp.float16):
        return None
    g = plan.variant.key_bias_norm(plan.scale)
    return 2.0 * float(g) if g is not None and _is_static(g) else None


@dataclasses.dataclass(frozen=True)
class _EntropyScale:
    """``c_i = query_scale(n_i, H_i)`` of a statistics variant, as the kernel op's ``scale_fn``
    (hashable: a frozen variant)."""

    variant: object

    def __call__(self, entropy, num_visible):
        return self.variant.query_scale(num_visible, entropy)


def _entropy_scaled(query, key, value, plan: Plan, num_visible, a_static, b, return_stats):
    """Adaptive temperature's two sweeps and fused backward in one kernel op, or None when the
    plan has terms that op does not take or the kernels' tuning says its backward is the slower
    one here (:func:`pallas_kernels.fuses_entropy_grad`; then the two-op path runs)."""
    variant = plan.variant
    if (not variant.needs_stats or not variant.stats_gradient() or b is not None
            or plan.logits_soft_cap is not None or plan.sink_logits is not None
            or plan.query_offset(query) is not None
            or not pk.fuses_entropy_grad(max(query.shape[-1], value.shape[-1]),
                                         pk.common.is_masked(plan.mask))):
        return None
    result = pk.flash_entropy_scaled(query, key, value, logit_scale=a_static,
                                     scale_fn=_EntropyScale(variant), scale_operands=(num_visible,),
                                     mask=plan.mask, return_stats=return_stats,
                                     query_scale_nonnegative=variant.query_scale_nonnegative())
    if not return_stats:
        return result[0]
    out, lse, ent, max_weight = result
    return out, (lse, ent, max_weight)


def _with_registers(key, value, registers):
    if registers is None:
        return key, value
    rk, rv = registers
    return (jnp.concatenate([rk.astype(key.dtype), key], axis=1),
            jnp.concatenate([rv.astype(value.dtype), value], axis=1))


def attention(query, key, value, plan: Plan, *, return_stats=False):
    """Fused attention for batched inputs and their plan (see :func:`jaxattn.attention`).

    Args:
      query: ``[B, T, N, H]`` bfloat16 / float16.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      plan: :func:`jaxattn.plan.make_plan`'s, with a softmax normaliser and neither a dense bias
        nor a dense mask.
      return_stats: also return ``(logsumexp, entropy, max_weight)``, float32 ``[B, N, T]``, with
        the semantics of :class:`jaxattn.AttentionStats` (for RBF the logsumexp includes the
        ``-gamma ||q||^2`` offset).

    Returns:
      ``out [B, T, N, Hv]`` in the query dtype, or ``(out, (logsumexp, entropy, max_weight))``.

    Raises:
      NotImplementedError: what the kernels do not run (top-k, a dense bias or mask,
        float32 inputs, head dims above 256); the API falls back to XLA.
    """
    _unsupported(plan, query)
    if plan.variant.normalizer == "hardmax":
        return _hardmax(query, key, value, plan, return_stats)
    variant, spec = plan.variant, plan.mask
    B, T, N, _ = query.shape
    key, value = _with_registers(key, value, plan.registers)
    S = key.shape[1]
    a_static, a_traced = _split_scale(plan.logit_scale)
    bias_key_grad = _bias_key_grad(plan, a_traced, key.dtype)
    # [B, S, K] or None; when the kernel adds the bias's key gradient, XLA must not
    b = plan.key_bias(key if bias_key_grad is None else jax.lax.stop_gradient(key))
    if b is not None:
        b = jnp.transpose(b, (0, 2, 1)).astype(jnp.float32)
        if a_traced is not None:
            b = b / a_traced
    num_visible = jnp.broadcast_to(pk.count_visible(spec, B, T, S)[:, None, :], (B, N, T))
    if a_traced is None:
        fused = _entropy_scaled(query, key, value, plan, num_visible, a_static, b, return_stats)
        if fused is not None:
            return fused
    entropy = None
    if variant.needs_stats:
        c0 = None if a_traced is None else jnp.broadcast_to(a_traced, (B, N, T))
        entropy, row_max0 = pk.flash_entropy(query, key, logit_scale=a_static, query_scale=c0,
                                             key_bias=b, mask=spec,
                                             differentiable=variant.stats_gradient(),
                                             logits_soft_cap=plan.logits_soft_cap)
    with jax.ensure_compile_time_eval():  # a constant c (temperature) stays a constant under jit
        c_variant = plan.query_scale(num_visible, entropy)
    row_max = None
    if entropy is not None and variant.query_scale_nonnegative() and plan.logits_soft_cap is None:
        # the main logits are c_variant (>= 0) times the sweep's (not so under a cap)
        row_max = jax.lax.stop_gradient(pk.scale_row_max(row_max0, c_variant))
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
    # The forward's fold_scale hint: only where the variant guarantees c >= 0 and no traced logit
    # scale of unknown sign is folded into c (else the folding tiles negate Q's rows where c < 0).
    c_nonneg = c is not None and a_traced is None and variant.query_scale_nonnegative()
    offset = plan.query_offset(query)  # [B, T, N] or None: c_i o_i, dropped from the logits
    if offset is not None:
        offset = jnp.transpose(offset, (0, 2, 1)).astype(jnp.float32)
        if c_variant is not None:
            offset = jnp.broadcast_to(jnp.asarray(c_variant, jnp.float32), (B, N, T)) * offset
    sinks = plan.sink_logits is not None
    # With sinks and a per-query scale, the forward's entropy spares the backward the statistics
    # sweep that the lse cotangent's dc term would need.
    stats = return_stats or (sinks and c is not None)
    result = pk.flash_attention(query, key, value, logit_scale=a_static, query_scale=c,
                                key_bias=b, mask=spec, row_max=row_max, return_stats=stats,
                                query_scale_nonnegative=c_nonneg, bias_key_grad=bias_key_grad,
                                logits_soft_cap=plan.logits_soft_cap)
    out, lse, ent, max_weight = result if stats else (*result, None, None)
    if sinks:
        out, lse, ent, max_weight = _with_sinks(plan, out, lse, ent, max_weight, offset,
                                                num_visible > 0)
    if not return_stats:
        return out
    if offset is not None:
        lse = lse + jnp.where(num_visible > 0, offset, 0.0)
    return out, (lse, ent, max_weight)


def _with_sinks(plan: Plan, out, lse, ent, max_weight, offset, nonempty):
    """The kernel's attention over the keys, renormalised with each head's sink logit.

    A sink adds ``e^{s_h}`` to the normaliser and takes no value, so with ``w_i`` the weight the
    keys keep, ``w_i = e^lse_i / (e^lse_i + e^s_h) = sigmoid(lse_i - s_h)``: ``o_i -> w_i o_i``,
    ``lse_i -> logaddexp(lse_i, s_h)``, the entropy ``H -> w H + h(w)`` (``h`` the binary
    entropy: the grouping rule) and the max weight ``-> max(w mw, 1 - w)``. The kernel's logits
    drop the variant's ``c_i o_i``, so the sink is compared with them as ``s_h - c_i o_i``. The
    gradient flows through ``lse`` (:func:`pallas_kernels.flash_attention`'s is differentiable).
    """
    B, T, N = out.shape[0], out.shape[1], out.shape[2]
    s = jnp.broadcast_to(jnp.asarray(plan.sink_logits, jnp.float32)[None, :, None], (B, N, T))
    if offset is not None:
        s = s - offset
    w = jnp.where(nonempty, jax.nn.sigmoid(lse - s), 0.0)  # [B, N, T]
    rest = jnp.where(nonempty, jax.nn.sigmoid(s - lse), 0.0)  # 1 - w without the cancellation
    out = (out.astype(jnp.float32) * jnp.transpose(w, (0, 2, 1))[..., None]).astype(out.dtype)
    lse = jnp.where(nonempty, jnp.logaddexp(lse, s), 0.0)
    if ent is not None:
        def xlogx(x):
            return jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, x, 1.0)), 0.0)

        ent = jnp.where(nonempty, w * ent - xlogx(w) - xlogx(rest), 0.0)
        max_weight = jnp.where(nonempty, jnp.maximum(w * max_weight, rest), 0.0)
    return out, lse, ent, max_weight


def _hardmax(query, key, value, plan: Plan, return_stats):
    """Hardmax on the forward kernel (:func:`pallas_kernels.flash_hardmax`), one sweep.

    Forward-only in the queries, keys, register keys and a traced scale, as the variant is (their
    tangents raise the reference's TypeError). The value gradient ``W^T dO``, ``W`` the argmax
    weights, is the chunked sweep's VJP (:mod:`jaxattn.chunked`): the kernels have no hardmax
    backward, and the sweep forms the same argmax sets wherever the logits are exact (it sums
    ``q . k`` in float32 in another order than the tensor cores, so two logits within rounding of
    each other may tie in one and not the other).
    """
    name = plan.variant.name
    rk, rv = plan.registers if plan.registers is not None else (None, None)
    static_scale = _is_static(plan.scale)
    scale = None if static_scale else _forward_only(jnp.asarray(plan.scale), name)
    query, key = _forward_only(query, name), _forward_only(key, name)
    rk = None if rk is None else _forward_only(rk, name)
    base = dataclasses.replace(plan, registers=None, scale=plan.scale if static_scale else 1.0)

    def plan_of(mask, scale, rk, rv):
        return dataclasses.replace(base, mask=mask, scale=base.scale if scale is None else scale,
                                   registers=None if rk is None else (rk, rv))

    @jax.custom_vjp
    def run(q, k, v, rk, rv, mask, scale):
        return _hardmax_kernel(q, k, v, plan_of(mask, scale, rk, rv), return_stats)

    def run_fwd(q, k, v, rk, rv, mask, scale):
        return run(q, k, v, rk, rv, mask, scale), (q, k, v, rk, rv, mask, scale)

    def run_bwd(res, cts):
        q, k, v, rk, rv, mask, scale = res
        _, vjp = jax.vjp(lambda v, rv: chunked.attention(q, k, v, plan_of(mask, scale, rk, rv)),
                         v, rv)
        dv, drv = vjp(cts[0].astype(q.dtype))  # the statistics do not depend on the values
        zeros = lambda x: None if x is None else jnp.zeros(x.shape, x.dtype)
        dmask = jax.tree.map(lambda x: np.zeros(np.shape(x), jax.dtypes.float0), mask)
        return zeros(q), zeros(k), dv, zeros(rk), drv, dmask, zeros(scale)

    run.defvjp(run_fwd, run_bwd)
    result = run(query, key, value, rk, rv, plan.mask, scale)
    return (result[0], result[1:]) if return_stats else result[0]


def _hardmax_kernel(query, key, value, plan: Plan, return_stats):
    """``(out,)`` or ``(out, logsumexp, entropy, max_weight)`` of the hardmax kernel for a plan."""
    B, T, N, _ = query.shape
    key, value = _with_registers(key, value, plan.registers)
    if plan.key_bias(key) is not None or plan.query_offset(query) is not None:
        raise NotImplementedError("hardmax with a per-key bias or per-query offset is not fused")
    c = plan.query_scale(None, None)
    a_static, a_traced = _split_scale(plan.logit_scale)
    if c is not None:
        raise NotImplementedError("hardmax with a per-query scale is not fused")
    if a_traced is not None:  # a learned scale: a row factor of the kernel's logits
        c = jnp.broadcast_to(a_traced, (B, N, T))
    result = pk.flash_hardmax(query, key, value, logit_scale=a_static, query_scale=c,
                              mask=plan.mask, return_stats=return_stats,
                              logits_soft_cap=plan.logits_soft_cap)
    return tuple(result) if return_stats else (result[0],)
