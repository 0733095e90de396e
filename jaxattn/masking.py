"""Dense visibility masks for the reference, from the one mask description the kernels read.

A query ``i`` of batch ``b`` sees key ``j`` when every condition of the plan's
:class:`pallas_kernels.MaskSpec` holds and the dense ``mask`` (if any) allows it:

* causal: ``j <= i`` (top-left aligned, as ``jax.nn.dot_product_attention``);
* local window ``(left, right)``: ``i - left <= j <= i + right``;
* lengths: ``i < q_lengths[b]`` and ``j < kv_lengths[b]``;
* segments: ``q_segment_ids[b, i] == kv_segment_ids[b, j]``;
* ``mask[b, n, i, j]`` (True = attend; the reference alone takes a dense mask).

Registers (sinks) are visible to every valid query (``i < q_lengths[b]``). The rule is written
once, in :func:`pallas_kernels.common.visible`, which the kernels evaluate tile by tile on indices
and this module evaluates on the whole ``T x S`` grid.
"""

import jax.numpy as jnp

from pallas_kernels.common import MaskSpec, visible

__all__ = ["visibility_mask"]


def visibility_mask(spec: MaskSpec, *, batch: int, q_len: int, kv_len: int, dense=None):
    """Bool ``[B, N or 1, T, R + S]``: True where query ``i`` may attend key ``j``.

    Args:
      spec: the structured visibility; its ``num_registers`` registers are the first columns.
      batch: ``B``.
      q_len: ``T``.
      kv_len: ``S``, the sequence keys (registers not included).
      dense: optional bool ``[B, N or 1, T, S]`` over the sequence keys (True = attend).

    Examples:
      >>> from pallas_kernels import MaskSpec
      >>> visibility_mask(MaskSpec(is_causal=True), batch=1, q_len=3, kv_len=3)[0, 0].astype("int32")
      Array([[1, 0, 0],
             [1, 1, 0],
             [1, 1, 1]], dtype=int32)
    """
    R = spec.num_registers
    b = jnp.arange(batch)[:, None, None]
    i = jnp.arange(q_len)[None, :, None]
    j = jnp.arange(R + kv_len)[None, None, :]
    vis = jnp.broadcast_to(visible(spec, b, i, j), (batch, q_len, R + kv_len))[:, None]
    if dense is not None:
        dense = jnp.pad(dense, [(0, 0)] * (dense.ndim - 1) + [(R, 0)], constant_values=True)
        vis = vis & dense
    return vis
