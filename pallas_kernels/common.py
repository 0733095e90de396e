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
  when ``i < q_lengths[b]``, ``pos < kv_lengths[b]``, ``pos <= i + o`` (causal),
  ``i + o - left <= pos <= i + o + right`` (window), ``q_segment_ids[b, i] == kv_segment_ids[b, pos]``,
  with ``o = offset`` (0 but for a block of keys elsewhere in the sequence: :func:`fold_offset`
  turns it into the causal / window flags the kernels run).
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
import typing

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["MaskSpec", "visible", "fold_offset", "flash_reference", "soft_cap", "soft_cap_base2",
           "split_bias", "bias_ones", "narrow_transforms", "segment_ranks", "tile_index", "interpret_context",
           "MMA_BIAS_WIDTH", "MMA_BIAS_TERMS", "BaseEntropy", "visibility_codes", "codes_visible",
           "INVALID_QUERY", "INVALID_KEY", "REGISTER_KEY", "TileMask", "exp2_fma", "exp2_split",
           "EXP2_FMA_MIN", "tile_logits"]

NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Structured visibility: static flags plus small index arrays (no ``T x S`` mask).

    Attributes:
      q_lengths: int32 ``[B]``: queries ``i >= q_lengths[b]`` see nothing.
      kv_lengths: int32 ``[B]``: sequence keys ``pos >= kv_lengths[b]`` are hidden.
      q_segment_ids, kv_segment_ids: int ``[B, T]``, ``[B, S - num_registers]``: a query sees the
        sequence keys of its own segment only.
      is_causal: query ``i`` sees sequence keys ``pos <= i + offset``.
      local_window_size: ``(left, right)``: query ``i`` sees ``i + offset - left <= pos <=
        i + offset + right``.
      num_registers: the first ``R`` keys are registers, visible to every valid query (no causal,
        window, length or segment rule applies to them); ``pos = k_idx - R``.
      offset: query ``i`` sits at position ``i + offset`` in the key block's coordinates (the key
        block starts ``offset`` positions before the query block), for attention over one block of
        keys elsewhere in the sequence (ring attention: a query chunk against another chunk's
        keys). It moves the causal and window bounds only: lengths and segment ids stay indexes of
        this block's own queries and keys (the caller localizes them). :func:`visible` (hence the
        oracle and ``count_visible``) honours it; the kernels do not: :func:`fold_offset` turns
        it into an offset-free spec they run (``pallas_kernels.flash_attention`` and
        ``flash_entropy`` apply it), and ``flash_forward`` / ``flash_stats`` raise on an offset.
    """

    q_lengths: jax.Array | None = None  # int32 [B]
    kv_lengths: jax.Array | None = None  # int32 [B]
    q_segment_ids: jax.Array | None = None  # int32 [B, T]
    kv_segment_ids: jax.Array | None = None  # int32 [B, S - num_registers]
    is_causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    local_window_size: tuple[int, int] | None = dataclasses.field(
        default=None, metadata=dict(static=True))
    num_registers: int = dataclasses.field(default=0, metadata=dict(static=True))
    offset: int = dataclasses.field(default=0, metadata=dict(static=True))


class BaseEntropy(typing.NamedTuple):
    """The base softmax's statistics when the per-query scale is a function of its entropy.

    For ``c_i = f(H_i)``, ``H_i`` the entropy of ``softmax_j(u_ij)`` over the base logits
    ``u_ij = a q_i . k_j`` (adaptive temperature's ``beta(H)``), the gradient through ``f`` adds
    to the logits' gradient

    .. math::

      \\frac{\\partial L}{\\partial u_{ij}} \\mathrel{+}= -g_i \\, p^0_{ij}
      (u_{ij} - \\text{lse}^0_i + H_i), \\quad g_i = f'(H_i) \\, dc_i + \\bar g_i,

    ``p0 = exp(u - lse0)`` and ``dc_i = sum_j dZ_ij u_ij`` the query scale's own gradient. The
    backward kernels take these rows (float32 ``[B, N, T]``) and fuse the term.

    Attributes:
      lse: ``lse0_i``, the base logsumexp (natural log; 0 on rows with no visible key).
      entropy: ``H_i`` (nats).
      scale_grad: ``f'(H_i)``.
      cotangent: ``g_bar_i``, what else reaches ``H_i`` (e.g. ``f'(H_i)`` times a part of ``c``'s
        cotangent formed outside the kernels), or None for 0.
    """

    lse: jax.Array
    entropy: jax.Array
    scale_grad: jax.Array
    cotangent: jax.Array | None = None


def has_codes(mask: MaskSpec) -> bool:
    """Whether ``mask`` has lengths or segment ids (per-row / per-key index arrays)."""
    return any(x is not None for x in (mask.q_lengths, mask.kv_lengths, mask.q_segment_ids))


def is_masked(mask: MaskSpec) -> bool:
    """Whether ``mask`` hides keys at all (causal, window, lengths, segments; registers alone do
    not): the ``masked`` the kernels' default tiles depend on."""
    return mask.is_causal or mask.local_window_size is not None or has_codes(mask)


def band(qpos, pos, causal: bool, window):
    """The causal / window part of the visibility rule: sequence key position ``pos`` is inside
    the band of a query at position ``qpos`` (``pos <= qpos``; ``qpos - left <= pos <= qpos +
    right``), or None when there is neither bound. The one form of the rule that
    :func:`visible` and both kernels' tiles evaluate (broadcasting int arrays)."""
    ok = None
    if causal:
        ok = pos <= qpos
    if window is not None:
        left, right = window
        inside = (pos >= qpos - left) & (pos <= qpos + right)
        ok = inside if ok is None else ok & inside
    return ok


def visible(spec: MaskSpec, b_idx, q_idx, k_idx):
    """Bool visibility of keys ``k_idx`` (incl. registers) from queries ``q_idx`` in batch ``b_idx``.

    Index arrays broadcast against each other (e.g. ``q_idx[:, None]``, ``k_idx[None, :]``);
    usable inside kernels on tiles and in XLA. Causal and window bounds are taken at the query's
    position ``q_idx + spec.offset`` among the keys (:class:`MaskSpec`).
    """
    R = spec.num_registers
    pos = k_idx - R
    ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(k_idx)), bool)
    seq = pos >= 0
    qpos = q_idx + spec.offset if spec.offset else q_idx  # the query's position among the keys
    in_band = band(qpos, pos, spec.is_causal, spec.local_window_size)
    if in_band is not None:
        ok = ok & in_band
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


def fold_offset(spec: MaskSpec, batch: int, q_len: int, kv_len: int) -> tuple[MaskSpec, bool]:
    """``spec`` without its ``offset``: ``(folded, no_keys)``, ``folded`` an offset-free spec the
    kernels run, with the visibility of ``spec`` over ``q_len`` queries and ``kv_len`` keys
    (registers included; ``batch`` sizes the arrays it may make), exactly, and ``no_keys``: no
    query sees any sequence key, whatever the lengths and segments (registers aside).

    With ``o = spec.offset`` query ``i`` sees the sequence keys ``i + L <= pos <= i + U``, with
    ``U = o`` (causal), ``o + right`` (window; the smaller of the two with both), ``L = o - left``
    (window); no bound where the rule is absent. A bound that every query of the block meets
    anyway is dropped (``U >= S' - 1`` or ``L <= 1 - T``, ``S'`` the sequence keys). The kernels
    know causal (``pos <= i``) and windows ``(left, right)`` of sides ``>= 0`` (their tile ranges
    come from ``i - left`` and ``i + right``), so, with ``F = q_len + kv_len`` (a side no query
    reaches):

    * ``offset == 0``: ``spec`` itself (bit-identical to an offset-free spec);
    * nothing visible (``U <= -T``, ``L >= S'``, ``L > U``, or no queries or keys): ``no_keys``,
      and ``folded`` hides every sequence key (``kv_lengths = 0``) and keeps the registers and
      ``q_lengths``; without registers every row is empty and the kernels need not run;
    * no bound left: neither causal nor a window (every key visible);
    * ``U == 0``, no ``L``: causal;
    * ``U == 0``, ``L <= 0``: causal with window ``(-L, 0)``;
    * ``U > 0`` or no ``U``, ``L <= 0`` or no ``L``: window ``(-L or F, U or F)``, not causal;
    * ``U < 0`` or ``L > 0`` (the block's first queries, or its last ones, see no key; e.g. causal
      with ``-T < offset < 0``): ``NotImplementedError`` -- a window side below 0 is outside
      what the kernels' tile ranges handle (registers would be skipped).

    Lengths, segment ids and registers pass through unchanged (but for ``no_keys``).

    Raises:
      NotImplementedError: ``U < 0`` or ``L > 0`` with some key visible.
    """
    o = spec.offset
    if not o:
        return spec, False
    R = spec.num_registers
    n_seq = kv_len - R
    upper = lower = None
    if spec.is_causal:
        upper = o
    if spec.local_window_size is not None:
        left, right = spec.local_window_size
        upper = o + right if upper is None else min(upper, o + right)
        lower = o - left
    if (n_seq <= 0 or q_len <= 0 or (upper is not None and upper <= -q_len)
            or (lower is not None and lower >= n_seq)
            or (upper is not None and lower is not None and lower > upper)):
        return MaskSpec(q_lengths=spec.q_lengths, kv_lengths=jnp.zeros((batch,), jnp.int32),
                        num_registers=R), True
    if upper is not None and upper >= n_seq - 1:
        upper = None
    if lower is not None and lower <= 1 - q_len:
        lower = None
    if (upper is not None and upper < 0) or (lower is not None and lower > 0):
        raise NotImplementedError(
            f"MaskSpec(offset={o}, is_causal={spec.is_causal}, local_window_size="
            f"{spec.local_window_size}) over {q_len} queries and {n_seq} keys: query i sees the "
            f"keys i + {lower} <= pos <= i + {upper} (None: unbounded), a window side below 0; "
            "the kernels take causal masks and windows of sides >= 0 only (use "
            "pallas_kernels.flash_reference or implementation='xla' for this block)")
    base = dataclasses.replace(spec, is_causal=False, local_window_size=None, offset=0)
    if upper is None and lower is None:
        return base, False
    if upper == 0 and lower is None:
        return dataclasses.replace(base, is_causal=True), False
    far = q_len + kv_len
    window = (far if lower is None else -lower, far if upper is None else upper)
    return dataclasses.replace(base, is_causal=upper == 0, local_window_size=window), False


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


def tile_logits(s, factor, *, logit_scale=None, bias=None, soft_cap=None, cap_grad=False):
    """``(u, z2, g)``: the logit form of one tile of ``s = q . k``, the step every kernel shares.

    .. math::

      u_{ij} = \\alpha s_{ij} + \\beta_j, \\qquad
      z2_{ij} = \\mathrm{cap2} \\tanh(r_i u_{ij} / \\mathrm{cap2}), \\qquad
      g_{ij} = \\partial z2_{ij} / \\partial (r_i u_{ij}) = 1 - \\tanh^2(r_i u_{ij} / \\mathrm{cap2})

    with ``alpha = logit_scale`` (None: 1), ``beta = bias()`` (None: 0) and the base-2 row factor
    ``r = factor()``. The forward passes ``s + b / a`` times ``r = a c log2(e)``; the backward
    ``a s + b`` times ``c log2(e)`` (it needs ``u`` for dc), or ``s`` times ``a c log2(e)``
    without a bias strip: the same logits, each kernel's cheapest factoring of them. ``bias`` and
    ``factor`` are thunks of a scalar or a broadcast tile, called where the form uses them (each
    kernel broadcasts its own vectors). ``soft_cap``: ``cap log2(e)``, or None (``z2 = r u``, no
    ``g``); ``cap_grad``: form ``g`` (the backward's chain rule through the cap). A new term of
    the logit form goes here, its derivative beside ``g``.

    >>> import jax.numpy as jnp
    >>> u, z2, g = tile_logits(jnp.ones((2, 2)), lambda: 2.0, logit_scale=0.5,
    ...                        bias=lambda: jnp.array([[0.0, 1.0]]))
    >>> z2.tolist()
    [[1.0, 3.0], [1.0, 3.0]]
    """
    u = s if logit_scale is None else s * logit_scale
    if bias is not None:
        u = u + bias()
    z2 = u * factor()
    g = None
    if soft_cap is not None:
        z2, t = soft_cap_base2(z2, soft_cap)
        if cap_grad:
            g = 1.0 - t * t
    return u, z2, g


# 2^f on [-1/2, 1/2] as a degree-5 polynomial (relative minimax): 1.23e-7 relative in exact
# arithmetic, 1.8e-7 measured with Horner's rule in float32 (bound 2.44e-7, tests/test_exp2_fma.py),
# about the 2^-22.5 of the exponent unit's ex2.approx.ftz.f32 that it stands in for.
EXP2_FMA_COEFFS = (1.0000001192092896, 0.6931469440460205, 0.24021968245506287,
                   0.05550702288746834, 0.00968217570334673, 0.0013296374818310142)
# The smallest exponent exp2_fma takes: 2^-126 is float32's least normal number; below it the
# exponent field of the result would wrap.
EXP2_FMA_MIN = -126.0
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: x + it holds round(x) in its low mantissa bits


def exp2_fma(x):
    """``2^x`` for ``EXP2_FMA_MIN <= x < 2^22`` on the FMA pipe, not the exponent unit.

    Moving part of a tile's exponentials onto the FMA pipe (as FlashAttention-4 does on
    Blackwell) helps a kernel bound by the SM's exponent unit (16 ``ex2`` a clock against 128
    FMAs) with issue slots to spare; on the H100 every kernel of ours measured slower with it
    (docs/kernels.md). Cody-Waite reduction without a
    rounding instruction: ``t = x + 1.5 * 2^23`` rounds ``x`` to ``n`` in ``t``'s low bits, ``f =
    x - n`` lies in ``[-1/2, 1/2]``, ``2^f`` is :data:`EXP2_FMA_COEFFS` by Horner's rule, and
    ``n`` is added to its exponent field as ``bits(t) << 23`` (the shift keeps only ``n``'s low
    bits). Eleven float32 / int32 ops, no branch; relative error 1.8e-7.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([-3.0, -0.25, 0.0, 5.5], jnp.float32)
    >>> bool(jnp.allclose(exp2_fma(x), jnp.exp2(x), rtol=4e-7))
    True
    """
    if x.dtype != jnp.float32:  # the bit manipulation is float32's
        raise TypeError(f"exp2_fma takes float32 x, got {x.dtype}")
    # the barrier keeps XLA (the CPU interpreter) from folding (x + C) - C to x; on the GPU it is
    # an empty asm statement
    t = lax.optimization_barrier(x + _ROUND_MAGIC)
    f = x - (t - _ROUND_MAGIC)
    p = EXP2_FMA_COEFFS[-1]
    for c in EXP2_FMA_COEFFS[-2::-1]:
        p = p * f + c
    bits = (lax.bitcast_convert_type(p, jnp.int32)
            + lax.shift_left(lax.bitcast_convert_type(t, jnp.int32), jnp.int32(23)))
    return lax.bitcast_convert_type(bits, jnp.float32)


def check_exp2_fma_cols(name, cols, widest, widest_name):
    """Raises ValueError unless ``cols`` (the config field ``name``) is an int multiple of 8 (one
    column tile of the wgmma layout) in ``[0, widest]``, ``widest`` the narrowest tile it splits
    (``widest_name`` says which): :func:`exp2_split`'s column count."""
    if not isinstance(cols, int) or isinstance(cols, bool) or not 0 <= cols <= widest or cols % 8:
        raise ValueError(f"{name} must be a multiple of 8 in [0, {widest_name} = {widest}], "
                         f"got {cols!r}")


def exp2_split(d, fma_cols):
    """``(2^d, d')`` of a ``[rows, cols]`` tile of base-2 logits ``d <= 0``, the first ``fma_cols``
    columns' exponentials from :func:`exp2_fma` and the others from ``jnp.exp2``.

    ``d'`` is ``d`` with those columns clamped at :data:`EXP2_FMA_MIN` (masked logits are -1e30,
    whose exponent field would wrap): the weights are ``2^d'``, so a caller summing ``2^d d`` (the
    entropy) sums it of ``d'``, the logits the weights are of (a hidden key there adds ``2^-126``
    to the normaliser and ``-126 * 2^-126`` to the sum, both far below float32's resolution of
    a visible row's). Column slices of the wgmma layout are free (its registers are selected, not
    moved); ``fma_cols`` is a multiple of 8 (one column tile), 0 for none.
    """
    if not fma_cols:
        return jnp.exp2(d), d
    head = jnp.maximum(d[:, :fma_cols], EXP2_FMA_MIN)
    if fma_cols == d.shape[1]:
        return exp2_fma(head), head
    tail = d[:, fma_cols:]
    return (jnp.concatenate([exp2_fma(head), jnp.exp2(tail)], axis=1),
            jnp.concatenate([head, tail], axis=1))


def soft_cap(z, cap):
    """``cap tanh(z / cap)`` of natural-log logits, as the kernels form it (see
    :func:`soft_cap_base2`)."""
    return soft_cap_base2(z * LOG2E, cap * LOG2E)[0] / LOG2E


def flash_reference(q, k, v, *, logit_scale: float, query_scale=None, key_bias=None,
                    mask: MaskSpec = MaskSpec(), logits_soft_cap: float | None = None,
                    return_stats: bool = False, hardmax: bool = False):
    """Pure-jnp oracle of the kernel-level problem: returns ``(out [B,T,N,Hv], lse [B,N,T])``.

    Differentiable in ``q, k, v, query_scale, key_bias``; use ``jax.vjp`` of it to check the
    backward kernels. With ``logits_soft_cap`` the softmax sees ``cap tanh(z / cap)`` (``jnp.tanh``
    here: the oracle of the kernels' form). With ``return_stats`` it also returns each row's
    entropy and max weight (float32 ``[B, N, T]``, 0 on rows with no visible key), as
    ``flash_attention(..., return_stats=True)`` does. With ``hardmax`` the weights are uniform over
    each row's maximal logits (ties: equal float32 logits), as ``flash_hardmax``'s.
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
    if hardmax:
        e = jnp.where(vis & (zm == m), 1.0, 0.0)
    tot = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(tot > 0, tot, 1.0)
    lse = jnp.where(tot > 0, m + jnp.log(jnp.where(tot > 0, tot, 1.0)), 0.0)[..., 0]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p.reshape(B, K, G, T, S), v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST).reshape(B, T, N, -1)
    if not return_stats:
        return out.astype(q.dtype), lse
    nonempty = tot[..., 0] > 0
    # H = lse - sum_j p_j z_j over the visible keys
    ent = jnp.where(nonempty, lse - jnp.sum(jnp.where(vis, p * zm, 0.0), axis=-1), 0.0)
    return out.astype(q.dtype), lse, ent, jnp.max(p, axis=-1)


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


# The visibility codes both kernels stream for lengths and segment ids, one per query row and one
# per key: a code >= 0 is the segment's dense rank (segment_ranks; 0 without segment ids), and
# three negative markers that no rank can equal. All are exact in int32 and in float32 (the
# forward stacks its codes with float32 row / key vectors; ranks below 2**24).
INVALID_QUERY = -1  # a query row past its length, or padding: sees nothing
INVALID_KEY = -2  # a key past its length, or padding: seen by nobody
REGISTER_KEY = -3  # a register key: seen by every valid query
MAX_EXACT_RANK = 2**24  # float32 holds every integer below it


def visibility_codes(mask: MaskSpec, B: int, T: int, S: int, Tp: int, Sp: int, dtype=jnp.int32,
                     ranked: bool = False):
    """``(query codes [B, Tp], key codes [B, Sp])`` of ``mask``'s lengths and segment ids.

    ``S`` counts the registers (the first ``mask.num_registers`` keys); ``Tp >= T`` and ``Sp >= S``
    are the kernels' padded lengths. The segment ids are ranked here (:func:`segment_ranks`):
    raw ids could equal a marker, or wrap when int64 ids are cast; ``ranked``: they already are
    such ranks (int32, in ``[0, T + S)``).

    Raises:
      NotImplementedError: float32 codes with segment ids over ``T + S >= 2**24`` tokens (their
        ranks would not all be exact).
    """
    R = mask.num_registers
    q_rank = k_rank = None
    if mask.q_segment_ids is not None:
        if jnp.dtype(dtype) == jnp.float32 and T + S >= MAX_EXACT_RANK:
            raise NotImplementedError(f"segment ids over T + S = {T + S} >= 2**24 tokens: their "
                                      "ranks are not exact as the forward kernel's float32 codes")
        q_rank, k_rank = mask.q_segment_ids, mask.kv_segment_ids
        if not ranked:
            q_rank, k_rank = segment_ranks(q_rank, k_rank)
    i = jnp.arange(Tp, dtype=jnp.int32)[None, :]
    qcode = jnp.zeros((B, Tp), jnp.int32) if q_rank is None else jnp.pad(q_rank, ((0, 0), (0, Tp - T)))
    valid_q = i < T
    if mask.q_lengths is not None:
        valid_q = valid_q & (i < mask.q_lengths.astype(jnp.int32)[:, None])
    qcode = jnp.where(valid_q, qcode, INVALID_QUERY)
    pos = jnp.arange(Sp - R, dtype=jnp.int32)[None, :]
    kcode = (jnp.zeros((B, Sp - R), jnp.int32) if k_rank is None
             else jnp.pad(k_rank, ((0, 0), (0, Sp - S))))
    valid_k = pos < S - R
    if mask.kv_lengths is not None:
        valid_k = valid_k & (pos < mask.kv_lengths.astype(jnp.int32)[:, None])
    kcode = jnp.where(valid_k, kcode, INVALID_KEY)
    kcode = jnp.concatenate([jnp.full((B, R), REGISTER_KEY, jnp.int32), kcode], axis=1)
    return qcode.astype(dtype), kcode.astype(dtype)


def codes_visible(qcode, kcode):
    """The codes' part of the visibility rule (broadcast tiles): a key of the query's segment, or
    a register seen by a valid query. ``qcode`` None: every query row is valid and in one segment
    (only key lengths), so a key is visible unless it is invalid."""
    if qcode is None:
        return (kcode >= 0) | (kcode == REGISTER_KEY)
    return (kcode == qcode) | ((kcode == REGISTER_KEY) & (qcode >= 0))


def _conj(a, b):
    return b if a is None else a & b


@dataclasses.dataclass(frozen=True)
class TileMask:
    """The visibility rule on a kernel's tiles, and the key / query tile ranges it implies.

    The kernels' one form of :func:`visible` for an offset-free :class:`MaskSpec`: keys are
    indexed with the registers first (index ``j < num_registers`` is a register, seen by every
    valid query; else sequence position ``j - num_registers``), queries by position; causal and
    window bounds from :func:`band`; lengths and segments from the per-row / per-key codes of
    :func:`visibility_codes`, which the kernel loads beside its tiles.

    Attributes:
      num_registers: register keys at the front of the keys.
      causal, window: the band (``MaskSpec.is_causal`` / ``local_window_size``).
      keys: keys with the registers (``S``); tiles past it are padding.
      hide_padded_keys: whether the tiles reach past ``keys`` (the kernel padded them to its
        tile multiple), so that the rule must hide the padding.
      queries: the query rows to keep (``T``) where the kernel must hide padded rows (the
        backward's dk / dv sum over them), or None where their results are dropped.
      has_codes: lengths or segments: every tile is masked (no tile is known full).
    """

    num_registers: int
    causal: bool
    window: tuple[int, int] | None
    keys: int
    hide_padded_keys: bool
    queries: int | None = None
    has_codes: bool = False

    @property
    def masks_tiles(self):
        """Whether any tile can hold a hidden (query, key) pair."""
        return (self.causal or self.window is not None or self.hide_padded_keys
                or self.queries is not None or self.has_codes)

    def visible(self, qi, kj, qcode=None, kcode=None):
        """Bool tile: key index ``kj`` visible from query ``qi`` (int32 tiles that broadcast,
        ``qcode`` / ``kcode`` the codes' tiles); None when every pair is visible."""
        R = self.num_registers
        ok = band(qi, kj - R, self.causal, self.window)
        if ok is not None and R:
            ok = ok | (kj < R)
        if self.hide_padded_keys:
            ok = _conj(ok, kj < self.keys)
        if self.queries is not None:
            ok = _conj(ok, qi < self.queries)
        if self.has_codes:
            ok = _conj(ok, codes_visible(qcode, kcode))
        return ok

    def key_tiles(self, q_start, rows, block_kv):
        """Key tiles ``(lo, full_lo, full_hi, hi)`` for queries ``[q_start, q_start + rows)``
        (traced int32 scalars): tiles outside ``[lo, hi)`` are hidden from every row, tiles in
        ``[full_lo, full_hi)`` visible to every row (no mask needed). Conservative: a tile
        outside the full range may still be full."""
        R, S = self.num_registers, self.keys
        last = q_start + (rows - 1)
        hi_j = fh_j = jnp.int32(S)
        lo_j = fl_j = jnp.int32(0)
        if self.causal:
            hi_j = jnp.minimum(hi_j, R + last + 1)
            fh_j = jnp.minimum(fh_j, R + q_start + 1)
        if self.window is not None:
            left, right = self.window
            hi_j = jnp.minimum(hi_j, R + last + right + 1)
            fh_j = jnp.minimum(fh_j, R + q_start + right + 1)
            fl_j = R + jnp.maximum(last - left, 0)
            if R == 0:
                lo_j = jnp.maximum(q_start - left, 0)
        lo = lax.div(lo_j, jnp.int32(block_kv))
        hi = jnp.maximum(_cdiv(hi_j, block_kv), lo)
        if self.has_codes or self.queries is not None:  # no tile is known full
            return lo, hi, hi, hi
        full_lo = jnp.clip(_cdiv(fl_j, block_kv), lo, hi)
        full_hi = jnp.clip(lax.div(fh_j, jnp.int32(block_kv)), full_lo, hi)
        return lo, full_lo, full_hi, hi

    def query_tiles(self, k_start, cols, block_q, num_tiles):
        """Query tiles ``(lo, count)`` of ``num_tiles`` that may see keys ``[k_start, k_start +
        cols)`` (traced int32 scalars)."""
        R = self.num_registers
        n_queries = num_tiles * block_q
        lo_q = jnp.int32(0)
        hi_q = jnp.int32(n_queries)
        p_start, p_last = k_start - R, k_start + (cols - 1) - R
        if self.causal:
            lo_q = jnp.maximum(lo_q, p_start)
        if self.window is not None:
            left, right = self.window
            lo_q = jnp.maximum(lo_q, p_start - right)
            hi_q = jnp.minimum(hi_q, p_last + left + 1)
        if R:
            has_register = k_start < R
            lo_q = jnp.where(has_register, 0, lo_q)
            hi_q = jnp.where(has_register, n_queries, hi_q)
        lo_q = jnp.clip(lo_q, 0, n_queries)
        lo = lax.div(lo_q, jnp.int32(block_q))
        hi = jnp.minimum(lax.div(jnp.maximum(hi_q, 0) + block_q - 1, jnp.int32(block_q)), num_tiles)
        return lo, jnp.maximum(hi - lo, 0)

    def tile_is_full(self, q0, bq, k0, bkv):
        """Scalar bool: every query of ``[q0, q0 + bq)`` sees every key of ``[k0, k0 + bkv)``.
        Conservative (False may still be a full tile); the band and the padding only, not the
        codes."""
        full = jnp.bool_(True)
        first, last = k0 - self.num_registers, k0 + (bkv - 1 - self.num_registers)  # positions
        if self.causal:
            full = full & (last <= q0)
        if self.window is not None:
            left, right = self.window
            full = full & (first >= q0 + (bq - 1 - left)) & (last <= q0 + right)
        if self.hide_padded_keys:
            full = full & (k0 + bkv <= self.keys)
        if self.queries is not None:
            full = full & (q0 + bq <= self.queries)
        return full


def _cdiv(x, d):
    return lax.div(x + (d - 1), jnp.int32(d))


def tile_index(reverse: bool, axis: str, num_tiles: int):
    """This CTA's tile along grid axis ``axis``; ``reverse``: the last tile first. Mosaic GPU maps
    the grid ``(heads, q_seq, batch)`` to CUDA's ``(z, y, x)``: CTAs launch head by head, query
    tiles in order, so reversed, a causal kernel starts each head's longest tiles first."""
    i = lax.axis_index(axis)
    return (num_tiles - 1) - i if reverse else i


def padded_head_dim(d: int, sizes: tuple[int, ...], kernel: str) -> int:
    """The head dim a kernel runs ``d`` at: the smallest of its compiled ``sizes`` that holds it
    (the operands are zero-padded, which changes no logit and no output column).

    One rule, two size sets: the forward compiles 64, 128, 192 and 256, the backward 64, 128 and
    256 (no 192 is tuned or checked there), so a head dim of 160 runs the forward at 192 and the
    backward at 256.

    Raises:
      NotImplementedError: ``d`` above the largest size (the dispatcher falls back).
    """
    for size in sizes:
        if d <= size:
            return size
    raise NotImplementedError(f"head dims above {sizes[-1]} are not supported by the {kernel} "
                              f"kernel, got {d}")


def check_soft_cap(cap):
    """``float(cap)`` for a python real ``cap > 0`` (None stays None); else ValueError."""
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf:
        raise ValueError(f"logits_soft_cap must be a python float > 0 or None, got {cap!r}")
    return float(cap)


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
