"""Fused Pallas (Mosaic GPU) attention kernels behind :func:`jaxattn.attention`.

This package does not import :mod:`jaxattn`: it reads the variant spec object it is given
(``logit_scale``, ``key_bias``, ``query_scale``, ``needs_stats``, ``normalizer``,
``query_offset``).
"""

from typing import NamedTuple

import jax

from pallas_kernels import attention as _attention_module

__all__ = ["attention", "KernelStats"]


class KernelStats(NamedTuple):
    """Per-query statistics of the fused kernel, each float32 ``[B, N, T]``.

    Same fields and semantics as ``jaxattn.reference.AttentionStats``: ``logsumexp`` of the
    variant's logits over the visible keys, ``entropy`` (nats) and ``max_weight`` of the final
    weights; all zero for a query with no visible key.
    """

    logsumexp: jax.Array
    entropy: jax.Array
    max_weight: jax.Array


def attention(query, key, value, *, variant, scale, return_stats=False, **options):
    """Fused attention for batched, validated inputs (see :func:`jaxattn.attention`).

    Args:
      query, key, value: batched ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``.
      variant: the variant spec.
      scale: the logit scale.
      return_stats: also return :class:`KernelStats`.
      **options: ``bias, mask, is_causal, query_seq_lengths, key_value_seq_lengths,
        q_segment_ids, kv_segment_ids, local_window_size, registers`` as produced by
        ``jaxattn.api._prepare``.

    Returns:
      ``out``, or ``(out, KernelStats)`` with ``return_stats``.

    Raises:
      NotImplementedError: what the kernels do not run (hardmax / top-k, dense bias or mask
        arrays, float32 inputs, head dims above 256); the caller falls back to XLA.
    """
    result = _attention_module.attention(query, key, value, variant=variant, scale=scale,
                                         return_stats=return_stats, **options)
    if return_stats:
        out, stats = result
        return out, KernelStats(*stats)
    return result
