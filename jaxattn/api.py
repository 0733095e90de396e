"""The public functional API: build the plan (:mod:`jaxattn.plan`), dispatch, fall back on XLA."""

import jax
import jax.numpy as jnp

from jaxattn import chunked, fused
from jaxattn.plan import make_plan
from jaxattn.reference import AttentionStats, attention_reference, attention_weights_reference

__all__ = ["attention", "attention_weights", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = (None, "xla", "xla_chunked", "pallas")


def _unbatch(x, batched):
    if batched:
        return x
    return jax.tree.map(lambda a: a[0], x)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _fused(q, k, v, plan, *, return_stats):
    result = fused.attention(q, k, v, plan, return_stats=return_stats)
    return (result[0], AttentionStats(*result[1])) if return_stats else result


_BACKENDS = {"pallas": _fused, "xla_chunked": chunked.attention, "xla": attention_reference}


def _backends(implementation):
    """The backends to try in order: the named one, or for None the fused kernels (on a GPU), the
    chunked sweep and the reference (which runs every call)."""
    if implementation is not None:
        return (implementation,)
    return (("pallas",) if _on_gpu() else ()) + ("xla_chunked", "xla")


def attention(query, key, value, *, variant="softmax", bias=None, mask=None, scale=None,
              is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
              q_segment_ids=None, kv_segment_ids=None, local_window_size=None, registers=None,
              logits_soft_cap=None, sink_logits=None, implementation=None, return_stats=False):
    """Attention with any variant of :mod:`jaxattn.variants`, in ``jax.nn.dot_product_attention``'s layout.

    .. math::

      z_{ij} = c_i (a \\, q_i \\cdot k_j + b_j + \\text{bias}_{ij}), \\quad
      o_i = \\sum_j \\text{normalise}(z_{i\\cdot})_j \\, v_j

    with ``a``, ``b``, ``c`` and the normaliser given by the variant (see
    :mod:`jaxattn.variants`) and ``z`` restricted to the keys query ``i`` may attend; with
    ``logits_soft_cap`` the normaliser sees ``cap tanh(z / cap)``, and ``sink_logits`` add
    ``e^{s_h}`` to each softmax normaliser.

    Args:
      query: ``[B, T, N, H]`` or unbatched ``[T, N, H]``.
      key: ``[B, S, K, H]`` with ``N % K == 0`` (grouped-query attention).
      value: ``[B, S, K, Hv]``.
      variant: a name from :data:`jaxattn.variants.VARIANT_NAMES` or a
        :class:`jaxattn.variants.Variant` (e.g. ``TopK(4)``).
      bias: additive float bias broadcastable to ``[B, N, T, S]``. A ``-inf`` entry hides its key
        exactly as a False ``mask`` entry does (so a row biased ``-inf`` on every key gives zeros).
      mask: bool mask broadcastable to ``[B, N, T, S]``; True = attend.
      scale: the logit scale, finite and ``> 0``; defaults to ``1/sqrt(H)`` (RBF uses it as
        ``gamma`` unless the variant sets one). A traced scale is not checked.
      is_causal: a static Python bool (under ``jax.jit``, a static argument); query ``i`` attends
        keys ``j <= i``.
      query_seq_lengths: int ``[B]`` in ``[0, T]``; query rows at or past the length output zeros.
      key_value_seq_lengths: int ``[B]`` in ``[0, S]``; keys at or past the length are hidden.
        Concrete lengths outside the range raise ValueError; traced ones cannot be checked and
        act as clipped to it (a length above the axis keeps all of it, a negative one none).
      q_segment_ids: int ``[B, T]``; with ``kv_segment_ids`` (int ``[B, S]``) a query attends a
        key only in the same segment.
      local_window_size: ``(left, right)`` or an int for both, static ints ``>= 0``: query ``i``
        attends ``i - left <= j <= i + right``.
      registers: optional ``(key_registers, value_registers)``, each ``[R, K, H]`` (or ``[B, R,
        K, H]``): R learnable keys/values prepended to the sequence and visible to every valid
        query (attention sinks).
      logits_soft_cap: a static float ``cap > 0`` or None: soft-cap the logits,
        ``z -> cap tanh(z / cap)`` (Gemma 2), applied to the logits as the variant defines them
        (RBF's include ``-gamma ||q||^2``) and to the statistics sweep's logits too.
      sink_logits: float ``[N]`` or None: a learnable sink logit per query head that adds
        ``e^{s_h}`` to every row's normaliser and takes no value (gpt-oss; softmax normalisers
        only). The sink is a logit of its own: neither scaled by ``c_i`` nor capped.
      implementation: None (the first of the fused kernels on a GPU, ``"xla_chunked"`` and the
        reference that runs the call), ``"xla"`` (the reference: it forms the ``T x S`` logits),
        ``"xla_chunked"`` (hardmax and top-k in one sweep over key blocks, memory
        ``O(T x block)``: :mod:`jaxattn.chunked`) or ``"pallas"`` (the fused kernels). A named
        backend that cannot run the call raises NotImplementedError.
      return_stats: also return :class:`~jaxattn.reference.AttentionStats` (``[B, N, T]``).

    Returns:
      ``out`` with the shape of query but head dim ``Hv``, in the query dtype; with
      ``return_stats``, ``(out, stats)``. A query with no visible key gives zeros.

    Examples:
      >>> import jax, jaxattn
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 16, 4, 32))
      >>> out, stats = jaxattn.attention(q, k, v, variant="rbf", is_causal=True,
      ...                                return_stats=True)
      >>> out.shape, stats.entropy.shape
      ((2, 16, 4, 32), (2, 4, 16))
    """
    if value is None:
        raise TypeError("value must be an array, got None")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got "
                         f"{implementation!r}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    (q, k, v), plan = make_plan(
        query, key, value, variant=variant, bias=bias, mask=mask, scale=scale,
        is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, local_window_size=local_window_size, registers=registers,
        logits_soft_cap=logits_soft_cap, sink_logits=sink_logits)
    result = None
    for name in _backends(implementation):
        try:
            result = _BACKENDS[name](q, k, v, plan, return_stats=return_stats)
            break
        except NotImplementedError:
            if implementation is not None:
                raise
    return _unbatch(result, plan.batched)


def attention_weights(query, key, *, variant="softmax", bias=None, mask=None, scale=None,
                      is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                      q_segment_ids=None, kv_segment_ids=None, local_window_size=None,
                      registers=None, logits_soft_cap=None, sink_logits=None, return_stats=False):
    """The attention weights ``[B, N, T, R + S]`` (float32) of :func:`attention`'s arguments.

    Registers (if any) are the first ``R`` columns; a sink's weight (``sink_logits``) is not a
    column (each row then sums to ``1 - e^{s_h - lse_i}``). Computed by the reference, so it materialises
    the full matrix: use it for analysis and small problems. With ``return_stats``, returns
    ``(weights, stats)``.

    Examples:
      >>> import jax, jaxattn
      >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 8, 2, 16))
      >>> w = jaxattn.attention_weights(q, k, variant="hardmax")
      >>> w.shape
      (1, 2, 8, 8)
    """
    if registers is not None:
        rk = registers[0]
        registers = (rk, jnp.zeros(rk.shape, rk.dtype))
    (q, k, _), plan = make_plan(
        query, key, None, variant=variant, bias=bias, mask=mask, scale=scale,
        is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, local_window_size=local_window_size, registers=registers,
        logits_soft_cap=logits_soft_cap, sink_logits=sink_logits)
    p, stats, _, _ = attention_weights_reference(q, k, plan)
    result = (p, stats) if return_stats else p
    return _unbatch(result, plan.batched)


__all__ += ["AttentionStats"]
