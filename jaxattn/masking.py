"""Dense visibility masks for the reference: which keys each query may attend.

A query ``i`` of batch ``b`` sees key ``j`` when every given condition holds:

* ``mask[b, n, i, j]`` (True = attend);
* causal: ``j <= i`` (top-left aligned, as ``jax.nn.dot_product_attention``);
* local window ``(left, right)``: ``i - left <= j <= i + right``;
* lengths: ``i < query_seq_lengths[b]`` and ``j < key_value_seq_lengths[b]``;
* segments: ``q_segment_ids[b, i] == kv_segment_ids[b, j]``.

Registers (sinks) are visible to every valid query (``i < query_seq_lengths[b]``).
The kernels build the same predicate from indices, tile by tile.
"""

import jax.numpy as jnp

__all__ = ["visibility_mask", "query_valid"]


def query_valid(batch: int, q_len: int, query_seq_lengths):
    """Bool ``[B, T]``: the query rows inside each sequence's length."""
    rows = jnp.arange(q_len)[None, :]  # [1, T]
    if query_seq_lengths is None:
        return jnp.ones((batch, q_len), bool)
    return rows < query_seq_lengths[:, None]


def visibility_mask(
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    mask=None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    local_window_size=None,
    num_registers: int = 0,
):
    """Bool ``[B, N or 1, T, R + S]``: True where query ``i`` may attend key ``j``.

    The first ``num_registers`` columns are the registers; the others are the sequence keys.
    """
    i = jnp.arange(q_len)[None, None, :, None]  # [1, 1, T, 1]
    j = jnp.arange(kv_len)[None, None, None, :]  # [1, 1, 1, S]
    vis = jnp.ones((batch, 1, q_len, kv_len), bool)  # [B, 1, T, S]
    if mask is not None:
        vis = vis & mask
    if is_causal:
        vis = vis & (j <= i)
    if local_window_size is not None:
        left, right = local_window_size
        vis = vis & (j >= i - left) & (j <= i + right)
    if key_value_seq_lengths is not None:
        vis = vis & (j < key_value_seq_lengths[:, None, None, None])
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
        vis = vis & same[:, None]
    rows = query_valid(batch, q_len, query_seq_lengths)[:, None, :, None]  # [B, 1, T, 1]
    vis = vis & rows
    if num_registers:
        regs = jnp.broadcast_to(rows, (*vis.shape[:3], num_registers))
        vis = jnp.concatenate([regs, vis], axis=-1)
    return vis
