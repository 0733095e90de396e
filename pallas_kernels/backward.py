"""Fused FlashAttention backward on the Mosaic GPU backend (Hopper: TMA, wgmma, warp specialization).

Two deterministic kernels (no atomics) compute the gradients of the kernel-level problem stated in
:mod:`pallas_kernels.common`:

.. math::

  u_{ij} = a \\, q_i \\cdot k_j + b_j, \\quad z_{ij} = c_i u_{ij}, \\quad
  p_{ij} = 2^{z_{ij} \\log_2 e - \\mathrm{lse}_i \\log_2 e}, \\quad
  dZ_{ij} = p_{ij} (dO_i \\cdot v_j - \\delta_i), \\quad \\delta_i = dO_i \\cdot o_i

* the **dq kernel** (grid: query heads x query tiles x batch) pipelines K/V tiles through shared
  memory and accumulates ``dq_i = a c_i sum_j dZ_ij k_j`` and ``dc_i = sum_j dZ_ij u_ij`` (computed as
  ``sum_j dZ u - (sum_j p u)(sum_j dZ)``, exact also when delta comes from a bf16 output; with
  ``BackwardBlockSizes.dc_mma`` the two dZ sums come from the tensor cores);
* the **dkv kernel** (grid: kv heads x kv tiles x batch) pipelines Q/dO tiles of every query head of
  the GQA group (an inner loop over the group's heads) and accumulates ``dv_j = sum_i p_ij dO_i``,
  ``dk_j = a sum_i c_i dZ_ij q_i`` and ``db_j = sum_i c_i dZ_ij``, reduced over the group in-kernel.

P is recomputed in float32 from the forward's logsumexp. Visibility comes from indices (causal,
window, registers, padded tails) and from two small int32 "codes" vectors built in XLA from the
lengths and segment ids (never a ``T x S`` array), the forward's codes
(:func:`~pallas_kernels.common.visibility_codes`, :func:`~pallas_kernels.common.codes_visible`).
Fully masked key/query tiles are skipped by running each pipeline over the tile range that
causal/window masks leave visible.

Interpreter: the CPU interpreter (``plgpu.InterpretGPUParams``) cannot run a wgmma whose left
operand lives in registers, and the GPU compiler rejects ``jnp.dot`` on registers: the three
register-operand products (dq += dZ K, dv += P^T dO, dk += dZ^T Q, and the [*, 16] ones / bias-part
products) go through :func:`_mma_acc`, :func:`_mma_accs` or :func:`_mma_while`, which pick the form
from the static ``interpret`` flag. Everything else runs the same code in both.
"""

import dataclasses
import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import tuning
from pallas_kernels.common import (
    MMA_BIAS_TERMS,
    MMA_BIAS_WIDTH,
    BaseEntropy,
    MaskSpec,
    TileMask,
    bias_ones,
    check_exp2_fma_cols,
    check_soft_cap,
    exp2_split,
    has_codes,
    interpret_context,
    is_masked,
    narrow_transforms,
    padded_head_dim,
    segment_ranks,
    split_bias,
    tile_index,
    tile_logits,
    visibility_codes,
)

__all__ = ["BackwardBlockSizes", "default_backward_block_sizes", "flash_backward",
           "fuses_entropy_grad"]

LOG2E = math.log2(math.e)
HEAD_DIMS = (64, 128, 256)  # the compiled head dims (common.padded_head_dim)
# Rows of the per-query statistics both kernels stream ([B, N, rows, Tp]): the base-2 lse, delta
# and c; with the entropy term (common.BaseEntropy) also the base lse (base 2) and the base p-mean
# of s = q . k, then f'(H0) and g_bar (dq kernel) or a g (dkv kernel, g from the dq kernel's dc).
LSE2, DELTA, SCALE, BASE_LSE2, BASE_MEAN, SCALE_GRAD, ENTROPY_GRAD, COTANGENT = 0, 1, 2, 3, 4, 5, 5, 6
ROW = plgpu.Layout.WGMMA.reduce(1)  # a vector indexed by the rows of a WGMMA tile
COL = plgpu.Layout.WGMMA.reduce(0)  # a vector indexed by the columns of a WGMMA tile


@dataclasses.dataclass(frozen=True)
class BackwardBlockSizes:
    """Tile sizes of the two backward kernels.

    Attributes:
      block_q_dq: query rows per compute warpgroup in the dq kernel.
      block_kv_dq: keys per pipelined K/V tile in the dq kernel.
      block_q_dkv: queries per pipelined Q/dO tile in the dkv kernel.
      block_kv_dkv: keys per compute warpgroup in the dkv kernel.
      compute_wgs: compute warpgroups per CTA (1, 2 or 3), each owning its own rows. Three get
        152 registers each (jax's pipeline split; 4 would ask 112 of the 104 a 5-warpgroup CTA
        can give and hang, ``forward._compute_registers``). Not timed on the GPU at 3.
      max_concurrent_steps: depth of the TMA pipeline (>= 2).
      dq_edge_masks, dkv_edge_masks: in that kernel, apply the causal / window / padding mask
        only on tiles that straddle its edge (a ``lax.cond`` per tile); tiles every query sees
        skip the mask arithmetic. Tiles with length or segment codes are always masked.
      mma_bias: with a bfloat16 key bias, both kernels add it to the recomputed logits with a
        second wgmma of one k-step, as the forward's ``BlockSizes.mma_bias`` (three bf16 parts of
        ``b / a``), instead of a per-logit add from a float32 strip.
      mma_db: with a bfloat16 key bias, the dkv kernel sums ``db_j = sum_i c_i dZ_ij`` with a
        wgmma of the 16-bit ``c dZ`` tile it forms for dk against a ``[block_q, 16]`` tile of
        ones (column 0 kept) instead of a per-logit float32 row sum. ``db`` then carries dk's
        rounding of ``dZ`` (bf16) instead of float32 sums. On at D = 64 (:mod:`pallas_kernels.tuning`).
      overlap: issue each tile's second and third wgmma before the register math that does not
        feed them and wait after it, so the softmax runs while the tensor cores form ``dP`` and the
        ``dc`` / ``db`` sums (and, in the dkv kernel, ``dZ``) while they accumulate dq / dv / dk.
        Off: every wgmma is awaited at once (the math is the same).
      dc_mma: the dq kernel takes ``dc``'s two dZ sums from the tensor cores instead of two
        float32 row sums per logit: ``sum_j dZ_ij s_ij = q_i . (sum_j dZ_ij k_j)`` from the dq
        accumulator (one row dot at the end) plus ``sum_j dZ_ij b_j / a`` and ``sum_j dZ_ij`` from
        a ``[block_kv, 16]`` wgmma of the 16-bit ``dZ`` tile against the mma_bias parts of
        ``b / a`` and a ones column. ``dc`` then carries dq's rounding of ``dZ`` (relative error
        ~2e-3 as dq's, instead of ~1e-6); the centering on ``sum_j p_ij s_ij`` (float32) stays.
        Only without a key bias or with mma_bias (a float32 strip keeps the row sums).
      dc_center_lse: center ``dc``'s sum on the row's logsumexp (in ``u``'s units, ``lse_i / c_i``)
        instead of the exact p-mean ``sum_j p_ij u_ij``, which drops a float32 row sum per logit.
        The centering then leaves ``H_i / c_i`` times ``sum_j dZ_ij`` (nonzero by delta's rounding
        from the 16-bit output): dc relative error ~3e-3 in bf16 (``H_i`` the row's entropy).
        Rows with ``c_i <= 0`` (or no visible key) are not centered. Off: on the H200 it made
        the dq kernel 5-8 % faster in three of four cells, but dc's error reached 9.9e-3 at
        N = 16384 (``H_i`` grows with N; ``docs/kernels.md``).
      dkv_split: run the dkv kernel as two: one sums dv (recomputing ``P``), one dk and db
        (recomputing ``P`` and ``dP``), so each holds one ``[block_kv_dkv, D]`` float32
        accumulator instead of two: at D = 256 the two take 256 registers a thread and spill
        (the fused dkv kernel ran at 115 TFLOP/s on the H200, the dq kernel at 456). Costs one
        more ``Q K^T`` product per tile and a second pass over Q / dO.
      dq_heavy_first: with a causal mask, the dq kernel launches each head's query tiles that see
        the most keys first (``BlockSizes.heavy_first``; the dkv kernel's causal order, first key
        tiles first, already is). On by default: 1-10 % faster causal dq kernels on the H200
        (D = 128 N = 16384 with ``c``: 3.43 -> 3.07 ms).
      exp2_fma_cols: the first this many columns of each recomputed tile (the dq kernel's keys,
        the dk/dv kernel's queries) take ``p`` (and the entropy term's ``p0``) from the FMA pipe's
        polynomial (:func:`~pallas_kernels.common.exp2_fma`) instead of the exponent unit, as the
        forward's ``BlockSizes.exp2_fma_cols`` (measured slower on the H100: dq + dk/dv with the
        entropy term 3.05 -> 3.23 ms at D = 64 with 16 columns). A multiple of 8 at most
        ``min(block_kv_dq, block_q_dkv)``; 0: every exponential on the exponent unit.
    """

    block_q_dq: int = 64
    block_kv_dq: int = 128
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    compute_wgs: int = 2
    max_concurrent_steps: int = 2
    dq_edge_masks: bool = False
    dkv_edge_masks: bool = False
    mma_bias: bool = False
    mma_db: bool = False
    overlap: bool = False
    dc_mma: bool = False
    dc_center_lse: bool = False
    dq_heavy_first: bool = True
    dkv_split: bool = False
    exp2_fma_cols: int = 0

    def __post_init__(self):
        for name in ("block_q_dq", "block_kv_dq", "block_q_dkv", "block_kv_dkv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % 64:
                raise ValueError(f"BackwardBlockSizes.{name} must be a positive multiple of 64, "
                                 f"got {value!r}")
        if self.compute_wgs not in (1, 2, 3):
            raise ValueError(f"BackwardBlockSizes.compute_wgs must be 1, 2 or 3, got {self.compute_wgs!r}")
        if not isinstance(self.max_concurrent_steps, int) or self.max_concurrent_steps < 2:
            raise ValueError("BackwardBlockSizes.max_concurrent_steps must be an int >= 2, got "
                             f"{self.max_concurrent_steps!r}")
        for name in ("dq_edge_masks", "dkv_edge_masks", "mma_bias", "mma_db", "overlap", "dc_mma",
                     "dc_center_lse", "dq_heavy_first", "dkv_split"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BackwardBlockSizes.{name} must be a bool, got {getattr(self, name)!r}")
        check_exp2_fma_cols("BackwardBlockSizes.exp2_fma_cols", self.exp2_fma_cols,
                            min(self.block_kv_dq, self.block_q_dkv), "min(block_kv_dq, block_q_dkv)")


# The tuned configs are data: pallas_kernels.tuning holds one table per device kind (the
# measurements behind each entry: docs/kernels.md); SMEM per CTA stays under sm90's 227 KiB.


def default_backward_block_sizes(head_dim: int, query_scale: bool = False, masked: bool = True,
                                 query_scale_grad: bool = True, *, entropy_grad: bool = False,
                                 device_kind: str | None = None) -> BackwardBlockSizes:
    """The default :class:`BackwardBlockSizes` for a head dim (rounded up to 64, 128 or 256).

    Read from the device's table in :mod:`pallas_kernels.tuning` (``device_kind`` None: the first
    JAX device's).

    Args:
      head_dim: the larger of the qk and v head dims.
      query_scale: whether the problem has a per-query scale ``c`` (its dq kernel holds more live
        tiles and takes smaller key tiles at D = 128 when masks exist and ``dc`` is summed).
      masked: whether a causal / window / length / segment mask exists (masked tiles hold more
        live registers).
      query_scale_grad: whether the dq kernel sums ``dc`` (``flash_backward``'s
        ``query_scale_grad``); without the sums the masked D = 128 dq kernel keeps 128-key tiles.
      entropy_grad: whether the kernels fuse the entropy term (``flash_backward``'s
        ``base_entropy``: one more float32 accumulator in the dq kernel).
      device_kind: the ``jax.Device.device_kind`` whose table to read.
    """
    D = padded_head_dim(head_dim, HEAD_DIMS, "backward")
    case = "plain"
    if query_scale:
        case = "c_masked_dc" if masked and query_scale_grad else "c"
        if entropy_grad:
            case = "c_entropy_masked" if masked else "c_entropy"
    return BackwardBlockSizes(**tuning.lookup("backward", D, case, device_kind))


def fuses_entropy_grad(head_dim: int, masked: bool, *, device_kind: str | None = None) -> bool:
    """Whether the backward is faster with the entropy term fused (``flash_backward``'s
    ``base_entropy``) than with the entropy sweep's own VJP as a second pass, on this device, for
    a head dim (the larger of qk and v) and whether a mask exists: the ``entropy_fused`` entry
    of :mod:`pallas_kernels.tuning` (measurements there)."""
    if head_dim > HEAD_DIMS[-1]:
        return False
    D = padded_head_dim(head_dim, HEAD_DIMS, "backward")
    return tuning.table(device_kind).get("entropy_fused", {}).get((D, bool(masked)), False)


def _cdiv(a, b):
    return (a + b - 1) // b


def _pad_axis(x, axis, size):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _mma_acc(acc, lhs, rhs_smem, interpret: bool):
    """``acc + lhs @ rhs_smem`` in float32, ``lhs`` in registers (16-bit), ``rhs_smem`` in SMEM.

    On the GPU this is a register-operand wgmma; the 0.11.2 interpreter cannot run that, so there
    it is a ``jnp.dot`` (which the GPU lowering rejects). Only the GPU form is GPU-checked.
    """
    return _mma_accs(((acc, lhs, rhs_smem),), interpret)[0]


def _mma_accs(products, interpret: bool):
    """``[acc + lhs @ rhs for (acc, lhs, rhs) in products]`` (16-bit ``lhs`` in registers, ``rhs``
    in SMEM): the wgmmas issued together, one wait. Interpreter: ``jnp.dot`` (see :func:`_mma_acc`)."""
    if interpret:
        return tuple(acc + jnp.dot(lhs, rhs[...], preferred_element_type=jnp.float32)
                     for acc, lhs, rhs in products)

    def body(acc_refs):
        for ref, (_, lhs, rhs) in zip(acc_refs, products, strict=True):
            plgpu.wgmma(ref, lhs, rhs)

    return pl.run_state(body)(tuple(plgpu.ACC.init(acc) for acc, _, _ in products))


def _mma_accs_while(products, work, interpret: bool):
    """``(_mma_accs(products), work())`` with ``work``'s register math between the wgmmas' issue
    and their wait (as :func:`_mma_while`, for several register-operand products)."""
    if interpret:
        return _mma_accs(products, True), work()

    def body(*acc_refs):
        for ref, (acc, lhs, rhs) in zip(acc_refs, products, strict=True):
            ref[...] = acc
            plgpu.wgmma(ref, lhs, rhs)
        out = work()
        return tuple(ref[...] for ref in acc_refs), out

    return pl.run_scoped(body, *(plgpu.ACC(acc.shape, jnp.float32) for acc, _, _ in products))


def _mm_smem(lhs_smem, rhs_smem_t, shape, extra=None):
    """``lhs_smem @ rhs_smem_t`` (both operands in SMEM) into a fresh float32 accumulator; plus
    ``extra[0] @ extra[1]`` (the mma_bias product) when given."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, lhs_smem, rhs_smem_t)
        if extra is not None:
            plgpu.wgmma(acc_ref, *extra)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


DC_ONES_COLUMN = MMA_BIAS_TERMS  # dc_mma: the ones column of the key-side [S, 16] operand


def _mma_while(acc, lhs, rhs_smem, work, interpret, *, lhs_in_registers, shape=None, extra=None):
    """``(acc + lhs @ rhs_smem, work())`` with ``work``'s register math between the wgmma's issue
    and its wait (``BackwardBlockSizes.overlap``): the ALU runs while the tensor cores do the product.

    ``acc`` None: a fresh float32 accumulator of ``shape``; ``extra``: a second product into it (the
    mma_bias operands). ``lhs_in_registers`` under the interpreter: a ``jnp.dot`` (as
    :func:`_mma_acc`); SMEM operands run the wgmma there too.
    """
    if interpret and lhs_in_registers:
        prod = jnp.dot(lhs, rhs_smem[...], preferred_element_type=jnp.float32)
        return (prod if acc is None else acc + prod), work()

    def body(acc_ref):
        if acc is not None:
            acc_ref[...] = acc
        plgpu.wgmma(acc_ref, lhs, rhs_smem)
        if extra is not None:
            plgpu.wgmma(acc_ref, *extra)
        out = work()
        return acc_ref[...], out

    return pl.run_scoped(body, plgpu.ACC(acc.shape if shape is None else shape, jnp.float32))


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _zeros_vec(n, layout):
    return plgpu.layout_cast(jnp.zeros((n,), jnp.float32), layout)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static the kernels close over."""

    logit_scale: float
    num_registers: int
    causal: bool
    window: tuple[int, int] | None
    has_codes: bool
    has_c: bool
    need_dc: bool  # has_c and its gradient is wanted (else the dq kernel skips the dc sums)
    has_bias: bool
    mma_bias: bool  # has_bias, added by a second wgmma (BackwardBlockSizes.mma_bias): no strip in the loop
    mma_db: bool  # has_bias, db summed by a wgmma against ones (BackwardBlockSizes.mma_db)
    dc_mma: bool  # need_dc, its dZ sums from wgmmas (BackwardBlockSizes.dc_mma)
    bias_key_grad: float | None  # b_j = g ||k_j||^2 with 2 g = this: dk += 2 g db_j k_j in the kernel
    T: int  # true lengths (before padding)
    S: int
    Tp: int  # padded lengths
    Sp: int
    group: int  # query heads per kv head
    H: int  # padded qk head dim
    Hv: int  # padded value head dim
    dtype: object
    interpret: bool
    soft_cap: float | None = None  # cap log2(e): the base-2 logits are soft-capped (d: 1 - t^2)
    entropy_grad: bool = False  # c = f(H0) of the base entropy: its term fused (common.BaseEntropy)
    fma_cols: int = 0  # BackwardBlockSizes.exp2_fma_cols

    @property
    def tiles(self):
        # padded keys and query rows are hidden where the lengths were padded (dk / dv sum over rows)
        return TileMask(self.num_registers, self.causal, self.window, self.S,
                        hide_padded_keys=self.Sp != self.S,
                        queries=self.T if self.Tp != self.T else None, has_codes=self.has_codes)


def _tile_probabilities(plan: _Plan, s, query, bias, u_scale, z_scale, lse2, mask):
    """``(u, p, g)`` of one recomputed tile, from the logit form every kernel shares
    (:func:`~pallas_kernels.common.tile_logits`).

    The base-2 logits are ``z2 = u c log2(e)`` with ``u = a s + b`` where the key bias comes from
    a float32 strip (``bias``), else ``z2 = s (c a log2(e))`` (one FMA with the exponent's shift;
    ``u = s``, and dc takes the ``a`` later); soft-capped, ``g`` the cap's derivative factor
    (None without a cap); ``p = 2^(z2 - lse2)`` with the hidden entries zeroed by ``mask``.
    ``query`` broadcasts a per-query vector over the tile (the dq tile's rows, the dk/dv tile's
    columns); ``bias``, ``u_scale`` and ``z_scale`` are thunks of the tiles or factors (each
    kernel forms its per-query factor its own way), called where the form uses them.
    """
    if bias is not None:
        u, z2, g = tile_logits(s, u_scale, logit_scale=plan.logit_scale, bias=bias,
                               soft_cap=plan.soft_cap, cap_grad=True)
    else:
        u, z2, g = tile_logits(s, z_scale, soft_cap=plan.soft_cap, cap_grad=True)
    p = mask(exp2_split(z2 - query(lse2), plan.fma_cols)[0])
    return u, p, g


def _base_weights(plan: _Plan, s, query, base_lse2, base_mean, mask):
    """``p0 (s - m)`` of one tile: the base softmax's weights ``p0 = 2^(a s log2(e) - lse0 log2(e))``
    (hidden entries zeroed by ``mask``) times the logits centred on the base p-mean ``m`` of ``s``:
    the entropy term's tile (``common.BaseEntropy``). ``base_lse2`` / ``base_mean``: thunks of the
    row vectors."""
    p0 = mask(exp2_split(s * (plan.logit_scale * LOG2E) - query(base_lse2()), plan.fma_cols)[0])
    return p0 * (s - query(base_mean()))


def _apply_mask(plan: _Plan, edge: bool, p, visible, q0, bq, k0, bkv):
    """``p`` with hidden entries zeroed; ``visible()`` builds the bool tile.

    With ``edge`` (and no codes), tiles that :meth:`TileMask.tile_is_full` clears skip the mask.
    """
    if not plan.tiles.masks_tiles:
        return p
    masked = lambda p: jnp.where(visible(), p, 0.0)
    if not edge or plan.has_codes:
        return masked(p)
    return lax.cond(plan.tiles.tile_is_full(q0, bq, k0, bkv), lambda p: p, masked, p)


def _transforms():
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _compiler_params():
    return plgpu.CompilerParams(approx_math=True)


# --------------------------------------------------------------------------------------------- dq


def _dq_call(plan: _Plan, cfg: BackwardBlockSizes, q, k, v, do, qstats, qcode, kbias, kcode, kbm, ones,
             interpret):
    """dq ``[B, Tp, N, H]`` (input dtype) and dc ``[B, N, Tp]`` float32 (or None).

    ``kbm`` / ``ones``: the mma_bias operands (``[B, Sp, K, 16]`` and ``[block_q, 16]``) or None.
    """
    B, Tp, N, H = q.shape
    Hv = v.shape[-1]
    bq, bkv, wgs = cfg.block_q_dq, cfg.block_kv_dq, cfg.compute_wgs
    n_stats = qstats.shape[2]
    num_q_tiles = Tp // (bq * wgs)
    a = plan.logit_scale
    G = plan.group
    strip = plan.has_bias and not plan.mma_bias  # the bias from a float32 strip, one add per logit
    kv_ones = plan.dc_mma and not plan.mma_bias  # dc_mma without a bias: sum_j dZ_ij from ones
    use_ones = plan.mma_bias or kv_ones
    ones = ones[:max(bq, bkv)] if use_ones else None

    def kernel(q_ref, k_ref, v_ref, do_ref, qstats_ref, *rest):
        rest = list(rest)
        qcode_ref = rest.pop(0) if plan.has_codes else None
        kbias_ref = rest.pop(0) if strip else None
        kcode_ref = rest.pop(0) if plan.has_codes else None
        kbm_ref = rest.pop(0) if plan.mma_bias else None
        ones_ref = rest.pop(0) if use_ones else None
        dq_ref = rest.pop(0)
        dc_ref = rest.pop(0) if plan.need_dc else None
        (q_smem2, do_smem2, stats_smem2, qcode_smem2, dc_smem2, ones_smem2, kv_ones_smem2), \
            barriers = rest
        batch = lax.axis_index("batch")
        head = lax.axis_index("heads")
        kv_head = lax.div(head, jnp.int32(G))
        wg = lax.axis_index("wg")
        tile_start = tile_index(plan.causal and cfg.dq_heavy_first, "q_seq", num_q_tiles) * (wgs * bq)
        lo, _, _, hi = plan.tiles.key_tiles(tile_start, wgs * bq, bkv)
        n_kv = hi - lo

        def compute_thread(pipeline_callback):
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            stats_smem = stats_smem2.at[wg]
            q0 = tile_start + wg * bq
            rows = (batch, pl.ds(q0, bq), head)
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, barriers.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, barriers.at[wg])
            plgpu.copy_gmem_to_smem(qstats_ref.at[batch, head, :, pl.ds(q0, bq)], stats_smem,
                                    barriers.at[wg])
            if plan.has_codes:
                plgpu.copy_gmem_to_smem(qcode_ref.at[batch, pl.ds(q0, bq)], qcode_smem2.at[wg],
                                        barriers.at[wg])
            if plan.mma_bias:
                plgpu.copy_gmem_to_smem(ones_ref.at[pl.ds(0, bq)], ones_smem2.at[wg], barriers.at[wg])
            if kv_ones:
                plgpu.copy_gmem_to_smem(ones_ref.at[pl.ds(0, bkv)], kv_ones_smem2.at[wg],
                                        barriers.at[wg])
            plgpu.barrier_wait(barriers.at[wg])
            aux = _zeros((bq, MMA_BIAS_WIDTH)) if plan.dc_mma else None
            ent_acc = _zeros((bq, H)) if plan.entropy_grad else None
            carry = (_zeros((bq, H)), _zeros_vec(bq, ROW), _zeros_vec(bq, ROW), _zeros_vec(bq, ROW),
                     aux, ent_acc)
            dq_acc, dc, dz_sum, pu_sum, aux, ent_acc = pipeline_callback(carry)
            if plan.dc_mma:  # sum_j dZ s = q . dq_acc (+ the bias parts' column sums)
                dc = jnp.sum(q_smem[...].astype(jnp.float32) * dq_acc, axis=1)
                col = plgpu.broadcasted_iota(jnp.int32, aux.shape, 1, layout=plgpu.Layout.WGMMA)
                ones_col = DC_ONES_COLUMN if plan.mma_bias else 0
                dz_sum = jnp.sum(jnp.where(col == ones_col, aux, 0.0), axis=1)
                if plan.mma_bias:
                    dc = dc + jnp.sum(jnp.where(col < MMA_BIAS_TERMS, aux, 0.0), axis=1)
            if plan.need_dc:
                # sum_j dZ_ij = sum_j p dP - delta_i is 0 with the exact delta; with delta from the
                # low-precision output it is not, and dc_i = sum_j dZ_ij u_ij inherits that error
                # times the row mean of u. Centering u on its p-mean removes it.
                if cfg.dc_center_lse:  # lse_i in u's units: lse2 / (c_i log2(e) [a])
                    lse2 = plgpu.load(stats_smem.at[LSE2], layout=ROW)
                    zc = plgpu.load(stats_smem.at[SCALE], layout=ROW) * (LOG2E if strip else LOG2E * a)
                    ok = (zc > 0) & (lse2 > -1e30)  # (fully masked rows: dz_sum = 0)
                    pu_sum = jnp.where(ok, lse2 / jnp.where(ok, zc, 1.0), 0.0)
                dc = dc - pu_sum * dz_sum
                if not strip:
                    dc = dc * a  # u = a s (s holds b / a with mma_bias): sum dZ u = a sum dZ s
            if plan.has_c:
                scale = plgpu.load(stats_smem.at[SCALE], layout=ROW) * a
                dq = dq_acc * lax.broadcast_in_dim(scale, (bq, H), [0])
                if plan.entropy_grad:  # - a^2 g_i sum_j p0_ij (s_ij - m_i) k_j, g = f'(H) dc + g_bar
                    g = (dc * plgpu.load(stats_smem.at[SCALE_GRAD], layout=ROW)
                         + plgpu.load(stats_smem.at[COTANGENT], layout=ROW))
                    dq = dq - lax.broadcast_in_dim(g * (a * a), (bq, H), [0]) * ent_acc
            else:
                dq = dq_acc * a
            q_smem[...] = dq.astype(plan.dtype)
            if plan.need_dc:
                dc_smem2.at[wg][...] = dc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
            if plan.need_dc:
                plgpu.copy_smem_to_gmem(dc_smem2.at[wg], dc_ref.at[batch, head, pl.ds(q0, bq)])
            plgpu.wait_smem_to_gmem(0)

        def kv_body(indices, *refs):
            n_in = len(in_specs)
            smem_refs, consumed, carry = refs[:n_in], refs[n_in:2 * n_in], refs[-1]
            k_smem, v_smem = smem_refs[0], smem_refs[1]
            extra = list(smem_refs[2:])
            kb_smem = extra.pop(0) if strip else None
            kc_smem = extra.pop(0) if plan.has_codes else None
            kbm_smem = extra.pop(0) if plan.mma_bias else None
            dq_acc, dc, dz_sum, pu_sum, aux, ent_acc = carry
            q0 = tile_start + wg * bq
            k0 = (lo + indices[0]) * bkv
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            stats_smem = stats_smem2.at[wg]
            lse2 = plgpu.load(stats_smem.at[LSE2], layout=ROW)
            delta = plgpu.load(stats_smem.at[DELTA], layout=ROW)

            bias_mm = None
            if plan.mma_bias:  # s = q . k + b / a
                bias_mm = (ones_smem2.at[wg], kbm_smem.transpose((1, 0)))
            s = _mm_smem(q_smem, k_smem.transpose((1, 0)), (bq, bkv), bias_mm)
            if plan.mma_bias and not plan.dc_mma:  # (dc_mma reads the bias parts again for dc)
                plgpu.barrier_arrive(consumed[-1])
            row = lambda x: lax.broadcast_in_dim(x, (bq, bkv), [0])
            crow = plgpu.load(stats_smem.at[SCALE], layout=ROW) * LOG2E if plan.has_c else None
            kb = None
            if strip:
                kb = plgpu.load(kb_smem, layout=COL)
                plgpu.barrier_arrive(consumed[2])
            qc = kc = None
            if plan.has_codes:
                qc = lax.broadcast_in_dim(plgpu.load(qcode_smem2.at[wg], layout=ROW), (bq, bkv), [0])
                kc = lax.broadcast_in_dim(plgpu.load(kc_smem, layout=COL), (bq, bkv), [1])
                plgpu.barrier_arrive(consumed[2 + int(strip)])

            def visible():
                qi = q0 + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
                kj = k0 + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                return plan.tiles.visible(qi, kj, qc, kc)

            stats_smem_row = lambda r: plgpu.load(stats_smem.at[r], layout=ROW)

            def softmax():  # (u, p, sum_j p g u, g): the logits' u, the probabilities, the cap's g
                mask = lambda p: _apply_mask(plan, cfg.dq_edge_masks, p, visible, q0, bq, k0, bkv)
                u, p, g = _tile_probabilities(
                    plan, s, row, (lambda: lax.broadcast_in_dim(kb, (bq, bkv), [1])) if strip else None,
                    lambda: row(crow) if plan.has_c else LOG2E,
                    lambda: row(crow * a) if plan.has_c else a * LOG2E, lse2, mask)
                pu = plan.need_dc and not cfg.dc_center_lse
                pgu = p * u if g is None else p * g * u
                w16 = None
                if plan.entropy_grad:  # the entropy term's tile, rounded for its wgmma
                    w16 = _base_weights(plan, s, row, lambda: stats_smem_row(BASE_LSE2),
                                        lambda: stats_smem_row(BASE_MEAN), mask).astype(plan.dtype)
                return u, p, (jnp.sum(pgu, axis=1) if pu else None), g, w16

            def dc_sums(dz, dzc):  # dc_i = sum_j dZ_ij u_ij and sum_j dZc_ij (centered at the end)
                if not plan.need_dc or plan.dc_mma:
                    return dc, dz_sum
                return dc + jnp.sum(dz * u, axis=1), dz_sum + jnp.sum(dzc, axis=1)

            if cfg.overlap:  # the softmax runs while the tensor cores form dP
                dp, (u, p, pu, g, w16) = _mma_while(None, do_smem, v_smem.transpose((1, 0)),
                                                    softmax, plan.interpret,
                                                    lhs_in_registers=False, shape=(bq, bkv))
            else:
                u, p, pu, g, w16 = softmax()
                dp = _mm_smem(do_smem, v_smem.transpose((1, 0)), (bq, bkv))
            plgpu.barrier_arrive(consumed[1])
            # dZc: the capped logits' gradient (its row sum is the delta error dc centres away);
            # dZ: the uncapped logits', through the cap's derivative
            dzc = p * (dp - lax.broadcast_in_dim(delta, (bq, bkv), [0]))
            dz = dzc if g is None else dzc * g
            dz16 = dz.astype(plan.dtype)
            if plan.entropy_grad:  # dq and the entropy term's sum_j p0 (s - m) k_j, one wait
                products = [(dq_acc, dz16, k_smem), (ent_acc, w16, k_smem)]
                if plan.dc_mma:
                    products.append((aux, dz16, kbm_smem if plan.mma_bias else kv_ones_smem2.at[wg]))
                    dq_acc, ent_acc, aux = _mma_accs(tuple(products), plan.interpret)
                elif cfg.overlap:
                    (dq_acc, ent_acc), (dc, dz_sum) = _mma_accs_while(
                        tuple(products), lambda: dc_sums(dz, dzc), plan.interpret)
                else:
                    dc, dz_sum = dc_sums(dz, dzc)
                    dq_acc, ent_acc = _mma_accs(tuple(products), plan.interpret)
            elif plan.dc_mma:  # [sum_j dZ t1, t2, t3, 1, ..] (mma_bias) or sum_j dZ (ones)
                rhs = kbm_smem if plan.mma_bias else kv_ones_smem2.at[wg]
                dq_acc, aux = _mma_accs(((dq_acc, dz16, k_smem), (aux, dz16, rhs)), plan.interpret)
            elif cfg.overlap:  # the dc sums run while the tensor cores accumulate dq
                dq_acc, (dc, dz_sum) = _mma_while(dq_acc, dz16, k_smem, lambda: dc_sums(dz, dzc),
                                                  plan.interpret, lhs_in_registers=True)
            else:
                dc, dz_sum = dc_sums(dz, dzc)
                dq_acc = _mma_acc(dq_acc, dz16, k_smem, plan.interpret)
            if pu is not None:
                pu_sum = pu_sum + pu
            plgpu.barrier_arrive(consumed[0])
            if plan.mma_bias and plan.dc_mma:
                plgpu.barrier_arrive(consumed[-1])
            return dq_acc, dc, dz_sum, pu_sum, aux, ent_acc

        tf = _transforms()
        in_specs = [
            plgpu.BlockSpec((bkv, H), lambda i: (lo + i, 0), transforms=tf),
            plgpu.BlockSpec((bkv, Hv), lambda i: (lo + i, 0), transforms=tf),
        ]
        in_refs = [k_ref.at[batch, :, kv_head, :], v_ref.at[batch, :, kv_head, :]]
        if strip:
            in_specs.append(plgpu.BlockSpec((bkv,), lambda i: (lo + i,)))
            in_refs.append(kbias_ref.at[batch, kv_head])
        if plan.has_codes:
            in_specs.append(plgpu.BlockSpec((bkv,), lambda i: (lo + i,)))
            in_refs.append(kcode_ref.at[batch])
        if plan.mma_bias:
            in_specs.append(plgpu.BlockSpec((bkv, MMA_BIAS_WIDTH), lambda i: (lo + i, 0),
                                            transforms=narrow_transforms()))
            in_refs.append(kbm_ref.at[batch, :, kv_head, :])
        _pipeline(kv_body, (n_kv,), cfg, wgs, compute_thread, in_specs)(*in_refs)

    tf = _transforms()
    scratch = (
        plgpu.SMEM((wgs, bq, H), plan.dtype, transforms=tf),
        plgpu.SMEM((wgs, bq, Hv), plan.dtype, transforms=tf),
        plgpu.SMEM((wgs, n_stats, bq), jnp.float32),
        plgpu.SMEM((wgs, bq), jnp.int32) if plan.has_codes else None,
        plgpu.SMEM((wgs, bq), jnp.float32) if plan.need_dc else None,
        plgpu.SMEM((wgs, bq, MMA_BIAS_WIDTH), plan.dtype, transforms=narrow_transforms())
        if plan.mma_bias else None,
        plgpu.SMEM((wgs, bkv, MMA_BIAS_WIDTH), plan.dtype, transforms=narrow_transforms())
        if kv_ones else None,
    )
    out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if plan.need_dc:
        out_type.append(jax.ShapeDtypeStruct((B, N, Tp), jnp.float32))
    outs = _launch(plan, kernel, out_type, scratch,
                   n_copies=3 + int(plan.has_codes) + int(plan.mma_bias) + int(kv_ones),
                   grid=(N, num_q_tiles, B), tile_axis="q_seq", wgs=wgs, interpret=interpret,
                   inputs=[q, k, v, do, qstats], side=(qcode, kbias, kcode, kbm, ones))
    return outs[0], (outs[1] if plan.need_dc else None)


# -------------------------------------------------------------------------------------------- dkv


def _dkv_call(plan: _Plan, cfg: BackwardBlockSizes, q, k, v, do, qstats, qcode, kbias, kcode, kbm, ones,
              interpret, part="dkv"):
    """dk ``[B, Sp, K, H]``, dv ``[B, Sp, K, Hv]`` (input dtype), db ``[B, K, Sp]`` float32 or None.

    ``part`` = ``"dk"`` sums only dk and db (dv is None), ``"dv"`` only dv (dk and db are None;
    V is not read: dv is staged in the K buffer when ``H == Hv``).
    """
    want_dk, want_dv = part in ("dkv", "dk"), part in ("dkv", "dv")
    B, Tp, N, H = q.shape
    Sp, K = k.shape[1], k.shape[2]
    Hv = v.shape[-1]
    G = plan.group
    bq, bkv, wgs = cfg.block_q_dkv, cfg.block_kv_dkv, cfg.compute_wgs
    n_stats = qstats.shape[2]
    num_kv_tiles = Sp // (bkv * wgs)
    a = plan.logit_scale
    q5 = q.reshape(B, Tp, K, G, H)
    do5 = do.reshape(B, Tp, K, G, Hv)
    qstats5 = qstats.reshape(B, K, G, n_stats, Tp)
    strip = plan.has_bias and not plan.mma_bias  # the bias from a float32 strip, one add per logit
    use_ones = plan.mma_bias or (plan.mma_db and want_dk)
    want_db = plan.has_bias and want_dk
    read_v = want_dk  # dv alone needs no dP
    v_buffer = read_v or H != Hv  # else dv is staged in the K buffer
    ones = ones[:bq] if use_ones else None

    def kernel(q_ref, do_ref, k_ref, v_ref, qstats_ref, *rest):
        rest = list(rest)
        qcode_ref = rest.pop(0) if plan.has_codes else None
        kbias_ref = rest.pop(0) if strip else None
        kcode_ref = rest.pop(0) if plan.has_codes else None
        kbm_ref = rest.pop(0) if plan.mma_bias else None
        ones_ref = rest.pop(0) if use_ones else None
        dk_ref = rest.pop(0) if want_dk else None
        dv_ref = rest.pop(0) if want_dv else None
        db_ref = rest.pop(0) if want_db else None
        (k_smem2, v_smem2, kb_smem2, kc_smem2, kbm_smem2, ones_smem), barriers = rest
        batch = lax.axis_index("batch")
        kv_head = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        tile_start = lax.axis_index("kv_seq") * (wgs * bkv)
        lo, n_q = plan.tiles.query_tiles(tile_start, wgs * bkv, bq, Tp // bq)

        def compute_thread(pipeline_callback):
            k_smem = k_smem2.at[wg]
            v_smem = v_smem2.at[wg] if v_buffer else k_smem
            k0 = tile_start + wg * bkv
            rows = (batch, pl.ds(k0, bkv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, barriers.at[wg])
            if read_v:
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, barriers.at[wg])
            if strip:
                plgpu.copy_gmem_to_smem(kbias_ref.at[batch, kv_head, pl.ds(k0, bkv)], kb_smem2.at[wg],
                                        barriers.at[wg])
            if plan.mma_bias:
                plgpu.copy_gmem_to_smem(kbm_ref.at[rows], kbm_smem2.at[wg], barriers.at[wg])
            if use_ones:
                plgpu.copy_gmem_to_smem(ones_ref, ones_smem.at[wg], barriers.at[wg])
            if plan.has_codes:
                plgpu.copy_gmem_to_smem(kcode_ref.at[batch, pl.ds(k0, bkv)], kc_smem2.at[wg],
                                        barriers.at[wg])
            plgpu.barrier_wait(barriers.at[wg])
            db0 = None
            if want_db:
                db0 = _zeros((bkv, MMA_BIAS_WIDTH)) if plan.mma_db else _zeros_vec(bkv, ROW)
            carry = (_zeros((bkv, H)) if want_dk else None,
                     _zeros((bkv, Hv)) if want_dv else None, db0)
            dk_acc, dv_acc, db = pipeline_callback(carry)
            if want_db and plan.mma_db:  # every column with a one holds db; keep column 0
                colid = plgpu.broadcasted_iota(jnp.int32, db.shape, 1, layout=plgpu.Layout.WGMMA)
                db = jnp.sum(jnp.where(colid == 0, db, 0.0), axis=1)
            if want_dk:
                dk = dk_acc * a
                if plan.bias_key_grad is not None:  # b_j = g ||k_j||^2: its key gradient 2 g db_j k_j
                    dk = dk + (plan.bias_key_grad * lax.broadcast_in_dim(db, (bkv, H), [0])
                               * k_smem[...].astype(jnp.float32))
                k_smem[...] = dk.astype(plan.dtype)
            if want_dv:
                v_smem[...] = dv_acc.astype(plan.dtype)
            if want_db:
                kb_smem2.at[wg][...] = db
            plgpu.commit_smem()
            if want_dk:
                plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows], commit_group=False)
            if want_dv:
                plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows], commit_group=False)
            if want_db:
                plgpu.copy_smem_to_gmem(kb_smem2.at[wg], db_ref.at[batch, kv_head, pl.ds(k0, bkv)],
                                        commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        def q_body(indices, *refs):
            n_in = len(in_specs)
            smem_refs, consumed, carry = refs[:n_in], refs[n_in:2 * n_in], refs[-1]
            q_smem, do_smem, stats_smem = smem_refs[:3]
            qc_smem = smem_refs[3] if plan.has_codes else None
            dk_acc, dv_acc, db = carry
            k_smem = k_smem2.at[wg]
            v_smem = v_smem2.at[wg] if v_buffer else None
            k0 = tile_start + wg * bkv
            q0 = (lo + indices[1]) * bq
            shape = (bkv, bq)

            lse2 = plgpu.load(stats_smem.at[LSE2], layout=COL)
            delta = plgpu.load(stats_smem.at[DELTA], layout=COL)
            crow = plgpu.load(stats_smem.at[SCALE], layout=COL) if plan.has_c else None
            ent_rows = None
            if plan.entropy_grad and want_dk:  # base lse2, base p-mean of s, a g
                ent_rows = [plgpu.load(stats_smem.at[r], layout=COL)
                            for r in (BASE_LSE2, BASE_MEAN, ENTROPY_GRAD)]
            plgpu.barrier_arrive(consumed[2])
            qc = kc = None
            if plan.has_codes:
                qc = lax.broadcast_in_dim(plgpu.load(qc_smem, layout=COL), shape, [1])
                plgpu.barrier_arrive(consumed[3])
                kc = lax.broadcast_in_dim(plgpu.load(kc_smem2.at[wg], layout=ROW), shape, [0])

            bias_mm = None
            if plan.mma_bias:  # s = k . q + b / a
                bias_mm = (kbm_smem2.at[wg], ones_smem.at[wg].transpose((1, 0)))
            s_t = _mm_smem(k_smem, q_smem.transpose((1, 0)), shape, bias_mm)
            col = lambda x: lax.broadcast_in_dim(x, shape, [1])
            kb = plgpu.load(kb_smem2.at[wg], layout=ROW) if strip else None

            def visible():
                kj = k0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                qi = q0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                return plan.tiles.visible(qi, kj, qc, kc)

            def softmax():
                mask = lambda p: _apply_mask(plan, cfg.dkv_edge_masks, p, visible, q0, bq, k0, bkv)
                _, p_t, g_t = _tile_probabilities(
                    plan, s_t, col, (lambda: lax.broadcast_in_dim(kb, shape, [0])) if strip else None,
                    lambda: col(crow * LOG2E) if plan.has_c else LOG2E,
                    lambda: col(crow * (a * LOG2E)) if plan.has_c else a * LOG2E, lse2, mask)
                w_t = None
                if ent_rows is not None:  # a g_i p0 (s - m_i): the entropy term of c dZ
                    w_t = _base_weights(plan, s_t, col, lambda: ent_rows[0], lambda: ent_rows[1],
                                        mask) * col(ent_rows[2])
                return p_t, g_t, w_t

            def dz_of(p_t, dp_t, g_t, w_t):
                if plan.has_c:  # c (dP - delta) as one FMA
                    dz_t = p_t * (dp_t * col(crow) - col(delta * crow))
                else:
                    dz_t = p_t * (dp_t - col(delta))
                if g_t is not None:
                    dz_t = dz_t * g_t
                if w_t is not None:
                    dz_t = dz_t - w_t
                return dz_t, dz_t.astype(plan.dtype)

            def db_sum(db, dz_t):
                return db + jnp.sum(dz_t, axis=1) if want_db and not plan.mma_db else db

            def p_and_dp():  # the softmax runs while the tensor cores form dP (overlap)
                if cfg.overlap:
                    dp_t, (p_t, g_t, w_t) = _mma_while(None, v_smem, do_smem.transpose((1, 0)),
                                                       softmax, plan.interpret,
                                                       lhs_in_registers=False, shape=shape)
                    return p_t, g_t, w_t, dp_t
                p_t, g_t, w_t = softmax()
                return p_t, g_t, w_t, _mm_smem(v_smem, do_smem.transpose((1, 0)), shape)

            def dk_step(dk_acc, db, dz_t, dz16):  # dk += dZ^T Q, and db's sum of dZ
                if plan.mma_db:
                    db = _mma_acc(db, dz16, ones_smem.at[wg], plan.interpret)
                if cfg.overlap:  # db's row sums while the tensor cores accumulate dk
                    return _mma_while(dk_acc, dz16, q_smem, lambda: db_sum(db, dz_t), plan.interpret,
                                      lhs_in_registers=True)
                db = db_sum(db, dz_t)
                return _mma_acc(dk_acc, dz16, q_smem, plan.interpret), db

            if part == "dv":  # P only: no dP, dZ or dk
                p_t, _, _ = softmax()
                dv_acc = _mma_acc(dv_acc, p_t.astype(plan.dtype), do_smem, plan.interpret)
                plgpu.barrier_arrive(consumed[1])
            elif part == "dk":  # P, dP and dZ, no dv
                p_t, g_t, w_t, dp_t = p_and_dp()
                plgpu.barrier_arrive(consumed[1])
                dz_t, dz16 = dz_of(p_t, dp_t, g_t, w_t)
            elif cfg.overlap:  # dZ formed while the tensor cores accumulate dv
                p_t, g_t, w_t, dp_t = p_and_dp()
                dv_acc, (dz_t, dz16) = _mma_while(dv_acc, p_t.astype(plan.dtype), do_smem,
                                                  lambda: dz_of(p_t, dp_t, g_t, w_t),
                                                  plan.interpret, lhs_in_registers=True)
                plgpu.barrier_arrive(consumed[1])
            else:
                p_t, g_t, w_t = softmax()
                dv_acc = _mma_acc(dv_acc, p_t.astype(plan.dtype), do_smem, plan.interpret)
                dp_t = _mm_smem(v_smem, do_smem.transpose((1, 0)), shape)
                plgpu.barrier_arrive(consumed[1])
                dz_t, dz16 = dz_of(p_t, dp_t, g_t, w_t)
            if want_dk:
                dk_acc, db = dk_step(dk_acc, db, dz_t, dz16)
            plgpu.barrier_arrive(consumed[0])
            return dk_acc, dv_acc, db

        tf = _transforms()
        in_specs = [
            plgpu.BlockSpec((bq, pl.Squeezed(), H), lambda g, i: (lo + i, g, 0), transforms=tf),
            plgpu.BlockSpec((bq, pl.Squeezed(), Hv), lambda g, i: (lo + i, g, 0), transforms=tf),
            plgpu.BlockSpec((pl.Squeezed(), n_stats, bq), lambda g, i: (g, 0, lo + i)),
        ]
        in_refs = [q_ref.at[batch, :, kv_head], do_ref.at[batch, :, kv_head], qstats_ref.at[batch, kv_head]]
        if plan.has_codes:
            in_specs.append(plgpu.BlockSpec((bq,), lambda g, i: (lo + i,)))
            in_refs.append(qcode_ref.at[batch])
        _pipeline(q_body, (G, n_q), cfg, wgs, compute_thread, in_specs)(*in_refs)

    tf = _transforms()
    scratch = (
        plgpu.SMEM((wgs, bkv, H), plan.dtype, transforms=tf),
        plgpu.SMEM((wgs, bkv, Hv), plan.dtype, transforms=tf) if v_buffer else None,
        plgpu.SMEM((wgs, bkv), jnp.float32) if strip or want_db else None,
        plgpu.SMEM((wgs, bkv), jnp.int32) if plan.has_codes else None,
        plgpu.SMEM((wgs, bkv, MMA_BIAS_WIDTH), plan.dtype, transforms=narrow_transforms())
        if plan.mma_bias else None,
        plgpu.SMEM((wgs, bq, MMA_BIAS_WIDTH), plan.dtype, transforms=narrow_transforms())
        if use_ones else None,
    )
    out_type = []
    if want_dk:
        out_type.append(jax.ShapeDtypeStruct(k.shape, k.dtype))
    if want_dv:
        out_type.append(jax.ShapeDtypeStruct(v.shape, v.dtype))
    if want_db:
        out_type.append(jax.ShapeDtypeStruct((B, K, Sp), jnp.float32))
    outs = list(_launch(plan, kernel, out_type, scratch,
                        n_copies=(1 + int(read_v) + int(strip) + int(plan.has_codes) + int(plan.mma_bias)
                                  + int(use_ones)),
                        grid=(K, num_kv_tiles, B), tile_axis="kv_seq", wgs=wgs, interpret=interpret,
                        inputs=[q5, do5, k, v, qstats5], side=(qcode, kbias, kcode, kbm, ones)))
    dk = outs.pop(0) if want_dk else None
    dv = outs.pop(0) if want_dv else None
    db = outs.pop(0) if want_db else None
    return dk, dv, db


def _pipeline(body, grid, cfg, wgs, compute_thread, in_specs):
    """The warp-specialized input pipeline: ``wgs`` compute warpgroups, one 40-register copier."""
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=grid,
        max_concurrent_steps=cfg.max_concurrent_steps,
        num_compute_wgs=wgs,
        memory_registers=40,
        wg_axis="wg",
        manual_consumed_barriers=True,
        compute_context=compute_thread,
        in_specs=in_specs,
    )


def _launch(plan, kernel, out_type, scratch, *, n_copies, grid, tile_axis, wgs, interpret, inputs,
            side):
    """One ``plgpu.kernel`` call: ``wgs`` compute warpgroups + 1 pipeline warpgroup.

    ``side`` is ``(qcode, kbias, kcode, kbm, ones)``; the ones the static config uses follow
    ``inputs`` (``kbias`` only without mma_bias, ``kbm`` only with it, ``ones`` when given).
    """
    qcode, kbias, kcode, kbm, ones = side
    inputs = list(inputs)
    if plan.has_codes:
        inputs.append(qcode)
    if plan.has_bias and not plan.mma_bias:
        inputs.append(kbias)
    if plan.has_codes:
        inputs.append(kcode)
    if plan.mma_bias:
        inputs.append(kbm)
    if ones is not None:
        inputs.append(ones)
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=[scratch, plgpu.Barrier(num_arrivals=n_copies, num_barriers=wgs)],
        compiler_params=_compiler_params(),
        grid=grid,
        grid_names=("heads", tile_axis, "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        interpret=interpret,
    )(*inputs)


# ------------------------------------------------------------------------------------------ entry


def _check_inputs(q, k, v, out, lse, dout, query_scale, key_bias, mask):
    for name, x, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("out", out, 4), ("dout", dout, 4),
                        ("lse", lse, 3)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != nd:
            raise ValueError(f"{name} must have {nd} dims, got shape {x.shape}")
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if k.shape != (B, S, K, H):
        raise ValueError(f"k must have shape [B, S, K, H] with B, H of q {q.shape}, got {k.shape}")
    if v.shape[:3] != (B, S, K):
        raise ValueError(f"v must have shape [B, S, K, Hv] matching k {k.shape}, got {v.shape}")
    if T == 0 or S == 0 or B == 0:
        raise ValueError(f"q and k must have B, T, S > 0, got q {q.shape}, k {k.shape}")
    if K == 0 or N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}")
    Hv = v.shape[-1]
    for name, x in (("out", out), ("dout", dout)):
        if x.shape != (B, T, N, Hv):
            raise ValueError(f"{name} must have shape {(B, T, N, Hv)}, got {x.shape}")
    if lse.shape != (B, N, T):
        raise ValueError(f"lse must have shape {(B, N, T)}, got {lse.shape}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise NotImplementedError(f"the Mosaic GPU backward takes bfloat16/float16 inputs, got {q.dtype}")
    if query_scale is not None and query_scale.shape != (B, N, T):
        raise ValueError(f"query_scale must have shape {(B, N, T)}, got {query_scale.shape}")
    if key_bias is not None and key_bias.shape != (B, K, S):
        raise ValueError(f"key_bias must have shape {(B, K, S)}, got {key_bias.shape}")
    if not isinstance(mask, MaskSpec):
        raise TypeError(f"mask must be a MaskSpec, got {type(mask).__name__}")
    if (mask.q_segment_ids is None) != (mask.kv_segment_ids is None):
        raise ValueError("mask.q_segment_ids and mask.kv_segment_ids must be given together")
    R = mask.num_registers
    if R < 0 or R > S:
        raise ValueError(f"mask.num_registers must be in [0, S={S}], got {R}")
    if mask.q_segment_ids is not None:
        if mask.q_segment_ids.shape != (B, T) or mask.kv_segment_ids.shape != (B, S - R):
            raise ValueError("segment ids must have shapes [B, T] and [B, S - num_registers], got "
                             f"{mask.q_segment_ids.shape}, {mask.kv_segment_ids.shape}")
    for name in ("q_lengths", "kv_lengths"):
        x = getattr(mask, name)
        if x is not None and x.shape != (B,):
            raise ValueError(f"mask.{name} must have shape {(B,)}, got {x.shape}")


def flash_backward(q, k, v, out, lse, dout, *, logit_scale: float, query_scale=None, key_bias=None,
                   mask: MaskSpec | None = None, config: BackwardBlockSizes | None = None, interpret=None,
                   kernels: tuple[str, ...] = ("dq", "dkv"), query_scale_grad: bool = True,
                   bias_key_grad: float | None = None, lse_cotangent=None,
                   logits_soft_cap: float | None = None, base_entropy: BaseEntropy | None = None):
    """Gradients of the kernel-level attention problem, with two fused Mosaic GPU kernels.

    .. math::

      dq_i = a c_i \\sum_j dZ_{ij} k_j, \\quad dk_j = a \\sum_i c_i dZ_{ij} q_i, \\quad
      dv_j = \\sum_i p_{ij} dO_i, \\quad dc_i = \\sum_j dZ_{ij} u_{ij}, \\quad db_j = \\sum_i c_i dZ_{ij}

    (``dk``, ``dv``, ``db`` summed over the query heads of each GQA group, inside the kernel).

    Args:
      q: ``[B, T, N, H]`` bfloat16 or float16 queries.
      k: ``[B, S, K, H]`` keys, ``N % K == 0``.
      v: ``[B, S, K, Hv]`` values.
      out: ``[B, T, N, Hv]`` forward output (for ``delta = rowsum(dout * out)``).
      lse: ``[B, N, T]`` float32 natural-log logsumexp of the forward (0 on rows with no key).
      dout: ``[B, T, N, Hv]`` cotangent of ``out``.
      logit_scale: the python float ``a``.
      query_scale: ``[B, N, T]`` float32 ``c`` or None (= 1).
      key_bias: ``[B, K, S]`` float32 ``b`` or None (= 0).
      mask: the :class:`~pallas_kernels.common.MaskSpec` of the forward (None: no mask). Segment ids
        may be any integers (ranked before the kernels: :func:`~pallas_kernels.common.visibility_codes`).
      config: block sizes; :func:`default_backward_block_sizes` of the head dim when None.
      interpret: a ``plgpu.InterpretGPUParams`` or a bool (None: interpret iff the default backend
        is cpu).
      kernels: which of the two kernels run, ``"dq"`` (dq, dquery_scale) and ``"dkv"`` (dk, dv,
        dkey_bias); the outputs of a kernel left out are None. For timing one kernel alone.
      query_scale_grad: False when the gradient of ``query_scale`` is not wanted (a constant SSMax
        ``s``, a stop-gradient beta): the dq kernel then skips its ``dc`` sums and dquery_scale
        is None.
      bias_key_grad: a python float ``2 g`` when the key bias is ``b_j = g ||k_j||^2`` of these
        keys (RBF: ``g = -gamma``): dk then includes the bias's key gradient ``2 g db_j k_j``
        (added in the dk/dv kernel's epilogue), and the caller must not add it again (compute
        ``b`` from ``stop_gradient(k)``). None: dk is the logits' term only.
      lse_cotangent: float32 ``[B, N, T]`` cotangent of ``lse``, or None. ``d lse_i / d z_ij =
        p_ij``, so it enters as ``dZ = P (dP - (delta - dlse))``: ``delta`` is shifted in XLA
        and the kernels are unchanged. The dq kernel's ``dc`` is formed independently of delta
        (``sum dZ u - (sum p u)(sum dZ)``), so it does not include the term ``dlse_i sum_j p_ij
        u_ij``: the caller adds it (:func:`pallas_kernels.flash_attention` does).
      logits_soft_cap: the forward's ``cap`` (the softmax saw ``cap tanh(z / cap)``), or None: P is
        recomputed from the capped logits and dZ goes through the cap's derivative
        ``1 - tanh^2``; ``dc``'s centring sums the capped logits' dZ (whose row sum is the delta
        error) against ``sum_j p_ij (1 - t_ij^2) u_ij``.
      base_entropy: a :class:`~pallas_kernels.common.BaseEntropy` when ``query_scale`` is
        ``c_i = f(H_i)`` of the base softmax's entropy (adaptive temperature): dq and dk then
        include the gradient through ``f`` (the dq kernel sums ``sum_j p0_ij (s_ij - m_i) k_j``
        beside dq and finishes it with ``g_i = f'(H_i) dc_i + g_bar_i``; the dk/dv kernel
        subtracts ``a g_i p0_ij (s_ij - m_i)`` from its ``c dZ`` tile). Needs ``query_scale``,
        ``query_scale_grad`` and both kernels; not with a key bias or a soft cap.

    Returns:
      ``(dq, dk, dv, dquery_scale, dkey_bias)``: dq/dk/dv in the input dtype; dquery_scale
      ``[B, N, T]`` and dkey_bias ``[B, K, S]`` float32, each None iff its input is None (or its
      kernel is left out).

    Raises:
      NotImplementedError: float32 inputs, head dims above 256.
    """
    mask = MaskSpec() if mask is None else mask
    _check_inputs(q, k, v, out, lse, dout, query_scale, key_bias, mask)
    if mask.offset:
        raise ValueError(f"the kernels take an offset-free MaskSpec, got offset={mask.offset}: "
                         "fold it with pallas_kernels.common.fold_offset first "
                         "(pallas_kernels.flash_attention does)")
    kernels = tuple(kernels)
    if not kernels or any(x not in ("dq", "dkv") for x in kernels):
        raise ValueError(f"kernels must be a non-empty subset of ('dq', 'dkv'), got {kernels!r}")
    _check_python_float("logit_scale", logit_scale)
    if bias_key_grad is not None:
        if key_bias is None:
            raise ValueError("bias_key_grad needs a key_bias (b_j = g ||k_j||^2)")
        bias_key_grad = _check_python_float("bias_key_grad", bias_key_grad)
    if base_entropy is not None:
        _check_base_entropy(base_entropy, q, query_scale, query_scale_grad, key_bias,
                            logits_soft_cap, kernels)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    elif interpret is False:
        interpret = None
    elif not isinstance(interpret, plgpu.InterpretGPUParams):
        raise TypeError(f"interpret must be None, a bool or plgpu.InterpretGPUParams, got {interpret!r}")
    B, T, N, H0 = q.shape
    S, K, Hv0 = k.shape[1], k.shape[2], v.shape[-1]
    H, Hv = (padded_head_dim(d, HEAD_DIMS, "backward") for d in (H0, Hv0))
    masked = is_masked(mask)
    cfg = config if config is not None else default_backward_block_sizes(
        max(H, Hv), query_scale is not None, masked, bool(query_scale_grad),
        entropy_grad=base_entropy is not None)
    if not isinstance(cfg, BackwardBlockSizes):
        raise TypeError(f"config must be a BackwardBlockSizes, got {type(cfg).__name__}")
    R = mask.num_registers
    q_mult = math.lcm(cfg.block_q_dq * cfg.compute_wgs, cfg.block_q_dkv)
    k_mult = math.lcm(cfg.block_kv_dkv * cfg.compute_wgs, cfg.block_kv_dq)
    Tp, Sp = _cdiv(T, q_mult) * q_mult, _cdiv(S, k_mult) * k_mult
    plan = _Plan(
        logit_scale=float(logit_scale), num_registers=R, causal=mask.is_causal,
        window=mask.local_window_size, has_codes=has_codes(mask), has_c=query_scale is not None,
        need_dc=query_scale is not None and bool(query_scale_grad),
        has_bias=key_bias is not None,
        mma_bias=key_bias is not None and cfg.mma_bias and jnp.dtype(q.dtype) == jnp.bfloat16,
        mma_db=key_bias is not None and cfg.mma_db and jnp.dtype(q.dtype) == jnp.bfloat16,
        # dc_mma's dZ row sums come from dq's mma of dZ, not the capped logits' dZc
        dc_mma=query_scale is not None and bool(query_scale_grad) and cfg.dc_mma and (
            key_bias is None or (cfg.mma_bias and jnp.dtype(q.dtype) == jnp.bfloat16))
        and logits_soft_cap is None,
        bias_key_grad=bias_key_grad,
        soft_cap=None if logits_soft_cap is None else check_soft_cap(logits_soft_cap) * LOG2E,
        T=T, S=S, Tp=Tp, Sp=Sp, group=N // K, H=H, Hv=Hv, dtype=q.dtype,
        interpret=interpret is not None, entropy_grad=base_entropy is not None,
        fma_cols=cfg.exp2_fma_cols)
    # 32-bit side inputs, and 32-bit tracing: jax's pipeline emitter mixes int32 grid indices with
    # python ints, which fails under jax_enable_x64.
    lse = lse.astype(jnp.float32)
    query_scale = None if query_scale is None else query_scale.astype(jnp.float32)
    key_bias = None if key_bias is None else key_bias.astype(jnp.float32)
    if mask.q_segment_ids is not None:
        # the forward's dense ranks, formed before the int32 cast below: int64 ids cast to int32
        # would wrap (2**32 onto 0), raw int32 ids could equal the codes' markers
        q_rank, k_rank = segment_ranks(mask.q_segment_ids, mask.kv_segment_ids)
        mask = dataclasses.replace(mask, q_segment_ids=q_rank, kv_segment_ids=k_rank)
    mask = jax.tree.map(lambda x: x.astype(jnp.int32), mask)
    if plan.soft_cap is not None and plan.need_dc and cfg.dc_center_lse:
        raise NotImplementedError("logits_soft_cap with BackwardBlockSizes.dc_center_lse (its centring "
                                  "on lse / c assumes uncapped logits)")
    if lse_cotangent is not None:
        if plan.need_dc and cfg.dc_center_lse:
            raise NotImplementedError("a logsumexp cotangent with BackwardBlockSizes.dc_center_lse: its "
                                      "dc centring is not the p-mean the lse term needs")
        lse_cotangent = jnp.broadcast_to(lse_cotangent, lse.shape).astype(jnp.float32)
    with interpret_context(plan.interpret), jax.enable_x64(False):
        return _flash_backward(plan, cfg, q, k, v, out, lse, dout, query_scale, key_bias, mask, interpret,
                               kernels, lse_cotangent, base_entropy)


def _check_base_entropy(base, q, query_scale, query_scale_grad, key_bias, cap, kernels):
    if not isinstance(base, BaseEntropy):
        raise TypeError(f"base_entropy must be a pallas_kernels.BaseEntropy, got {type(base).__name__}")
    if query_scale is None or not query_scale_grad:
        raise ValueError("base_entropy needs the query_scale c = f(H) and query_scale_grad=True "
                         "(its gradient dc feeds the entropy term)")
    if key_bias is not None or cap is not None:
        raise NotImplementedError("base_entropy with a key_bias or a soft cap (the fused entropy "
                                  "term takes the base logits a q . k)")
    if "dq" not in kernels or "dkv" not in kernels:
        raise ValueError("base_entropy needs both kernels (the dq kernel's dc feeds the dk/dv "
                         f"kernel), got kernels={kernels!r}")
    B, T, N, _ = q.shape
    for name in ("lse", "entropy", "scale_grad", "cotangent"):
        x = getattr(base, name)
        if x is None and name == "cotangent":
            continue
        if not hasattr(x, "shape") or x.shape != (B, N, T):
            raise ValueError(f"base_entropy.{name} must have shape {(B, N, T)}, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")


def _check_python_float(name, x):
    """``float(x)`` for a python / numpy real number (not a bool, not an array); else TypeError."""
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, bool):
        raise TypeError(f"{name} must be a python float, got {type(x).__name__}")
    return float(x)


def _delta(out, dout):
    """``delta_i = dout_i . out_i``, float32 ``[B, N, T]``.

    A row reduction over the contiguous head dim into ``[B, T, N]``, kept apart (an optimization
    barrier) from the transpose and the stacking of the kernels' row statistics: fused into that
    concatenation, XLA reduced in the transposed order at well below memory speed (H200, D = 64,
    B * T = 16384, N = 16: 68 us for 67 MB).
    """
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)  # [B, T, N]
    return jnp.transpose(jax.lax.optimization_barrier(delta), (0, 2, 1))


@functools.partial(jax.jit, static_argnums=(0, 1, 11, 12))
def _flash_backward(plan: _Plan, cfg, q, k, v, out, lse, dout, query_scale, key_bias, mask, interpret,
                    kernels, lse_cotangent=None, base_entropy=None):
    B, T, N, H0 = q.shape
    S, Hv0 = k.shape[1], v.shape[-1]
    delta = _delta(out, dout)
    if lse_cotangent is not None:
        delta = delta - lse_cotangent
    stats = [lse.astype(jnp.float32) * LOG2E, delta]
    if plan.has_c:
        stats.append(query_scale.astype(jnp.float32))
    if plan.entropy_grad:  # BASE_LSE2, BASE_MEAN, SCALE_GRAD, COTANGENT
        base = jax.tree.map(lambda x: x.astype(jnp.float32), base_entropy)
        g_bar = jnp.zeros_like(base.lse) if base.cotangent is None else base.cotangent
        # m_i = sum_j p0_ij s_ij = (lse0_i - H_i) / a (u = a s, H = lse0 - sum_j p0 u)
        stats += [base.lse * LOG2E, (base.lse - base.entropy) / plan.logit_scale,
                  base.scale_grad, g_bar]
    qstats = _pad_axis(jnp.stack(stats, axis=2), 3, plan.Tp)  # [B, N, n_stats, Tp]
    qp = _pad_axis(_pad_axis(q, 3, plan.H), 1, plan.Tp)
    kp = _pad_axis(_pad_axis(k, 3, plan.H), 1, plan.Sp)
    vp = _pad_axis(_pad_axis(v, 3, plan.Hv), 1, plan.Sp)
    dop = _pad_axis(_pad_axis(dout.astype(q.dtype), 3, plan.Hv), 1, plan.Tp)
    kbias = None if key_bias is None else _pad_axis(key_bias.astype(jnp.float32), 2, plan.Sp)
    kbm = ones = None
    if plan.mma_bias:  # [B, Sp, K, 16]: bf16 parts of b / a
        kbm = split_bias(jnp.transpose(kbias, (0, 2, 1)) / plan.logit_scale, q.dtype)  # [B, Sp, K] order
        if plan.dc_mma:  # a ones column for sum_j dZ_ij (the q side's [1, 1, 1, 0..] skips it)
            kbm = kbm.at[..., DC_ONES_COLUMN].set(1)
    if plan.mma_bias or plan.mma_db or plan.dc_mma:  # [rows, 16]: [1, 1, 1, 0..]
        ones = bias_ones(max(cfg.block_q_dq, cfg.block_q_dkv, cfg.block_kv_dq), q.dtype)
    qcode = kcode = None
    if plan.has_codes:
        qcode, kcode = visibility_codes(mask, B, T, S, plan.Tp, plan.Sp, ranked=True)
    dq = dk = dv = dc = db = None
    if "dq" in kernels:
        dq, dc = _dq_call(plan, cfg, qp, kp, vp, dop, qstats, qcode, kbias, kcode, kbm, ones,
                          interpret)
        dc_padded = dc
        dq = dq[:, :T, :, :H0]
        dc = None if dc is None else dc[:, :, :T]
    if plan.entropy_grad:  # the dk/dv kernel's row: a g = a (f'(H) dc + g_bar), from dq's dc
        g = dc_padded * qstats[:, :, SCALE_GRAD] + qstats[:, :, COTANGENT]
        qstats = qstats[:, :, :COTANGENT].at[:, :, ENTROPY_GRAD].set(plan.logit_scale * g)
    if "dkv" in kernels:
        args = (plan, cfg, qp, kp, vp, dop, qstats, qcode, kbias, kcode, kbm, ones, interpret)
        if cfg.dkv_split:  # one float32 accumulator per kernel (D = 256)
            dk, _, db = _dkv_call(*args, part="dk")
            _, dv, _ = _dkv_call(*args, part="dv")
        else:
            dk, dv, db = _dkv_call(*args)
        dk = dk[:, :S, :, :H0]
        dv = dv[:, :S, :, :Hv0]
        db = None if db is None else db[:, :, :S]
    return dq, dk, dv, dc, db
