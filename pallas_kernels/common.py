"""The kernel layer the forward and backward share: the mask spec, the one visibility rule, the
soft cap of a tile's logits, the mma-bias operands, the grid order, and the kernel-level oracle.

Kernel-level problem (all arrays batched, ``jax.nn.dot_product_attention`` layout):

.. math::

  u_{ij} = a \\, q_i \\cdot k_j + b_j, \\qquad z_{ij} = c_i \\, u_{ij}, \\qquad
  p_{ij} = \\text{softmax}_j(z_{ij} \\text{ over visible } j), \\qquad o_i = \\sum_j p_{ij} v_j

* ``q`` ``[B, T, N, H]``, ``k`` ``[B, S, K, H]``, ``v`` ``[B, S, K, Hv]``, ``N % K == 0``; query head
  ``n`` reads kv head ``n // (N // K)``.
* ``a``: python float (``logit_scale``); ``c``: float32 ``[B, N, T]`` or None (= 1), the per-query
  scale; ``b``: float32 ``[B, K, S]`` or None (= 0), the per-key bias.
* Visibility (:class:`MaskSpec`): the first ``num_registers`` keys are registers, visible to every
  valid query; sequence key ``j`` (position ``j - num_registers``) is visible from query ``i``
  when ``i < q_lengths[b]``, ``pos < kv_lengths[b]``, ``pos <= i`` (causal),
  ``i - left <= pos <= i + right`` (window), ``q_segment_ids[b, i] == kv_segment_ids[b, pos]``.
* ``lse`` ``[B, N, T]`` float32 = ``log sum_j exp(z_ij)`` over visible keys (0 for a row with none).

Backward, with ``dP = dO V^T``, ``delta_i = sum_j p_ij dP_ij = dO_i . o_i`` and
``dZ = P * (dP - delta)``:
``dq_i = a c_i sum_j dZ_ij k_j``, ``dk_j = a sum_i c_i dZ_ij q_i`` (summed over the query heads of
the group), ``dv_j = sum_i p_ij dO_i`` (same), ``dc_i = sum_j dZ_ij u_ij``,
``db_j = sum_i c_i dZ_ij`` (summed over the group's query heads).
"""

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["MaskSpec", "visible", "flash_reference", "soft_cap", "soft_cap_base2", "split_bias",
           "bias_ones", "narrow_transforms", "segment_ranks", "tile_index", "interpret_context",
           "MMA_BIAS_WIDTH", "MMA_BIAS_TERMS"]

NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Structured visibility: static flags plus small index arrays (no ``T x S`` mask)."""

    q_lengths: jax.Array | None = None  # int32 [B]
    kv_lengths: jax.Array | None = None  # int32 [B]
    q_segment_ids: jax.Array | None = None  # int32 [B, T]
    kv_segment_ids: jax.Array | None = None  # int32 [B, S - num_registers]
    is_causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    local_window_size: tuple[int, int] | None = dataclasses.field(
        default=None, metadata=dict(static=True))
    num_registers: int = dataclasses.field(default=0, metadata=dict(static=True))


def has_codes(mask: MaskSpec) -> bool:
    """Whether ``mask`` has lengths or segment ids (per-row / per-key index arrays)."""
    return any(x is not None for x in (mask.q_lengths, mask.kv_lengths, mask.q_segment_ids))


def is_masked(mask: MaskSpec) -> bool:
    """Whether ``mask`` hides keys at all (causal, window, lengths, segments; registers alone do
    not): the ``masked`` the kernels' default tiles depend on."""
    return mask.is_causal or mask.local_window_size is not None or has_codes(mask)


def visible(spec: MaskSpec, b_idx, q_idx, k_idx):
    """Bool visibility of keys ``k_idx`` (incl. registers) from queries ``q_idx`` in batch ``b_idx``.

    Index arrays broadcast against each other (e.g. ``q_idx[:, None]``, ``k_idx[None, :]``);
    usable inside kernels on tiles and in XLA.
    """
    R = spec.num_registers
    pos = k_idx - R
    ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(k_idx)), bool)
    seq = pos >= 0
    if spec.is_causal:
        ok = ok & (pos <= q_idx)
    if spec.local_window_size is not None:
        left, right = spec.local_window_size
        ok = ok & (pos >= q_idx - left) & (pos <= q_idx + right)
    if spec.kv_lengths is not None:
        ok = ok & (pos < spec.kv_lengths[b_idx])
    if spec.q_segment_ids is not None:
        qs = spec.q_segment_ids[b_idx, q_idx]
        ks = spec.kv_segment_ids[b_idx, jnp.maximum(pos, 0)]
        ok = ok & (qs == ks)
    ok = jnp.where(seq, ok, True)
    if spec.q_lengths is not None:
        ok = ok & (q_idx < spec.q_lengths[b_idx])
    return ok


def soft_cap_base2(z2, cap2):
    """``(cap2 tanh(z2 / cap2), tanh(z2 / cap2))``: the soft cap of base-2 logits, and the factor
    whose ``1 - t^2`` is its derivative.

    ``log2(e) cap tanh(z / cap) = cap2 tanh(z2 / cap2)`` with ``z2 = z log2(e)`` and
    ``cap2 = cap log2(e)``, so the kernels cap their base-2 logits directly. ``tanh(x)`` is formed
    as ``1 - 2 / (2^(2 x log2 e) + 1)`` from ``exp2`` (relative error ~2^-22 on the GPU) rather
    than the GPU's ``tanh.approx`` (2^-11 relative, i.e. ``cap 2^-11`` in the logits: 2.5 % of a
    weight at Gemma 2's cap of 50); the absolute error of ``t`` is a few ``2^-24``.
    Saturates cleanly: ``exp2`` overflows to inf (``t = 1``) or underflows to 0 (``t = -1``).
    """
    t = 1.0 - 2.0 / (jnp.exp2(z2 * (2.0 * LOG2E / cap2)) + 1.0)
    return cap2 * t, t


def soft_cap(z, cap):
    """``cap tanh(z / cap)`` of natural-log logits, as the kernels form it (see
    :func:`soft_cap_base2`)."""
    return soft_cap_base2(z * LOG2E, cap * LOG2E)[0] / LOG2E


def flash_reference(q, k, v, *, logit_scale: float, query_scale=None, key_bias=None,
                    mask: MaskSpec = MaskSpec(), logits_soft_cap: float | None = None):
    """Pure-jnp oracle of the kernel-level problem: returns ``(out [B,T,N,Hv], lse [B,N,T])``.

    Differentiable in ``q, k, v, query_scale, key_bias``; use ``jax.vjp`` of it to check the
    backward kernels. With ``logits_soft_cap`` the softmax sees ``cap tanh(z / cap)`` (``jnp.tanh``
    here: the oracle of the kernels' form).
    """
    B, T, N, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    qg = q.astype(jnp.float32).reshape(B, T, K, G, -1)
    u = logit_scale * jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32),
                                 precision=jax.lax.Precision.HIGHEST)
    if key_bias is not None:
        u = u + key_bias[:, :, None, None, :]
    u = u.reshape(B, N, T, S)
    z = u if query_scale is None else query_scale[..., None] * u
    if logits_soft_cap is not None:
        z = logits_soft_cap * jnp.tanh(z / logits_soft_cap)
    vis = visible(mask, jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None],
                  jnp.arange(S)[None, None, :])[:, None]  # [B, 1, T, S]
    zm = jnp.where(vis, z, NEG)
    m = jax.lax.stop_gradient(jnp.max(zm, axis=-1, keepdims=True))
    e = jnp.where(vis, jnp.exp(zm - m), 0.0)
    tot = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(tot > 0, tot, 1.0)
    lse = jnp.where(tot > 0, m + jnp.log(jnp.where(tot > 0, tot, 1.0)), 0.0)[..., 0]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p.reshape(B, K, G, T, S), v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST).reshape(B, T, N, -1)
    return out.astype(q.dtype), lse


# ---------------------------------------------------------------------------------------------
# The kernel layer both kernels import (neither imports the other): the mma-bias operands, segment
# ranks, the tile order of the launch grid and the interpreter's device context.

MMA_BIAS_WIDTH = 16  # BlockSizes.mma_bias: columns of the bias operand (one bf16 wgmma k-step)
MMA_BIAS_TERMS = 3  # bf16 terms of the split bias (3 x 8 bits: a float32 exactly)


def _truncate_to_bf16(x):
    """float32 ``x`` with the low 16 mantissa bits cleared: exactly representable in bfloat16.

    Done on the bits: an ``f32 -> bf16 -> f32`` round trip may be removed by XLA's excess-precision
    rewrites inside a jitted fusion (it was, on the GPU: the split's low parts came out zero).
    """
    bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFF0000)
    return lax.bitcast_convert_type(bits, jnp.float32)


def bias_ones(rows, dtype=jnp.bfloat16):
    """The ``[rows, 16]`` left operand of the mma_bias product: ``[1, 1, 1, 0..]`` per row."""
    row = (jnp.arange(MMA_BIAS_WIDTH) < MMA_BIAS_TERMS).astype(dtype)
    return jnp.broadcast_to(row, (rows, MMA_BIAS_WIDTH))


def narrow_transforms():
    """SMEM tiling and swizzle of the ``[rows, 16]`` 16-bit mma_bias operands (32-byte rows)."""
    return (plgpu.TilingTransform((8, MMA_BIAS_WIDTH)), plgpu.SwizzleTransform(2 * MMA_BIAS_WIDTH))


def split_bias(kb, dtype=jnp.bfloat16, terms=MMA_BIAS_TERMS, width=MMA_BIAS_WIDTH):
    """``kb`` float32 ``[..., S]`` as ``terms`` bfloat16 parts summing to it, ``[..., S, width]``.

    Each part is the truncation of what the earlier ones left: ``t1 = trunc(kb)``,
    ``t2 = trunc(kb - t1)``, ...; every subtraction is exact, and three parts hold all 24 bits of
    a float32, so the parts sum to ``kb`` exactly. Non-finite entries go whole into ``t1``.
    The remaining columns are zero.
    """
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise NotImplementedError(f"split_bias makes bfloat16 parts, got dtype {dtype}")
    parts, rest = [], jnp.asarray(kb, jnp.float32)
    for _ in range(terms):
        t = _truncate_to_bf16(rest)
        parts.append(t.astype(dtype))  # exact: t is a bfloat16 value
        rest = jnp.where(jnp.isfinite(t), rest - t, 0.0)
    zeros = jnp.zeros(rest.shape + (width - terms,), dtype)
    return jnp.concatenate([jnp.stack(parts, axis=-1), zeros], axis=-1)


def segment_ranks(q_segment_ids, kv_segment_ids):
    """Dense ranks of segment ids, equal exactly where the ids are equal, in ``[0, T + S)``.

    Lets the kernel compare ids as float32 (exact below 2^24) whatever their int range.

    Args:
      q_segment_ids: int ``[B, T]``.
      kv_segment_ids: int ``[B, S]``.

    Returns:
      ``(q_ranks [B, T], kv_ranks [B, S])`` int32.
    """
    T = q_segment_ids.shape[1]
    # One common type wide enough for both: casting kv ids to q's type would wrap int64 ids
    # onto int32 ones (2**32 onto 0) and make different segments equal.
    common = jnp.promote_types(q_segment_ids.dtype, kv_segment_ids.dtype)
    both = jnp.concatenate([q_segment_ids.astype(common), kv_segment_ids.astype(common)], axis=1)
    ranks = jax.vmap(lambda x: jnp.searchsorted(jnp.sort(x), x, side="left"))(both)
    ranks = ranks.astype(jnp.int32)
    return ranks[:, :T], ranks[:, T:]


def tile_index(reverse: bool, axis: str, num_tiles: int):
    """This CTA's tile along grid axis ``axis``; ``reverse``: the last tile first. Mosaic GPU maps
    the grid ``(heads, q_seq, batch)`` to CUDA's ``(z, y, x)``: CTAs launch head by head, query
    tiles in order, so reversed, a causal kernel starts each head's longest tiles first."""
    i = lax.axis_index(axis)
    return (num_tiles - 1) - i if reverse else i


@contextlib.contextmanager
def interpret_context(interpret):
    """An abstract H100 mesh for the Mosaic GPU interpreter (it queries the device kind)."""
    if not interpret:
        yield
        return
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu",
                                         num_cores=8)
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield
