"""Fused Pallas (Mosaic GPU) attention kernels behind :func:`jaxattn.attention`.

This package does not import :mod:`jaxattn`: it reads the variant spec object it is given
(``logit_scale``, ``key_bias``, ``query_scale``, ``needs_stats``, ``normalizer``).
"""

__all__ = ["attention"]


def attention(query, key, value, *, variant, scale, return_stats=False, **options):
    """Fused attention for batched, validated inputs (see :func:`jaxattn.attention`).

    Raises:
      NotImplementedError: always, for now: the fused kernels are not written yet, so callers
        fall back to the XLA reference.
    """
    del query, key, value, variant, scale, return_stats, options
    raise NotImplementedError(
        "pallas_kernels.attention: the fused Pallas GPU kernels are not implemented yet; "
        "use implementation='xla' (or None, which falls back to it)")
