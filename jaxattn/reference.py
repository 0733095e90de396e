"""Pure-jnp reference of every attention variant: the oracle for the kernels.

It materialises the ``[B, N, T, S]`` logits, so it is for testing and small problems. Statistics
and weights are computed in float32 (float64 for float64 inputs); jit, vmap and grad compatible.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn import masking
from jaxattn.plan import Plan

__all__ = ["AttentionStats", "attention_reference", "attention_weights_reference"]

# Finite "minus infinity" for masked logits (never -inf: a fully masked row must stay NaN-free).
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


class AttentionStats(NamedTuple):
    """Per-query statistics, each ``[B, N, T]`` (``[N, T]`` unbatched), float32.

    Attributes:
      logsumexp: ``log sum_j exp(z_ij)`` over the keys that carry weight (all visible keys for
        softmax variants, the kept ones for top-k, the maximal ones for hardmax), of the logits
        as the variant defines them (for RBF: ``-gamma ||q - k||^2``; soft-capped when the call
        caps them).
      entropy: ``-sum_j p_ij log p_ij`` of the final weights, in nats.
      max_weight: ``max_j p_ij``.

    With sink logits the weights are over the keys and the sink: the logsumexp includes
    ``e^{s_h}``, and the entropy and max weight count the sink's weight ``e^{s_h - lse_i}``. A
    query with no visible key has all three equal to zero.
    """

    logsumexp: jax.Array
    entropy: jax.Array
    max_weight: jax.Array


def _compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _forward_only(x, name):
    return x


@_forward_only.defjvp
def _forward_only_jvp(name, primals, tangents):
    raise TypeError(
        f"The {name!r} attention variant is forward-only: its weights are piecewise constant in "
        "the logits, so it has no useful gradient with respect to queries, keys, bias or "
        "variant parameters. Differentiate a softmax variant instead (e.g. Softmax with a small "
        "temperature), or wrap the inputs in jax.lax.stop_gradient."
    )


def _masked_softmax(z, keep, sink=None):
    """Softmax of ``z`` over the True entries of ``keep`` (and a sink logit); all-False rows give
    zeros.

    ``sink`` (``[..., 1]`` broadcastable, or None) adds ``e^sink`` to each row's normaliser and
    takes no value. Returns ``(p, lse, p_sink)`` with ``lse`` and ``p_sink`` ``[..., T]`` (zero for
    empty rows; ``p_sink`` None without a sink).
    """
    zm = jnp.where(keep, z, _NEG)
    m = jnp.max(zm, axis=-1, keepdims=True)
    if sink is not None:
        m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(m)
    e = jnp.where(keep, jnp.exp(zm - m), 0.0)
    keys = jnp.sum(e, axis=-1, keepdims=True)
    # not keys > 0: a sink far above every logit can underflow all of e to zero
    nonempty = jnp.any(keep, axis=-1, keepdims=True)
    total = keys if sink is None else keys + jnp.exp(sink - m)
    total = jnp.where(nonempty, total, 1.0)
    p = e / total
    lse = jnp.where(nonempty, m + jnp.log(total), 0.0)
    p_sink = None if sink is None else jnp.where(nonempty, jnp.exp(sink - m) / total, 0.0)[..., 0]
    return p, lse[..., 0], p_sink


def _entropy(p, eps=0.0, p_sink=None):
    """``-sum p log(p + eps)`` over the last axis (and the sink's weight), with ``0 log 0 = 0``."""
    safe = jnp.where(p > 0, p, 1.0)
    h = 0.0 - jnp.sum(jnp.where(p > 0, p * jnp.log(safe + eps), 0.0), axis=-1)  # no -0.0
    if p_sink is not None:
        h = h - jnp.where(p_sink > 0, p_sink * jnp.log(jnp.where(p_sink > 0, p_sink, 1.0) + eps),
                          0.0)
    return h


def _final_logits(u, c, offset, cap):
    """The logits the normaliser sees: ``c_i (u_ij + o_i)``, soft-capped to ``cap tanh(. / cap)``
    when ``cap`` is set. ``offset`` (``o_i``, the per-query constant the variant drops) is None
    where it may stay dropped; with a cap or a sink it may not (tanh is not shift-invariant, and a
    sink logit competes with the logits as the variant defines them)."""
    if offset is not None:
        u = u + offset[..., None]
    z = u if c is None else c[..., None] * u
    return z if cap is None else cap * jnp.tanh(z / cap)


def _support(z, visible, variant):
    """The keys that carry weight: visible, maximal (hardmax) or the k largest (top-k)."""
    if variant.normalizer == "softmax":
        return visible
    zm = jnp.where(visible, z, _NEG)
    if variant.normalizer == "hardmax":
        return visible & (zm == jnp.max(zm, axis=-1, keepdims=True))
    if variant.normalizer == "topk":
        k = min(variant.k, z.shape[-1])
        _, idx = jax.lax.top_k(zm, k)  # ties: lower index first
        chosen = jnp.sum(jax.nn.one_hot(idx, z.shape[-1], dtype=jnp.int32), axis=-2) > 0
        return visible & chosen
    raise ValueError(f"unknown normalizer {variant.normalizer!r}")


def _logits(query, key, plan, bias):
    """``a q.k + b_j + bias``, ``[B, N, T, S]`` in the compute dtype."""
    B, T, N, H = query.shape
    _, S, K, _ = key.shape
    ct = _compute_dtype(query.dtype)
    q = query.reshape(B, T, K, N // K, H)
    qk = jnp.einsum("BTKGH,BSKH->BKGTS", q, key, preferred_element_type=ct,
                    precision=jax.lax.Precision.HIGHEST)
    z = (plan.logit_scale * qk).reshape(B, N, T, S)
    kb = plan.key_bias(key)  # [B, S, K]
    if kb is not None:
        kb = jnp.repeat(kb.transpose(0, 2, 1), N // K, axis=1)  # [B, N, S]
        z = z + kb[:, :, None, :].astype(ct)
    if bias is not None:
        z = z + bias.astype(ct)
    return z.astype(ct)


def _with_registers(key, value, bias, registers):
    if registers is None:
        return key, value, bias, 0
    rk, rv = registers  # [B, R, K, H], [B, R, K, Hv]
    R = rk.shape[1]
    key = jnp.concatenate([rk.astype(key.dtype), key], axis=1)
    if value is not None:
        value = jnp.concatenate([rv.astype(value.dtype), value], axis=1)
    if bias is not None:
        bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 1) + [(R, 0)])
    return key, value, bias, R


def attention_weights_reference(query, key, plan: Plan, *, value=None):
    """Weights ``[B, N, T, R + S]`` and :class:`AttentionStats` of a plan (batched inputs).

    ``plan`` is :func:`jaxattn.plan.make_plan`'s. A ``-inf`` bias entry hides its key, as a False
    mask entry does (SSMax's ``n_i`` does not count it). Returns ``(weights, stats, key, value)``
    where key and value include the registers.
    """
    B, T, N, _ = query.shape
    S = key.shape[1]
    variant = plan.variant
    bias = plan.bias
    if bias is not None:
        bias = jnp.broadcast_to(bias, (B, bias.shape[1], T, S))
    key, value, bias, R = _with_registers(key, value, bias, plan.registers)
    visible = masking.visibility_mask(plan.mask, batch=B, q_len=T, kv_len=S,
                                      dense=plan.dense_mask)
    if bias is not None:
        # A -inf bias hides its key as a False mask entry does: left in the logits, a row biased
        # -inf on every key would give exp(-inf - -inf) = NaN instead of the zeros promised for a
        # query with no visible key, and 0 * -inf = NaN in the gradients of per-query scales.
        visible = visible & (bias != -jnp.inf)
    visible = jnp.broadcast_to(visible, (B, N, T, R + S))
    z = _logits(query, key, plan, bias)
    if bias is not None:
        # Hidden entries never carry weight; a finite stand-in keeps their zero cotangents from
        # meeting -inf (0 * -inf = NaN) in the products below.
        z = jnp.where(visible, z, 0.0)
    if not variant.differentiable:
        z = _forward_only(z, variant.name)
    num_visible = jnp.sum(visible, axis=-1, dtype=jnp.int32)
    cap = plan.logits_soft_cap
    offset = plan.query_offset(query)  # [B, T, N]
    if offset is not None:
        offset = offset.transpose(0, 2, 1).astype(z.dtype)  # [B, N, T]
    sink = None
    if plan.sink_logits is not None:
        sink = jnp.asarray(plan.sink_logits, z.dtype)[None, :, None, None]  # [1, N, 1, 1]
    # the offset goes into the logits only where the cap or a sink makes it matter
    exact = offset if cap is not None or sink is not None else None
    entropy0 = None
    if variant.needs_stats:
        p0, _, p0_sink = _masked_softmax(_final_logits(z, None, exact, cap), visible, sink)
        entropy0 = _entropy(p0, variant.entropy_eps, p0_sink)
    c = plan.query_scale(num_visible, entropy0)
    if c is not None:
        c = jnp.broadcast_to(jnp.asarray(c, z.dtype), (B, N, T))
    z = _final_logits(z, c, exact, cap)
    keep = _support(z, visible, variant)
    p, lse, p_sink = _masked_softmax(z, keep, sink)
    if offset is not None and exact is None:  # else the logits hold the offset already
        lse = lse + jnp.where(num_visible > 0, offset if c is None else c * offset, 0.0)
    max_weight = jnp.max(p, axis=-1)
    stats = AttentionStats(
        logsumexp=lse,
        entropy=_entropy(p, 0.0, p_sink),
        max_weight=max_weight if p_sink is None else jnp.maximum(max_weight, p_sink),
    )
    return p, stats, key, value


def attention_reference(query, key, value, plan: Plan, *, return_stats=False):
    """Reference attention for batched inputs and their plan; see :func:`jaxattn.attention`.

    Returns ``out [B, T, N, Hv]`` in the query dtype, and :class:`AttentionStats` if
    ``return_stats``.
    """
    B, T, N, _ = query.shape
    p, stats, key, value = attention_weights_reference(query, key, plan, value=value)
    K, Hv = value.shape[2], value.shape[3]
    ct = p.dtype
    pg = p.reshape(B, K, N // K, T, p.shape[-1])
    out = jnp.einsum("BKGTS,BSKH->BTKGH", pg, value.astype(ct),
                     precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(B, T, N, Hv).astype(query.dtype)
    if return_stats:
        return out, stats
    return out
