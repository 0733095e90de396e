"""Pure-jnp reference of every attention variant: the oracle for the kernels.

It materialises the ``[B, N, T, S]`` logits, so it is for testing and small problems. Statistics
and weights are computed in float32 (float64 for float64 inputs); jit, vmap and grad compatible.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn import masking
from jaxattn.variants import Variant

__all__ = ["AttentionStats", "attention_reference", "attention_weights_reference"]

# Finite "minus infinity" for masked logits (never -inf: a fully masked row must stay NaN-free).
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


class AttentionStats(NamedTuple):
    """Per-query statistics, each ``[B, N, T]`` (``[N, T]`` unbatched), float32.

    Attributes:
      logsumexp: ``log sum_j exp(z_ij)`` over the keys that carry weight (all visible keys for
        softmax variants, the kept ones for top-k, the maximal ones for hardmax), of the logits
        as the variant defines them (for RBF: ``-gamma ||q - k||^2``).
      entropy: ``-sum_j p_ij log p_ij`` of the final weights, in nats.
      max_weight: ``max_j p_ij``.

    A query with no visible key has all three equal to zero.
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


def _masked_softmax(z, keep):
    """Softmax of ``z`` over the True entries of ``keep``; all-False rows give zeros.

    Returns (p, lse) with lse ``[..., T]`` (zero for empty rows).
    """
    zm = jnp.where(keep, z, _NEG)
    m = jax.lax.stop_gradient(jnp.max(zm, axis=-1, keepdims=True))
    e = jnp.where(keep, jnp.exp(zm - m), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    nonempty = total > 0
    p = e / jnp.where(nonempty, total, 1.0)
    lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, total, 1.0)), 0.0)
    return p, lse[..., 0]


def _entropy(p, eps=0.0):
    """``-sum p log(p + eps)`` over the last axis, with ``0 log 0 = 0``."""
    safe = jnp.where(p > 0, p, 1.0)
    return 0.0 - jnp.sum(jnp.where(p > 0, p * jnp.log(safe + eps), 0.0), axis=-1)  # no -0.0


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


def _logits(query, key, variant: Variant, scale, bias):
    """``a q.k + b_j + bias``, ``[B, N, T, S]`` in the compute dtype."""
    B, T, N, H = query.shape
    _, S, K, _ = key.shape
    ct = _compute_dtype(query.dtype)
    q = query.reshape(B, T, K, N // K, H)
    qk = jnp.einsum("BTKGH,BSKH->BKGTS", q, key, preferred_element_type=ct,
                    precision=jax.lax.Precision.HIGHEST)
    z = (variant.logit_scale(scale) * qk).reshape(B, N, T, S)
    kb = variant.key_bias(key, scale)  # [B, S, K]
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


def attention_weights_reference(
    query,
    key,
    *,
    variant: Variant,
    scale,
    bias=None,
    mask=None,
    is_causal=False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    local_window_size=None,
    registers=None,
    value=None,
):
    """Weights ``[B, N, T, R + S]`` and :class:`AttentionStats` of a variant (batched inputs).

    Arguments are the normalised ones of :func:`jaxattn.attention` (batched arrays, a ``[B, N|1,
    T, S]`` bias and bool mask, a ``(left, right)`` window, registers as ``([B, R, K, H], [B, R,
    K, Hv])``). A ``-inf`` bias entry hides its key, as a False mask entry does (SSMax's ``n_i``
    does not count it). Returns ``(weights, stats, key, value)`` where key and value include
    registers.
    """
    B, T, N, _ = query.shape
    S = key.shape[1]
    if bias is not None:
        bias = jnp.broadcast_to(bias, (B, bias.shape[1], T, S))
    key, value, bias, R = _with_registers(key, value, bias, registers)
    visible = masking.visibility_mask(
        batch=B, q_len=T, kv_len=S, mask=mask, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        local_window_size=local_window_size, num_registers=R)
    if bias is not None:
        # A -inf bias hides its key as a False mask entry does: left in the logits, a row biased
        # -inf on every key would give exp(-inf - -inf) = NaN instead of the zeros promised for a
        # query with no visible key, and 0 * -inf = NaN in the gradients of per-query scales.
        visible = visible & (bias != -jnp.inf)
    visible = jnp.broadcast_to(visible, (B, N, T, R + S))
    z = _logits(query, key, variant, scale, bias)
    if bias is not None:
        # Hidden entries never carry weight; a finite stand-in keeps their zero cotangents from
        # meeting -inf (0 * -inf = NaN) in the products below.
        z = jnp.where(visible, z, 0.0)
    if not variant.differentiable:
        z = _forward_only(z, variant.name)
    num_visible = jnp.sum(visible, axis=-1, dtype=jnp.int32)
    entropy0 = None
    if variant.needs_stats:
        p0, _ = _masked_softmax(z, visible)
        entropy0 = _entropy(p0, getattr(variant, "entropy_eps", 0.0))
    c = variant.query_scale(num_visible, entropy0)
    if c is not None:
        c = jnp.broadcast_to(jnp.asarray(c, z.dtype), (B, N, T))
        z = c[..., None] * z
    keep = _support(z, visible, variant)
    p, lse = _masked_softmax(z, keep)
    offset = variant.query_offset(query, scale)  # [B, T, N]
    has_keys = num_visible > 0
    if offset is not None:
        offset = offset.transpose(0, 2, 1).astype(z.dtype)
        lse = lse + jnp.where(has_keys, offset if c is None else c * offset, 0.0)
    stats = AttentionStats(
        logsumexp=lse,
        entropy=_entropy(p),
        max_weight=jnp.max(p, axis=-1),
    )
    return p, stats, key, value


def attention_reference(query, key, value, *, variant: Variant, scale, return_stats=False,
                        **options):
    """Reference attention for batched, validated inputs; see :func:`jaxattn.attention`.

    Returns ``out [B, T, N, Hv]`` in the query dtype, and :class:`AttentionStats` if
    ``return_stats``.
    """
    B, T, N, _ = query.shape
    p, stats, key, value = attention_weights_reference(
        query, key, variant=variant, scale=scale, value=value, **options)
    K, Hv = value.shape[2], value.shape[3]
    ct = p.dtype
    pg = p.reshape(B, K, N // K, T, p.shape[-1])
    out = jnp.einsum("BKGTS,BSKH->BTKGH", pg, value.astype(ct),
                     precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(B, T, N, Hv).astype(query.dtype)
    if return_stats:
        return out, stats
    return out
