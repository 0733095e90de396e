"""Hardmax and top-k attention without the ``T x S`` matrix: one sweep over key blocks in XLA.

The reference forms every logit at once (``[B, N, T, S]`` floats: 64 GiB at T = S = 131072); this
backend (``implementation="xla_chunked"``) scans the keys in blocks of ``block_kv`` and keeps per
query only what its normaliser needs, so its memory is ``O(B N T (block_kv + k))``:

* **hardmax** -- an online argmax set: the running row max ``m_i``, the number of keys ``c_i``
  that reach it and the sum of their values. A block whose max exceeds ``m_i`` replaces the set;
  one that equals it joins it. ``o_i = (sum_{j: z_ij = m_i} v_j) / c_i``, ``lse_i = m_i + log c_i``.
* **top-k** -- a running top-k of ``(logit, key index)``: each block's logits are merged with it by
  ``lax.top_k`` over ``[running, block]``, which keeps the lower index first among equal logits, as
  the reference does (registers first). Then the softmax over the kept logits and a gather of their
  ``k`` values.

The logits are the reference's, block by block (same einsum, float32 or float64), with the same
visibility (:func:`pallas_kernels.common.visible` plus the dense mask and ``-inf`` bias), so the
argmax sets and kept keys are the reference's. Forward-only in ``q`` and ``k`` (as the variants
are); differentiable in ``v``.
"""

import jax
import jax.numpy as jnp

from jaxattn.plan import Plan
from jaxattn.reference import (
    _NEG,
    AttentionStats,
    _compute_dtype,
    _final_logits,
    _forward_only,
    _logits,
)
from pallas_kernels.common import visible

__all__ = ["attention", "DEFAULT_BLOCK_KV"]

DEFAULT_BLOCK_KV = 512


def _unsupported(plan: Plan):
    if plan.variant.normalizer not in ("hardmax", "topk"):
        raise NotImplementedError(
            f"xla_chunked runs hardmax and top-k only, not {plan.variant.normalizer!r} "
            f"({plan.variant.name}); softmax variants have the fused kernels and the reference")
    if plan.variant.needs_stats:
        raise NotImplementedError("xla_chunked runs no statistics sweep")


def _block_logits(plan, q, k_blk, extra_blk, b_idx, i_idx, j_idx, S_total, offset):
    """Logits ``[B, N, T, blk]`` of one key block, hidden keys at ``_NEG``, and their visibility.
    ``extra_blk``: the block of the dense bias plus the dense mask as ``-inf`` (or None)."""
    z = _logits(q, k_blk, plan, extra_blk)  # a q.k + b_j + bias, the reference's form
    vis = visible(plan.mask, b_idx, i_idx, j_idx) & (j_idx < S_total)  # [B, T, blk]
    vis = vis[:, None]
    if extra_blk is not None:
        vis = vis & (extra_blk != -jnp.inf)
    z = jnp.where(vis, z, 0.0)
    if not plan.variant.differentiable:
        z = _forward_only(z, plan.variant.name)
    z = _final_logits(z, None, offset, plan.logits_soft_cap)
    return jnp.where(vis, z, _NEG), vis


def attention(query, key, value, plan: Plan, *, return_stats=False, block_kv=None):
    """Hardmax or top-k attention of batched inputs and their plan, key block by key block.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      plan: :func:`jaxattn.plan.make_plan`'s, with a hardmax or top-k variant.
      return_stats: also return :class:`~jaxattn.reference.AttentionStats`.
      block_kv: keys per block (a static int >= 1); None: :data:`DEFAULT_BLOCK_KV`.

    Returns:
      ``out [B, T, N, Hv]`` in the query dtype, and the statistics with ``return_stats``.

    Raises:
      NotImplementedError: a softmax-normalised variant (the caller falls back).

    Examples:
      >>> import jax, jaxattn
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 4096, 1, 64))
      >>> out = jaxattn.attention(q, k, v, variant=jaxattn.TopK(8), is_causal=True,
      ...                         implementation="xla_chunked")
      >>> out.shape
      (1, 4096, 1, 64)
    """
    _unsupported(plan)
    block_kv = DEFAULT_BLOCK_KV if block_kv is None else block_kv
    if isinstance(block_kv, bool) or not isinstance(block_kv, int) or block_kv < 1:
        raise ValueError(f"block_kv must be an int >= 1, got {block_kv!r}")
    B, T, N, _ = query.shape
    S = key.shape[1]
    ct = _compute_dtype(query.dtype)
    if plan.registers is not None:
        rk, rv = plan.registers
        key = jnp.concatenate([rk.astype(key.dtype), key], axis=1)
        value = jnp.concatenate([rv.astype(value.dtype), value], axis=1)
    R = plan.num_registers
    S_total = R + S
    K, Hv = value.shape[2], value.shape[3]
    blk = min(block_kv, S_total)
    n_blocks = -(-S_total // blk)
    pad = n_blocks * blk - S_total
    key = jnp.pad(key, ((0, 0), (0, pad), (0, 0), (0, 0)))
    value = jnp.pad(value, ((0, 0), (0, pad), (0, 0), (0, 0)))
    # the dense bias and mask as one additive term over the sequence keys (-inf hides)
    extra = None
    if plan.bias is not None:
        extra = jnp.broadcast_to(plan.bias, (B, plan.bias.shape[1], T, S)).astype(ct)
    if plan.dense_mask is not None:
        hidden = jnp.where(plan.dense_mask, 0.0, -jnp.inf).astype(ct)
        extra = hidden if extra is None else extra + hidden
    if extra is not None:
        extra = jnp.pad(extra, [(0, 0)] * 3 + [(R, pad)])
    offset = plan.query_offset(query)
    if offset is not None:
        offset = offset.transpose(0, 2, 1).astype(ct)
    exact = offset if plan.logits_soft_cap is not None else None
    b_idx = jnp.arange(B)[:, None, None]
    i_idx = jnp.arange(T)[None, :, None]
    G = N // K

    def block(n):
        j0 = n * blk
        k_blk = jax.lax.dynamic_slice_in_dim(key, j0, blk, axis=1)
        v_blk = jax.lax.dynamic_slice_in_dim(value, j0, blk, axis=1)
        e_blk = None if extra is None else jax.lax.dynamic_slice_in_dim(extra, j0, blk, axis=3)
        j_idx = (j0 + jnp.arange(blk))[None, None, :]
        z, vis = _block_logits(plan, query, k_blk, e_blk, b_idx, i_idx, j_idx, S_total, exact)
        return z, jnp.broadcast_to(vis, z.shape), v_blk, j0

    if plan.variant.normalizer == "hardmax":
        def step(carry, n):
            m, count, acc = carry
            z, vis, v_blk, _ = block(n)
            bm = jnp.max(z, axis=-1)  # [B, N, T]
            hit = vis & (z == bm[..., None])
            bc = jnp.sum(hit, axis=-1, dtype=jnp.int32)
            w = hit.astype(ct).reshape(B, K, G, T, blk)
            bsum = jnp.einsum("BKGTS,BSKH->BKGTH", w, v_blk.astype(ct),
                              precision=jax.lax.Precision.HIGHEST).reshape(B, N, T, Hv)
            new = bm > m
            same = bm == m
            m2 = jnp.maximum(m, bm)
            count2 = jnp.where(new, bc, count + jnp.where(same, bc, 0))
            acc2 = jnp.where(new[..., None], bsum, acc + jnp.where(same[..., None], bsum, 0.0))
            return (m2, count2, acc2), None

        init = (jnp.full((B, N, T), _NEG, ct), jnp.zeros((B, N, T), jnp.int32),
                jnp.zeros((B, N, T, Hv), ct))
        (m, count, acc), _ = jax.lax.scan(step, init, jnp.arange(n_blocks))
        seen = count > 0
        cnt = jnp.where(seen, count, 1).astype(ct)
        out = acc / cnt[..., None]
        lse = jnp.where(seen, m + jnp.log(cnt), 0.0)
        entropy = jnp.where(seen, jnp.log(cnt), 0.0)
        max_weight = jnp.where(seen, 1.0 / cnt, 0.0)
    else:
        kk = plan.variant.k

        def step(carry, n):
            top_z, top_j = carry  # [B, N, T, kk]
            z, _, _, j0 = block(n)
            j = jnp.broadcast_to((j0 + jnp.arange(blk)).astype(jnp.int32), z.shape)
            cand_z = jnp.concatenate([top_z, z], axis=-1)
            cand_j = jnp.concatenate([top_j, j], axis=-1)
            vals, pos = jax.lax.top_k(cand_z, kk)  # ties: the lower position, i.e. lower index
            return (vals, jnp.take_along_axis(cand_j, pos, axis=-1)), None

        init = (jnp.full((B, N, T, kk), _NEG, ct), jnp.zeros((B, N, T, kk), jnp.int32))
        # a running entry still at _NEG is no key: "visible" is decided by the logit alone, and
        # a visible logit is never that low (the reference's convention too)
        (top_z, top_j), _ = jax.lax.scan(step, init, jnp.arange(n_blocks))
        keep = top_z > 0.5 * _NEG
        mx = jnp.max(top_z, axis=-1, keepdims=True)
        e = jnp.where(keep, jnp.exp(top_z - mx), 0.0)
        tot = jnp.sum(e, axis=-1, keepdims=True)
        seen = tot[..., 0] > 0
        p = e / jnp.where(tot > 0, tot, 1.0)
        lse = jnp.where(seen, mx[..., 0] + jnp.log(jnp.where(seen, tot[..., 0], 1.0)), 0.0)
        vg = value.astype(ct).transpose(0, 2, 1, 3)  # [B, K, S', Hv]
        idx = top_j.reshape(B, K, G * T * kk)
        gathered = jnp.take_along_axis(vg, idx[..., None], axis=2)  # [B, K, G*T*kk, Hv]
        gathered = gathered.reshape(B, N, T, kk, Hv)
        out = jnp.einsum("BNTk,BNTkH->BNTH", p, gathered, precision=jax.lax.Precision.HIGHEST)
        safe = jnp.where(p > 0, p, 1.0)
        entropy = 0.0 - jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=-1)
        max_weight = jnp.max(p, axis=-1)
    if offset is not None and exact is None:
        lse = lse + jnp.where(seen, offset, 0.0)
    out = out.transpose(0, 2, 1, 3).astype(query.dtype)  # [B, T, N, Hv]
    if return_stats:
        return out, AttentionStats(logsumexp=lse, entropy=entropy, max_weight=max_weight)
    return out
