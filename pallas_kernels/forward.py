"""Fused flash-attention forward on the Pallas Mosaic GPU backend (Hopper: TMA, wgmma, 2+1 warpgroups).

Computes the kernel-level problem of :mod:`pallas_kernels.common`:

.. math::

  z_{ij} = c_i \\, (a \\, q_i \\cdot k_j + b_j), \\qquad
  o_i = \\sum_j \\text{softmax}_j(z_{i\\cdot})_j \\, v_j, \\qquad
  \\text{lse}_i = \\log \\sum_j e^{z_{ij}}

over the keys visible under a :class:`~pallas_kernels.common.MaskSpec`, with an online softmax in
float32 (base 2: ``log2(e)`` is folded into the per-row factor ``r_i = a c_i log2(e)``) and O(T + S)
extra memory.

Structure (one CTA = one query head, ``2 * block_q`` queries, one batch entry): two compute
warpgroups each own ``block_q`` query rows; a third warpgroup streams K/V tiles (and a small
``[n, block_kv]`` float32 strip of per-key data: the bias ``b_j / a`` and a key id used for
lengths and segment masks; with ``BlockSizes.mma_bias`` the bias instead comes as a
``[block_kv, 16]`` bfloat16 tile of its parts, added by a second wgmma) by TMA into a
``max_concurrent_steps``-deep ring. A schedule barrier
ping-pongs the compute warpgroups so one runs its softmax while the other's wgmma runs
(FlashAttention-3). Key blocks that no query of a tile can see (causal, sliding window) are never
loaded; blocks every query sees run without mask arithmetic.

Statistics: with ``return_stats`` the kernel also streams ``V_i = sum_j p_ij (z_ij - m_i)`` (base 2,
rescaled like ``l_i``) and returns the exact entropy ``H_i = ln 2 (log2 l_i - V_i / l_i)`` and the
max weight ``1 / l_i`` (``m_i`` is the exact row max). :func:`flash_stats` runs the same kernel
with P @ V skipped and the compute warpgroups free-running (no ping-pong: nothing to overlap), for
adaptive temperature; it can return each row's max, which lets the main sweep skip its online max
(``flash_forward(row_max=...)``).

Masked logits are set to ``-1e30`` (base 2), never ``-inf``; a row whose running max stays there has
no visible key and gives zeros (lse, entropy and max weight 0). Visible logits below ``-5e29`` would
be mistaken for masked ones.

CPU testing: under the Mosaic GPU interpreter (``plgpu.InterpretGPUParams``, chosen automatically
when ``jax.default_backend() == "cpu"``) the one step the interpreter cannot run -- wgmma with P in
registers -- is replaced by ``jnp.dot(p, v_smem[...])``, which the GPU compiler rejects in turn
(:func:`_pv`). Everything else is the same code on both sides.

References:
  Shah et al. "FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision".
  2024. https://arxiv.org/abs/2407.08608 (and jax's ``pallas/ops/gpu/attention_mgpu.py``).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import tuning
from pallas_kernels.common import (
    MMA_BIAS_WIDTH,
    MaskSpec,
    TileMask,
    bias_ones,
    check_exp2_fma_cols,
    check_soft_cap,
    exp2_split,
    interpret_context,
    is_masked,
    narrow_transforms,
    padded_head_dim,
    split_bias,
    tile_index,
    tile_logits,
    visibility_codes,
)

__all__ = ["BlockSizes", "DEFAULT_BLOCK_SIZES", "default_block_sizes", "default_stats_block_sizes",
           "flash_forward", "flash_stats", "scale_row_max", "row_max_from_stats", "count_visible"]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
HEAD_DIMS = (64, 128, 192, 256)  # the compiled head dims (common.padded_head_dim)
MASKED = -1e30  # base-2 logit of a hidden key
_EMPTY = 0.5 * MASKED  # a final row max at or below this: no visible key
_TMA_REGISTERS = 40


def _compute_registers(compute_wgs):
    """Registers per thread a compute warpgroup raises itself to (``setmaxnreg``).

    A CTA starts with ``64 K / threads`` registers per thread (rounded down to 8); ``setmaxnreg.inc``
    only takes what the CTA's own warps released (the TMA warpgroup's drop to 40), and waits
    forever for more: 2 warpgroups 168 -> 232, 3: 128 -> 152, 4: 96 -> 104 (jax's pipeline
    formula, ``(512 - 40) / 4``, asks 112 there: more than was released).
    """
    launch = 65536 // (128 * (compute_wgs + 1)) // 8 * 8
    spare = (launch - _TMA_REGISTERS) // compute_wgs // 8 * 8
    return min(launch + spare, 256)


_COMPUTE_REGISTERS = {n: _compute_registers(n) for n in (2, 3, 4)}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and static tuning choices of the forward kernel.

    Attributes:
      block_q: query rows per compute warpgroup (a CTA holds ``2 * block_q``); multiple of 64.
      block_kv: keys per pipeline step; multiple of 64.
      max_concurrent_steps: depth of the K/V shared-memory ring (>= 2).
      fold_scale: on unmasked tiles with one positive row factor ``r`` (or a per-query scale
        without a key bias), take the row max as ``r * max_j s_ij`` and form ``r s - m`` (and
        ``r s + r b``) as one fused multiply-add per logit instead of a multiply and an add. A
        per-query scale of unknown sign is folded as ``|r_i|`` with row ``i`` of the Q tile
        negated in shared memory where ``r_i < 0`` (once per tile, exact), unless the caller
        declares it nonnegative. Same values up to FMA rounding; one floating-point op fewer per
        logit. Measured (``python3 -m benchmarks tune``): +1-7 % at D = 64 (H100), +2 % at
        D = 128 (H200; -1-4 % on the H100), +2-3 % at D = 256 with ``c``; see
        :mod:`pallas_kernels.tuning`.
      mma_bias: with a bfloat16 key bias, add it to the logits on the tensor cores: the bias
        ``b_j / a`` is split into three bfloat16 terms ``t1 + t2 + t3`` (exact: 3 x 8 bits,
        :func:`split_bias`) and a second wgmma of one k-step accumulates
        ``[1, 1, 1, 0..] . [t1, t2, t3, 0..]`` into the ``q . k`` tile, so the softmax does plain
        softmax's work per logit (no bias strip in registers, no add). Costs a ``[S, 16]``
        operand per kv head (one XLA pass) and ``16 / D`` more QK work. float16 inputs keep the
        strip.
      compute_wgs: compute warpgroups per CTA (2, 3 or 4; each owns ``block_q`` query rows).
        More than 2 leaves fewer registers each (:data:`_COMPUTE_REGISTERS`): meant for the
        statistics sweep, which holds no output accumulator.
      pingpong: order the two compute warpgroups with a schedule barrier so one runs its softmax
        while the other's wgmmas run (FlashAttention-3). Needs ``compute_wgs == 2``. Without P @ V
        (the statistics sweep) the tensor cores are mostly idle and the barrier only serializes
        the two softmaxes.
      intra_overlap: FlashAttention-3's intra-warpgroup overlap: step ``j`` issues ``S_j = Q K_j^T``
        and then ``O += P_{j-1} V_{j-1}`` (``P`` carried as 16-bit registers, its V slot released
        one step late), reads ``S_j`` once the older group is done and runs the softmax while the
        tensor cores do the PV product; one PV follows the loop. Needs ``pingpong=False``; the
        statistics sweep (no P @ V) ignores it. GPU-checked; it loses to the ping-pong or ties
        on the H200 (D = 64: 0.652 -> 0.818 ms; ``docs/kernels.md``), so off by default.
      sweep_skips_v: the statistics sweep (:func:`flash_stats`, no P @ V) neither streams V nor
        keeps SMEM for it: half the K/V traffic from L2 (the V tiles are the K tiles there). Off:
        it streams and waits on V like the forward. The forward ignores it. An earlier kernel
        without any V pipeline gave wrong statistics on the GPU after other XLA work; this one keeps
        the forward's pipeline minus V, passes the GPU check (XLA work before every kernel) and is
        on in :func:`default_stats_block_sizes` at D = 64, 128 and 256 (``docs/kernels.md``).
      heavy_first: with a causal mask, launch each head's query tiles that see the most keys
        (the last rows) first, as FlashAttention-3's scheduler does, so short tiles end the launch
        instead of the longest ones. The same tiles in another order (heads stay the slowest
        axis, for K/V reuse in L2); no effect without a causal mask. On by default: on the H200
        it made the causal forward 2-8 % and the statistics sweep 5-8 % faster at D = 64 / 128,
        N = 4096 / 16384; off launches each head's query tiles in ascending order.
      exp2_fma_cols: the first this many columns of each tile take their exponentials from a
        polynomial on the FMA pipe (:func:`~pallas_kernels.common.exp2_fma`, relative error
        1.8e-7) instead of the exponent unit (16 ``ex2`` a clock per SM against 128 FMAs). On
        the H100 every kernel measured slower with it (docs/kernels.md), so no tuning entry
        sets it. A multiple of 8 (one column tile of the wgmma layout), at
        most ``block_kv``; 0: every exponential on the exponent unit.
    """

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    fold_scale: bool = False
    mma_bias: bool = False
    compute_wgs: int = 2
    pingpong: bool = True
    intra_overlap: bool = False
    sweep_skips_v: bool = False
    heavy_first: bool = True
    exp2_fma_cols: int = 0

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            val = getattr(self, name)
            if not isinstance(val, int) or val <= 0 or val % 64:
                raise ValueError(f"{name} must be a positive multiple of 64, got {val!r}")
        if not isinstance(self.max_concurrent_steps, int) or self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps must be an int >= 2, got "
                             f"{self.max_concurrent_steps!r}")
        for name in ("fold_scale", "mma_bias", "pingpong", "intra_overlap", "sweep_skips_v",
                     "heavy_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_exp2_fma_cols("exp2_fma_cols", self.exp2_fma_cols, self.block_kv, "block_kv")
        if self.compute_wgs not in _COMPUTE_REGISTERS:
            raise ValueError(f"compute_wgs must be one of {sorted(_COMPUTE_REGISTERS)}, got "
                             f"{self.compute_wgs!r}")
        if self.pingpong and self.compute_wgs != 2:
            raise ValueError(f"pingpong needs compute_wgs == 2, got {self.compute_wgs}")
        if self.intra_overlap and self.pingpong:
            raise ValueError("intra_overlap needs pingpong=False (the two schedules are not combined)")


# The tuned tiles are data: pallas_kernels.tuning holds one table per device kind (the measurements
# behind each entry: docs/kernels.md). Shared memory: Q 2*block_q*D + K/V 2*steps*block_kv*D
# (2 bytes each) must fit in 227 KiB, so D = 192 / 256 take 64-key tiles of 2 stages.
DEFAULT_BLOCK_SIZES = {D: BlockSizes(**entry) for (D, case), entry in tuning.SM90["forward"].items()
                       if case == "plain"}  # the sm90 table's per-head-dim defaults (no c, no b)


def _forward_case(query_scale, key_bias, fixed_max, masked, causal_keys, short_causal_keys):
    """The :mod:`~pallas_kernels.tuning` case of a forward problem."""
    if key_bias:
        return "cb" if query_scale else "b"
    if query_scale:
        return "c_row_max" if fixed_max and not masked else "c"
    return "short_causal" if 0 < causal_keys <= short_causal_keys else "plain"


def default_block_sizes(head_dim: int, query_scale: bool = False, key_bias: bool = False, *,
                        fixed_max: bool = False, masked: bool = True, causal_keys: int = 0,
                        device_kind: str | None = None):
    """The tuned :class:`BlockSizes` for a padded head dim and the problem's per-row / per-key terms.

    Read from the device's table in :mod:`pallas_kernels.tuning` (``device_kind`` None: the first
    JAX device's). Per head dim, with these exceptions: at D = 64 with a per-query scale smaller key
    tiles (no register spills), unless the forward is given the row max (``fixed_max``, no online
    max: fewer live registers) and no mask hides keys; at D = 64 and 128 with a key bias,
    ``mma_bias`` (and the tiles tuned for it; with both, the per-query scale's tiles plus
    ``mma_bias``); at D = 256 with a per-query scale (no bias) ``fold_scale``; at D = 64 with
    neither and a causal mask over ``causal_keys`` <= 2048 keys (0: not causal), the 128-key tiles.
    """
    short = tuning.table(device_kind)["forward_short_causal_keys"]
    case = _forward_case(query_scale, key_bias, fixed_max, masked, causal_keys, short)
    return BlockSizes(**tuning.lookup("forward", head_dim, case, device_kind))


def default_stats_block_sizes(head_dim: int, query_scale: bool = False, key_bias: bool = False, *,
                              device_kind: str | None = None):
    """The :class:`BlockSizes` of :func:`flash_stats` (the statistics sweep) for a padded head dim:
    the forward's (:func:`default_block_sizes`) with the table's statistics layout over it
    (free-running warpgroups over 128-key tiles and no V stream at D = 64, 128 (4 warpgroups) and
    256 (2), causal or not; D = 192 keeps the forward's)."""
    base = default_block_sizes(head_dim, query_scale, key_bias, device_kind=device_kind)
    layout = tuning.table(device_kind)["stats"].get(head_dim)
    return base if layout is None else dataclasses.replace(base, **layout)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one kernel launch."""

    blocks: BlockSizes
    head_dim: int  # padded
    dtype: jnp.dtype
    group: int  # query heads per kv head
    num_registers: int
    seq_kv: int  # real sequence keys (without registers)
    causal: bool
    window: tuple[int, int] | None
    row_const: float | None  # r_i when it is one constant, else None (row vector)
    row_nonneg: bool  # the caller promises r_i >= 0 (lets fold_scale treat a row vector)
    has_bias: bool
    mma_bias: bool  # the key bias comes from a second wgmma (BlockSizes.mma_bias); has_bias False
    has_kid: bool
    has_qid: bool
    stats: bool
    pv: bool  # False: the statistics sweep (P @ V skipped; V streamed unless sweep_skips_v)
    interpret: bool
    fixed_max: bool = False  # the exact row max is an input (row vector): no online max
    row_flip: bool = False  # fold a row vector of any sign: Q's rows negated where r_i < 0
    soft_cap: float | None = None  # cap log2(e): the base-2 logits are soft-capped
    hardmax: bool = False  # uniform weights over each row's maximal logits (no exponentials)

    @property
    def streams_v(self):  # the forward always; the statistics sweep unless sweep_skips_v
        return self.pv or not self.blocks.sweep_skips_v

    @property
    def num_row_vecs(self):
        return int(self.row_const is None) + int(self.has_qid) + int(self.fixed_max)

    @property
    def num_key_vecs(self):
        return int(self.has_bias) + int(self.has_kid)

    @property
    def tiles(self):
        # padded query rows are dropped, not hidden
        keys = self.num_registers + self.seq_kv
        return TileMask(self.num_registers, self.causal, self.window, keys,
                        hide_padded_keys=keys % self.blocks.block_kv != 0, has_codes=self.has_kid)


def _pv(acc, p16, v_smem, interpret):
    """``acc + p16 @ v``: register-operand wgmma on the GPU, ``jnp.dot`` in the interpreter.

    The 0.11.2 interpreter cannot run wgmma with a register LHS, and the GPU compiler cannot lower
    ``dot_general``; this is the one step that differs between the two.
    """
    if interpret:
        return acc + jnp.dot(p16, v_smem[...], preferred_element_type=jnp.float32)

    def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem)

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def _visible(plan, q0, step, kid, qid):
    """Bool ``[block_q, block_kv]`` visibility of the tile at key step ``step``."""
    bq, bkv = plan.blocks.block_q, plan.blocks.block_kv
    shape = (bq, bkv)
    rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + q0
    cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + step * bkv
    kcode = lax.broadcast_in_dim(kid, shape, [1]) if plan.has_kid else None
    qcode = lax.broadcast_in_dim(qid, shape, [0]) if plan.has_qid else None
    return plan.tiles.visible(rows, cols, qcode, kcode)


def _shifted_logits(plan, s, kb, r, m, masked, visible):
    """``(m_new, d)``: the running row max and ``d = z - m_new`` of one tile (base 2).

    ``z = r (s + b)`` (soft-capped), the logit form every kernel shares
    (:func:`~pallas_kernels.common.tile_logits`), with ``r`` the row factor (``plan.row_const``
    or the row vector ``r``) and ``b`` the key bias ``kb`` (or none); hidden logits are
    ``MASKED`` on masked tiles. Without a cap or a mask the folded forms below are the same
    logits in fewer operations. With
    ``plan.fixed_max`` ``m`` is the row's final max already and stays. With ``plan.hardmax``,
    ``d`` is ``z`` itself: the argmax set is ``z >= m_new`` on this one value (a ``z - m_new``
    may be contracted into an FMA with z's multiply, and is then not 0 at the max).
    """
    row = lambda x: lax.broadcast_in_dim(x, s.shape, [0])
    col = lambda x: lax.broadcast_in_dim(x, s.shape, [1])
    new_max = lambda tile_max: m if plan.fixed_max else jnp.maximum(m, tile_max())
    rc = plan.row_const
    shift = (lambda z, m: z) if plan.hardmax else (lambda z, m: z - row(m))

    def hide(z):  # hidden logits to MASKED on a masked tile (visible() is None: none hidden)
        ok = visible() if masked else None
        return z if ok is None else jnp.where(ok, z, MASKED)

    # hardmax compares z with the row max exactly: not the folded forms, which never form z; the
    # soft cap comes between the scale and the max
    fold = (plan.blocks.fold_scale and not masked and not plan.hardmax
            and plan.soft_cap is None)
    if fold and rc is None and (plan.row_nonneg or plan.row_flip) and kb is None:
        # max_j (r_i s_ij) = r_i max_j s_ij for r_i >= 0; d = r s - m is one FMA
        m_new = new_max(lambda: s.max(axis=1) * r)
        return m_new, s * row(r) - row(m_new)
    if fold and rc is not None and rc > 0:
        if kb is None:  # max_j (rc s_ij) = rc max_j s_ij for rc > 0; d = rc s - m is one FMA
            m_new = new_max(lambda: s.max(axis=1) * rc)
            return m_new, s * rc - row(m_new)
        z = s * rc + col(kb * rc)  # one FMA per logit
        m_new = new_max(lambda: z.max(axis=1))
        return m_new, z - row(m_new)
    _, z, _ = tile_logits(s, (lambda: rc) if r is None else (lambda: row(r)),
                          bias=None if kb is None else lambda: col(kb), soft_cap=plan.soft_cap)
    z = hide(z)
    m_new = new_max(lambda: z.max(axis=1))
    return m_new, shift(z, m_new)


def _flip_rows(q_smem, r, dtype):
    """``|r|``, with row ``i`` of the Q tile in shared memory negated where ``r_i < 0``.

    ``r_i (q_i . k_j) = |r_i| ((sign r_i) q_i . k_j)``, and negating a 16-bit value is exact, so
    :func:`_shifted_logits` can fold a row factor of any sign (``max_j`` of a nonnegative factor
    times ``s_ij``) without knowing the signs ahead of the launch. Runs once per Q tile, before
    its first wgmma."""
    q = plgpu.load(q_smem, layout=plgpu.Layout.WGMMA)
    sign = jnp.where(r < 0, -1.0, 1.0)
    q_smem[...] = (q.astype(jnp.float32) * lax.broadcast_in_dim(sign, q.shape, [0])).astype(dtype)
    plgpu.commit_smem()  # the wgmmas read Q through the async proxy
    return jnp.abs(r)


def _kernel(plan, q_ref, k_ref, v_ref, rv_ref, kv_ref, kb_ref, ones_ref, out_ref, lse_ref, ent_ref,
            mw_ref, smem, bars):
    bq, bkv = plan.blocks.block_q, plan.blocks.block_kv
    steps = plan.blocks.max_concurrent_steps
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    kv_head = lax.div(head, jnp.int32(plan.group))
    cw = plan.blocks.compute_wgs
    cta_q0 = tile_index(plan.causal and plan.blocks.heavy_first, "q_seq",
                        q_ref.shape[1] // (cw * bq)) * (cw * bq)
    lo, _, _, hi = plan.tiles.key_tiles(cta_q0, cw * bq, bkv)

    def slot_of(step):
        return lax.rem(step - lo, jnp.int32(steps))

    pingpong = plan.blocks.pingpong

    def schedule():
        if pingpong:
            plgpu.barrier_arrive(bars["sched"])
            plgpu.barrier_wait(bars["sched"])

    @pl.when(wg < cw)
    def _compute():
        plgpu.set_max_registers(_COMPUTE_REGISTERS[cw], action="increase")
        q0 = cta_q0 + wg * bq
        q_smem = smem["q"].at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q0, bq), head], q_smem, bars["q"].at[wg])
        if plan.mma_bias:
            plgpu.copy_gmem_to_smem(ones_ref, smem["qb"].at[wg], bars["q"].at[wg])
        if plan.num_row_vecs:
            plgpu.copy_gmem_to_smem(rv_ref.at[batch, head, :, pl.ds(q0, bq)], smem["rv"].at[wg],
                                    bars["q"].at[wg])
        plgpu.barrier_wait(bars["q"].at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        r = qid = m_fixed = None
        row_vec_at = lambda i: plgpu.load(smem["rv"].at[wg, jnp.int32(i)], layout=row_layout)
        if plan.row_const is None:
            r = row_vec_at(0)
            if plan.row_flip:
                r = _flip_rows(q_smem, r, plan.dtype)
        if plan.has_qid:
            qid = row_vec_at(int(plan.row_const is None))
        if plan.fixed_max:
            m_fixed = row_vec_at(plan.num_row_vecs - 1)

        def issue_qk(acc_ref, slot):
            plgpu.wgmma(acc_ref, q_smem, smem["k"].at[slot].transpose((1, 0)))
            if plan.mma_bias:  # + [1, 1, 1, 0..] . [t1, t2, t3, 0..] = b_j / a
                plgpu.wgmma(acc_ref, smem["qb"].at[wg], smem["kb"].at[slot].transpose((1, 0)))

        def tile_softmax(s, step, slot, m, den, ent, masked):
            """``(m_new, p, alpha, den, ent)`` of one tile's logits ``s``: loads the tile's key
            vectors, releases its K slot; ``den`` and ``ent`` rescaled to ``m_new`` (``den``
            without this tile's ``sum_j p``); ``alpha`` None with ``plan.fixed_max``."""
            key_layout = plgpu.Layout.WGMMA.reduce(0)
            kb = kid = None
            if plan.has_bias:
                kb = plgpu.load(smem["kv"].at[slot, jnp.int32(0)], layout=key_layout)
            if plan.has_kid:
                kid = plgpu.load(smem["kv"].at[slot, jnp.int32(plan.num_key_vecs - 1)], layout=key_layout)
            plgpu.barrier_arrive(bars["k_done"].at[slot])
            m_new, d = _shifted_logits(plan, s, kb, r, m, masked, lambda: _visible(
                plan, q0, step, kid, qid))
            if plan.hardmax:
                # The argmax set, exactly: d is z here, and m_new one of its values (or m). A
                # larger max empties the set (alpha 0); hidden keys (MASKED) count only until a
                # visible one raises the max, and a row with none is empty at the end.
                p = (d >= lax.broadcast_in_dim(m_new, d.shape, [0])).astype(jnp.float32)
                alpha = (m >= m_new).astype(jnp.float32)
            else:
                p, d = exp2_split(d, plan.blocks.exp2_fma_cols)
                alpha = None if plan.fixed_max else jnp.exp2(m - m_new)
            if plan.stats and not plan.hardmax:  # hardmax: sum_j p d = 0, so H = ln(count)
                ent = (p * d).sum(axis=1) + (
                    ent if alpha is None else alpha * (ent + den * (m - m_new)))
            if alpha is not None:
                den = den * alpha
            return m_new, p, alpha, den, ent

        def step_fn(step, carry, masked):
            acc, m, den, ent = carry
            slot = slot_of(step)
            plgpu.barrier_wait(bars["k"].at[slot])

            def compute_qk(acc_ref):
                issue_qk(acc_ref, slot)
                schedule()
                return acc_ref[...]

            s = pl.run_scoped(compute_qk, plgpu.ACC((bq, bkv), jnp.float32))
            m_new, p, alpha, den, ent = tile_softmax(s, step, slot, m, den, ent, masked)

            def end_softmax():
                if pingpong:
                    plgpu.barrier_arrive(bars["sched"])
                if plan.streams_v:
                    plgpu.barrier_wait(bars["v"].at[slot])
                if pingpong:
                    plgpu.barrier_wait(bars["sched"])

            if not plan.pv:
                den = den + p.sum(axis=1)
                end_softmax()
                if plan.streams_v:
                    plgpu.barrier_arrive(bars["v_done"].at[slot])
                return acc, m_new, den, ent
            if alpha is not None:
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p16 = p.astype(plan.dtype)

            if plan.head_dim <= 128:
                den = den + p.sum(axis=1)
                acc, den, m_new, p16 = lax.optimization_barrier((acc, den, m_new, p16))
                end_softmax()
            else:
                end_softmax()
                den = den + p.sum(axis=1)
            acc = _pv(acc, p16, smem["v"].at[slot], plan.interpret)
            plgpu.barrier_arrive(bars["v_done"].at[slot])
            return acc, m_new, den, ent

        def overlap_step_fn(step, carry, masked):
            # BlockSizes.intra_overlap: S_j = Q K_j^T and O += P_{j-1} V_{j-1} in flight together,
            # the softmax of S_j under the PV product; V_{j-1}'s slot is released after it.
            acc, m, den, ent, p_prev, prev_slot, has_prev = carry
            slot = slot_of(step)
            plgpu.barrier_wait(bars["k"].at[slot])

            def softmax(s):  # (m_new, p, alpha, den, ent), den with this tile's sum
                m_new, p, alpha, new_den, new_ent = tile_softmax(s, step, slot, m, den, ent, masked)
                return m_new, p, alpha, new_den + p.sum(axis=1), new_ent

            def qk_only(acc):
                def body(s_ref):
                    issue_qk(s_ref, slot)
                    return s_ref[...]
                return acc, softmax(pl.run_scoped(body, plgpu.ACC((bq, bkv), jnp.float32)))

            def qk_and_pv(acc):
                v_prev = smem["v"].at[prev_slot]
                if plan.interpret:  # no register-operand wgmma there (see _pv)
                    acc, out = qk_only(acc)
                    return _pv(acc, p_prev, v_prev, True), out

                def body(s_ref, o_ref):
                    o_ref[...] = acc
                    issue_qk(s_ref, slot)
                    plgpu.wgmma(o_ref, p_prev, v_prev)  # the newest group
                    out = softmax(plgpu.wgmma_accumulator_load(s_ref, wait_n=1))
                    return o_ref[...], out

                return pl.run_scoped(body, plgpu.ACC((bq, bkv), jnp.float32),
                                     plgpu.ACC((bq, plan.head_dim), jnp.float32))

            acc, (m_new, p, alpha, den, ent) = lax.cond(has_prev > 0, qk_and_pv, qk_only, acc)
            pl.when(has_prev > 0)(lambda: plgpu.barrier_arrive(bars["v_done"].at[prev_slot]))
            if alpha is not None:
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(bars["v"].at[slot])  # V_j: this step's P multiplies it next step
            return acc, m_new, den, ent, p.astype(plan.dtype), slot, jnp.int32(1)

        def last_pv(carry):
            """The PV product the overlapped loop leaves: O += P_last V_last, its slot released."""
            acc, m, den, ent, p_prev, prev_slot, has_prev = carry
            acc = lax.cond(has_prev > 0,
                           lambda a: _pv(a, p_prev, smem["v"].at[prev_slot], plan.interpret),
                           lambda a: a, acc)
            pl.when(has_prev > 0)(lambda: plgpu.barrier_arrive(bars["v_done"].at[prev_slot]))
            return acc, m, den, ent

        def skip_fn(step, _):
            slot = slot_of(step)
            plgpu.barrier_wait(bars["k"].at[slot])
            plgpu.barrier_arrive(bars["k_done"].at[slot])
            schedule()
            if plan.streams_v:
                plgpu.barrier_wait(bars["v"].at[slot])
                plgpu.barrier_arrive(bars["v_done"].at[slot])
            schedule()

        def row_vec(value):
            return plgpu.layout_cast(jnp.full((bq,), value, jnp.float32), row_layout)

        acc = None
        if plan.pv:
            acc = plgpu.layout_cast(jnp.zeros((bq, plan.head_dim), jnp.float32),
                                    plgpu.Layout.WGMMA)
        m0 = m_fixed if plan.fixed_max else row_vec(MASKED)
        carry = (acc, m0, row_vec(0.0), row_vec(0.0) if plan.stats else None)
        overlap = plan.blocks.intra_overlap and plan.pv
        step = overlap_step_fn if overlap else step_fn
        if overlap:  # + (P of the previous step, its slot, whether there is one)
            p0 = plgpu.layout_cast(jnp.zeros((bq, bkv), plan.dtype), plgpu.Layout.WGMMA)
            carry = carry + (p0, jnp.int32(0), jnp.int32(0))
        my_lo, full_lo, full_hi, my_hi = plan.tiles.key_tiles(q0, bq, bkv)
        my_lo = jnp.clip(my_lo, lo, hi)
        my_hi = jnp.clip(my_hi, my_lo, hi)
        full_lo = jnp.clip(full_lo, my_lo, my_hi)
        full_hi = jnp.clip(full_hi, full_lo, my_hi)
        pl.when(wg == 1)(schedule)
        lax.fori_loop(lo, my_lo, skip_fn, None)
        masked_step = functools.partial(step, masked=True)
        carry = lax.fori_loop(my_lo, full_lo, masked_step, carry)
        carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(full_hi, my_hi, masked_step, carry)
        if overlap:
            carry = last_pv(carry)
        lax.fori_loop(my_hi, hi, skip_fn, None)
        pl.when(wg == 0)(schedule)
        acc, m, den, ent = carry

        empty = m <= _EMPTY
        inv = 1.0 / jnp.where(empty, 1.0, den)
        log2_l = jnp.log(jnp.where(empty, 1.0, den)) * (1.0 / LN2)
        if plan.pv:
            scale = jnp.where(empty, 0.0, inv)
            acc = acc * lax.broadcast_in_dim(scale, acc.shape, [0])
            q_smem[...] = acc.astype(plan.dtype)
        lse = (m + log2_l) * LN2
        smem["lse"].at[wg][...] = jnp.where(empty, 0.0, lse)
        if plan.stats:
            smem["ent"].at[wg][...] = jnp.where(empty, 0.0, (log2_l - ent * inv) * LN2)
            # the statistics sweep returns the row max (base 2) where the forward has 1 / l
            smem["mw"].at[wg][...] = jnp.where(empty, 0.0, inv) if plan.pv else m
        plgpu.commit_smem()
        if plan.pv:
            plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, pl.ds(q0, bq), head])
        rows = pl.ds(q0, bq)
        plgpu.copy_smem_to_gmem(smem["lse"].at[wg], lse_ref.at[batch, head, rows])
        if plan.stats:
            plgpu.copy_smem_to_gmem(smem["ent"].at[wg], ent_ref.at[batch, head, rows])
            plgpu.copy_smem_to_gmem(smem["mw"].at[wg], mw_ref.at[batch, head, rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == cw)
    def _memory():
        plgpu.set_max_registers(_TMA_REGISTERS, action="decrease")

        def issue_k(step, slot):
            plgpu.copy_gmem_to_smem(k_ref.at[batch, pl.ds(step * bkv, bkv), kv_head],
                                    smem["k"].at[slot], bars["k"].at[slot])
            if plan.num_key_vecs:
                plgpu.copy_gmem_to_smem(kv_ref.at[batch, kv_head, :, pl.ds(step * bkv, bkv)],
                                        smem["kv"].at[slot], bars["k"].at[slot])
            if plan.mma_bias:
                plgpu.copy_gmem_to_smem(kb_ref.at[batch, pl.ds(step * bkv, bkv), kv_head],
                                        smem["kb"].at[slot], bars["k"].at[slot])

        def issue_v(step, slot):
            if plan.streams_v:
                plgpu.copy_gmem_to_smem(v_ref.at[batch, pl.ds(step * bkv, bkv), kv_head],
                                        smem["v"].at[slot], bars["v"].at[slot])

        for i in range(steps):
            @pl.when(lo + i < hi)
            def _prologue(i=i):
                issue_k(lo + i, i)
                issue_v(lo + i, i)

        @pl.loop(lo + steps, hi)
        def _stream(step):
            slot = slot_of(step)
            plgpu.barrier_wait(bars["k_done"].at[slot])
            issue_k(step, slot)
            if plan.streams_v:
                plgpu.barrier_wait(bars["v_done"].at[slot])
            issue_v(step, slot)

        # Observe the last consumptions too, so every barrier phase has been waited on when the
        # barriers are freed (the interpreter checks this; on the GPU it costs an idle wait).
        @pl.loop(jnp.maximum(lo, hi - steps), hi)
        def _drain(step):
            slot = slot_of(step)
            plgpu.barrier_wait(bars["k_done"].at[slot])
            if plan.streams_v:
                plgpu.barrier_wait(bars["v_done"].at[slot])


def _scratch(plan):
    bq, bkv, steps = plan.blocks.block_q, plan.blocks.block_kv, plan.blocks.max_concurrent_steps
    D, cw = plan.head_dim, plan.blocks.compute_wgs
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    narrow = narrow_transforms()
    smem = dict(
        q=plgpu.SMEM((cw, bq, D), plan.dtype, transforms=transforms),
        k=plgpu.SMEM((steps, bkv, D), plan.dtype, transforms=transforms),
        v=plgpu.SMEM((steps, bkv, D), plan.dtype, transforms=transforms) if plan.streams_v else None,
        rv=plgpu.SMEM((cw, plan.num_row_vecs, bq), jnp.float32) if plan.num_row_vecs else None,
        kv=plgpu.SMEM((steps, plan.num_key_vecs, bkv), jnp.float32) if plan.num_key_vecs else None,
        qb=plgpu.SMEM((cw, bq, MMA_BIAS_WIDTH), plan.dtype, transforms=narrow)
        if plan.mma_bias else None,
        kb=plgpu.SMEM((steps, bkv, MMA_BIAS_WIDTH), plan.dtype, transforms=narrow)
        if plan.mma_bias else None,
        lse=plgpu.SMEM((cw, bq), jnp.float32),
        ent=plgpu.SMEM((cw, bq), jnp.float32) if plan.stats else None,
        mw=plgpu.SMEM((cw, bq), jnp.float32) if plan.stats else None,
    )
    bars = dict(
        q=plgpu.Barrier(num_arrivals=1 + int(plan.num_row_vecs > 0) + int(plan.mma_bias),
                        num_barriers=cw),
        k=plgpu.Barrier(num_arrivals=1 + int(plan.num_key_vecs > 0) + int(plan.mma_bias),
                        num_barriers=steps),
        v=plgpu.Barrier(num_barriers=steps) if plan.streams_v else None,
        k_done=plgpu.Barrier(num_arrivals=cw, num_barriers=steps),
        v_done=plgpu.Barrier(num_arrivals=cw, num_barriers=steps) if plan.streams_v else None,
        sched=plgpu.Barrier(num_arrivals=cw) if plan.blocks.pingpong else None,
    )
    return smem, bars


def _launch(plan, q, k, v, row_vecs, key_vecs, kb_mma, ones):
    """Runs the kernel on padded operands; returns (out|None, lse, ent|None, mw|None)."""
    B, Tp, N, D = q.shape
    cw_rows = plan.blocks.compute_wgs * plan.blocks.block_q
    f32 = jnp.float32
    out_types = [
        jax.ShapeDtypeStruct(q.shape, q.dtype) if plan.pv else None,
        jax.ShapeDtypeStruct((B, N, Tp), f32),
        jax.ShapeDtypeStruct((B, N, Tp), f32) if plan.stats else None,
        jax.ShapeDtypeStruct((B, N, Tp), f32) if plan.stats else None,
    ]
    operands = (q, k, v, row_vecs, key_vecs, kb_mma, ones)
    inputs = [x for x in operands if x is not None]
    present = [x is not None for x in operands]

    def entry(*refs):
        refs = list(refs)
        ins = [refs.pop(0) if here else None for here in present]
        outs = [refs.pop(0) if t is not None else None for t in out_types]
        smem_types, bar_types = _scratch(plan)
        pl.run_scoped(lambda smem, bars: _kernel(plan, *ins, *outs, smem, bars),
                      smem_types, bar_types, collective_axes="wg")

    interpret = plgpu.InterpretGPUParams() if plan.interpret else None
    call = plgpu.kernel(
        entry,
        out_type=tuple(t for t in out_types if t is not None),
        grid=(N, Tp // cw_rows, B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=plan.blocks.compute_wgs + 1,
        thread_name="wg",
        # No SMEM reserved for cross-warp reductions: every reduction here is a WGMMA-layout row
        # (within a warp; tests/test_lowering.py), and the 2 KiB let D = 128 take 192-key tiles
        # or 3 stages of 128-key tiles.
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=interpret,
    )
    with interpret_context(plan.interpret):
        results = list(call(*inputs))
    return tuple(results.pop(0) if t is not None else None for t in out_types)


def _round_up(x, m):
    return -(-x // m) * m


def count_visible(mask: MaskSpec, batch: int, q_len: int, kv_len: int, block: int = 512):
    """Number of keys (registers included) each query sees, int32 ``[B, T]``, without a T x S array.

    Closed form for causal / window (at ``mask.offset``) / lengths; with segment ids, a loop
    over key blocks of ``block`` keys (``[B, T, block]`` at a time).

    Args:
      mask: the visibility spec.
      batch: ``B``.
      q_len: ``T``.
      kv_len: ``S``, keys including the ``mask.num_registers`` registers.
      block: key block of the segment-id loop.

    Returns:
      int32 ``[B, T]``; 0 for queries past their length.
    """
    R = mask.num_registers
    S = kv_len - R
    i = jnp.arange(q_len, dtype=jnp.int32)[None, :]
    qpos = i + mask.offset if mask.offset else i  # the query's position among the keys
    hi = jnp.full((batch, 1), S, jnp.int32)
    if mask.kv_lengths is not None:
        hi = jnp.minimum(hi, mask.kv_lengths.astype(jnp.int32)[:, None])
    lo = jnp.zeros((batch, 1), jnp.int32)
    if mask.is_causal:
        hi = jnp.minimum(hi, qpos + 1)
    if mask.local_window_size is not None:
        left, right = mask.local_window_size
        lo = jnp.maximum(lo, qpos - left)
        hi = jnp.minimum(hi, qpos + right + 1)
    # keys [lo, hi) of [0, S); clipped, an empty range stays empty (hi <= lo)
    lo, hi = jnp.clip(lo, 0, S), jnp.clip(hi, 0, S)
    lo, hi = jnp.broadcast_to(lo, (batch, q_len)), jnp.broadcast_to(hi, (batch, q_len))
    if mask.q_segment_ids is None:
        count = jnp.maximum(hi - lo, 0)
    else:
        count = _count_same_segment(mask.q_segment_ids, mask.kv_segment_ids, lo, hi, block)
    count = count + R
    if mask.q_lengths is not None:
        count = jnp.where(i < mask.q_lengths.astype(jnp.int32)[:, None], count, 0)
    return count.astype(jnp.int32)


def _count_same_segment(q_seg, kv_seg, lo, hi, block):
    """``#{j in [lo, hi): kv_seg[j] == q_seg[i]}`` per (b, i), looping over key blocks."""
    B, S = kv_seg.shape
    Sp = _round_up(S, block)
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, Sp - S)))

    def body(n, count):
        j = (n * block + jnp.arange(block, dtype=jnp.int32))[None, None, :]  # [1, 1, blk]
        ks = lax.dynamic_slice_in_dim(kv_seg, n * block, block, axis=1)  # [B, blk]
        hit = (q_seg[:, :, None] == ks[:, None, :]) & (j >= lo[..., None]) & (j < hi[..., None])
        return count + jnp.sum(hit, axis=-1, dtype=jnp.int32)

    return lax.fori_loop(0, Sp // block, body, jnp.zeros(q_seg.shape, jnp.int32))


def _check_inputs(q, k, v, logit_scale):
    if q.ndim != 4 or k.ndim != 4 or (v is not None and v.ndim != 4):
        raise ValueError("q, k, v must be [B, T, N, H], [B, S, K, H], [B, S, K, Hv]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is None:
            continue
        if x.dtype not in (jnp.bfloat16, jnp.float16):
            raise NotImplementedError(
                f"the Pallas forward kernel takes bfloat16 or float16 {name}, got {x.dtype} "
                "(wgmma has no float32 path here; cast explicitly or use the XLA reference)")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} dtype {x.dtype} differs from q dtype {q.dtype}")
    B, T, N, H = q.shape
    if k.shape[0] != B or k.shape[3] != H or N % k.shape[2]:
        raise ValueError(f"k shape {k.shape} does not match q shape {q.shape}")
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v shape {v.shape} does not match k shape {k.shape}")
    if not isinstance(logit_scale, (int, float)) or isinstance(logit_scale, bool):
        raise TypeError(f"logit_scale must be a python float, got {type(logit_scale).__name__}")
    if not math.isfinite(logit_scale) or logit_scale == 0:
        raise NotImplementedError(f"logit_scale must be finite and nonzero, got {logit_scale}")
    head_dim = max(H, v.shape[3] if v is not None else H)
    if head_dim > 256:
        raise NotImplementedError(f"head dims above 256 are not supported, got {head_dim}")


def _check_row_max(row_max, q):
    B, T, N, _ = q.shape
    shape = jnp.shape(row_max)
    try:
        fits = jnp.broadcast_shapes(shape, (B, N, T)) == (B, N, T)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"row_max must broadcast to [B, N, T] = {(B, N, T)}, got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(row_max), jnp.floating):
        raise TypeError(f"row_max must be a float array, got {jnp.result_type(row_max)}")


def _blocks(q, v, config, query_scale, key_bias, defaults=default_block_sizes, **kwargs):
    D = padded_head_dim(max(q.shape[3], v.shape[3] if v is not None else 0), HEAD_DIMS, "forward")
    return D, config or defaults(D, query_scale is not None, key_bias is not None, **kwargs)


def scale_row_max(row_max, factor):
    """The row max of ``factor_i z_ij`` from that of ``z_ij`` (``flash_stats``'s), for a
    nonnegative per-query ``factor``: ``factor_i max_j z_ij``; rows with no visible key stay
    marked as such. What :func:`flash_forward`'s ``row_max`` takes when its ``c`` is ``factor``
    times the sweep's."""
    return jnp.where(row_max <= _EMPTY, MASKED, factor * row_max)


def row_max_from_stats(lse, max_weight):
    """The row max of the base-2 logits from the forward's statistics, up to rounding:
    ``lse log2(e) + log2(max weight)`` (the max weight is ``1 / l`` with ``l`` taken at the
    max); rows with no visible key (max weight 0) get ``MASKED``."""
    seen = max_weight > 0
    return jnp.where(seen, lse * LOG2E + jnp.log2(jnp.where(seen, max_weight, 1.0)), MASKED)


def _prepare(q, k, v, logit_scale, query_scale, key_bias, mask, config, interpret, stats, pv,
             nonneg=False, row_max=None, soft_cap=None, hardmax=False):
    """Pads the operands and builds the per-row / per-key vectors; returns (plan, arrays)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    extra = dict(fixed_max=row_max is not None, masked=is_masked(mask),
                 causal_keys=S if mask.is_causal else 0) if pv else {}
    D, blocks = _blocks(q, v, config, query_scale, key_bias, **extra)
    if not pv and blocks.sweep_skips_v and D > 128 and blocks.block_kv < 128:
        # On the H200 the V-less sweep hit an illegal instruction at
        # D = 256 with 64-key tiles (ping-pong or 2 free warpgroups); 128-key tiles (the default) ran
        raise NotImplementedError(
            f"config: the statistics sweep without V (sweep_skips_v) at head dim {D} needs "
            f"block_kv >= 128, got {blocks.block_kv}")
    Tp = _round_up(T, blocks.compute_wgs * blocks.block_q)
    Sp = _round_up(S, blocks.block_kv)
    R = mask.num_registers
    if mask.offset:
        raise ValueError(f"the kernels take an offset-free MaskSpec, got offset={mask.offset}: "
                         "fold it with pallas_kernels.common.fold_offset first "
                         "(pallas_kernels.flash_attention and flash_entropy do)")
    pad4 = lambda x, n, n_to: jnp.pad(x, ((0, 0), (0, n_to - n), (0, 0), (0, D - x.shape[3])))
    q_p = pad4(q, T, Tp)
    k_p = pad4(k, S, Sp)
    v_p = k_p if v is k else (pad4(v, S, Sp) if v is not None else None)
    kb = kb_mma = ones = None
    if key_bias is not None:
        kb = jnp.broadcast_to(jnp.asarray(key_bias, jnp.float32), (B, K, S)) / logit_scale
        kb = jnp.pad(kb, ((0, 0), (0, 0), (0, Sp - S)))
    mma = blocks.mma_bias and kb is not None and q.dtype == jnp.bfloat16
    if mma:  # [B, Sp, K, 16]: the bias's bf16 parts beside K; Q's side a [1, 1, 1, 0..] tile
        kb_mma = split_bias(jnp.transpose(kb, (0, 2, 1)), q.dtype)  # split in the [B, Sp, K] order
        ones = bias_ones(blocks.block_q, q.dtype)

    has_qid = mask.q_lengths is not None or mask.q_segment_ids is not None
    has_kid = has_qid or mask.kv_lengths is not None
    row_vecs = []
    row_const = None
    if query_scale is None:
        row_const = float(logit_scale * LOG2E)
    else:
        c = jnp.broadcast_to(jnp.asarray(query_scale, jnp.float32), (B, N, T))
        row_vecs.append(jnp.pad(c * (logit_scale * LOG2E), ((0, 0), (0, 0), (0, Tp - T))))
    if has_kid:  # float32 codes: they ride in the float32 row / key vector stacks
        qid, kid = visibility_codes(mask, B, T, S, Tp, Sp, jnp.float32)
    if has_qid:
        row_vecs.append(jnp.broadcast_to(qid[:, None], (B, N, Tp)))
    if row_max is not None:
        m = jnp.broadcast_to(jnp.asarray(row_max, jnp.float32), (B, N, T))
        row_vecs.append(jnp.pad(m, ((0, 0), (0, 0), (0, Tp - T)), constant_values=MASKED))
    key_vecs = []
    if kb is not None and not mma:
        key_vecs.append(kb)
    if has_kid:
        key_vecs.append(jnp.broadcast_to(kid[:, None], (B, K, Sp)))
    stack = lambda xs: jnp.stack(xs, axis=2) if xs else None
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    row_nonneg = bool(nonneg) and query_scale is not None and logit_scale > 0
    plan = _Plan(
        blocks=blocks, head_dim=D, dtype=jnp.dtype(q.dtype), group=N // K, num_registers=R,
        seq_kv=S - R, causal=mask.is_causal, window=mask.local_window_size, row_const=row_const,
        row_nonneg=row_nonneg,
        row_flip=(blocks.fold_scale and query_scale is not None and not row_nonneg
                  and key_bias is None and soft_cap is None and not hardmax),
        soft_cap=None if soft_cap is None else float(soft_cap) * LOG2E,
        has_bias=kb is not None and not mma, mma_bias=mma, has_kid=has_kid, has_qid=has_qid,
        stats=stats, pv=pv, interpret=bool(interpret), fixed_max=row_max is not None,
        hardmax=bool(hardmax))
    return plan, (q_p, k_p, v_p, stack(row_vecs), stack(key_vecs), kb_mma, ones)


def flash_forward(q, k, v, *, logit_scale: float, query_scale=None, key_bias=None,
                  mask: MaskSpec | None = None, config: BlockSizes | None = None, interpret=None,
                  return_stats: bool = False, query_scale_nonnegative: bool = False,
                  row_max=None, logits_soft_cap: float | None = None, hardmax: bool = False):
    """Fused attention forward for the kernel-level problem of :mod:`pallas_kernels.common`.

    .. math::

      z_{ij} = c_i (a \\, q_i \\cdot k_j + b_j), \\quad
      o_i = \\sum_j \\text{softmax}_j(z_{i\\cdot}) v_j, \\quad \\text{lse}_i = \\log \\sum_j e^{z_{ij}}

    Args:
      q: ``[B, T, N, H]`` bfloat16 or float16.
      k: ``[B, S, K, H]`` (registers first, see ``mask.num_registers``), ``N % K == 0``.
      v: ``[B, S, K, Hv]``.
      logit_scale: the python float ``a`` (nonzero).
      query_scale: ``c``, float32 broadcastable to ``[B, N, T]``, or None for 1.
      key_bias: ``b``, float32 ``[B, K, S]``, or None for 0.
      mask: a :class:`~pallas_kernels.common.MaskSpec`.
      config: :class:`BlockSizes`; None picks :func:`default_block_sizes` (head dim, c, b).
      interpret: run in the Mosaic GPU interpreter; None = when the default backend is the CPU.
      return_stats: also return the entropy and max weight per query.
      query_scale_nonnegative: the caller guarantees ``c >= 0`` (SSMax with ``s >= 0``, adaptive
        temperature's ``beta >= 1``); lets ``BlockSizes.fold_scale`` fuse the per-query scale
        without flipping Q's rows by sign (and with a key bias, which the flip cannot take).
        A negative ``c`` under this promise gives wrong results (the row max would be wrong).
      row_max: the exact row max of the base-2 logits ``max_j z_ij log2(e)``, float32
        broadcastable to ``[B, N, T]`` (``flash_stats(..., return_row_max=True)`` of the same
        logits, times a nonnegative per-query factor if ``c`` carries one), ``<= -5e29`` for rows
        with no visible key; the kernel then skips its online max and rescaling. Only exact
        maxima are safe: a value ``delta`` below the true max scales the row's weights by up to
        ``2^delta`` before the normalisation (overflow past ``delta ~ 127``).
      logits_soft_cap: ``cap > 0`` or None: the softmax sees ``cap tanh(z / cap)``
        (:func:`~pallas_kernels.common.soft_cap_base2`; the folding tiles are off then).
      hardmax: normalise by hardmax instead of softmax: ``o_i`` is the mean of ``v_j`` over the
        keys whose logit equals the row max (ties share equally, as computed in float32 on the
        tile), ``lse_i = max_j z_ij + log(count_i)``, entropy ``log(count_i)``, max weight
        ``1 / count_i``. One sweep: the online max resets the argmax set where it grows. Not with
        ``row_max``.

    Returns:
      ``(out [B, T, N, Hv] in q's dtype, lse [B, N, T] float32)``, and with ``return_stats``
      also ``entropy`` and ``max_weight`` (float32 ``[B, N, T]``). Rows with no visible key give
      zeros everywhere.

    Raises:
      NotImplementedError: float32 inputs, head dims above 256, or a zero logit scale.
      ValueError, TypeError: a ``row_max`` that does not broadcast to ``[B, N, T]`` or is not float.
    """
    _check_inputs(q, k, v, logit_scale)
    if row_max is not None:
        _check_row_max(row_max, q)
        if hardmax:
            raise ValueError("hardmax takes no row_max (its one sweep keeps the online max)")
    mask = MaskSpec() if mask is None else mask

    plan, arrays = _prepare(q, k, v, logit_scale, query_scale, key_bias, mask, config, interpret,
                            stats=return_stats, pv=True, nonneg=query_scale_nonnegative,
                            row_max=row_max, soft_cap=check_soft_cap(logits_soft_cap),
                            hardmax=hardmax)
    out, lse, ent, mw = _run(plan, *arrays)
    T, Hv = q.shape[1], v.shape[3]
    out = out[:, :T, :, :Hv]
    lse = lse[..., :T]
    if return_stats:
        return out, lse, ent[..., :T], mw[..., :T]
    return out, lse


def flash_stats(q, k, *, logit_scale: float, query_scale=None, key_bias=None,
                mask: MaskSpec | None = None, config: BlockSizes | None = None, interpret=None,
                query_scale_nonnegative: bool = False, return_row_max: bool = False,
                logits_soft_cap: float | None = None):
    """The statistics sweep: ``(lse, entropy)`` of ``softmax(z)`` per query, without P @ V.

    The entropy is streamed exactly, ``H_i = lse_i - sum_j p_ij z_ij`` (in nats); the paper's
    ``-sum p log(p + eps)`` differs from it by at most ``n_i * eps`` nats.

    Runs the main kernel with ``v = k`` and the P @ V product skipped; with
    ``BlockSizes.sweep_skips_v`` (the default at D = 64 and 128) the V stream is dropped too.
    Its default tiles (:func:`default_stats_block_sizes`) drop the ping-pong schedule and run 4
    compute warpgroups: ~0.55-0.7 of a forward on the H200 (``docs/kernels.md``).

    Args:
      q, k, logit_scale, query_scale, key_bias, mask, interpret, query_scale_nonnegative,
      logits_soft_cap: as :func:`flash_forward`.
      config: :class:`BlockSizes`; None picks :func:`default_stats_block_sizes`.
      return_row_max: also return the row max of the base-2 logits, ``max_j z_ij log2(e)``
        (``-1e30`` for rows with no visible key): ``flash_forward``'s ``row_max``.

    Returns:
      ``(lse, entropy)``, float32 ``[B, N, T]``; zeros for rows with no visible key. With
      ``return_row_max``, ``(lse, entropy, row_max)``.
    """
    _check_inputs(q, k, None, logit_scale)
    mask = MaskSpec() if mask is None else mask
    config = _blocks(q, k, config, query_scale, key_bias, default_stats_block_sizes)[1]
    plan, arrays = _prepare(q, k, k, logit_scale, query_scale, key_bias, mask, config, interpret,
                            stats=True, pv=False, nonneg=query_scale_nonnegative,
                            soft_cap=check_soft_cap(logits_soft_cap))
    _, lse, ent, row_max = _run(plan, *arrays)
    T = q.shape[1]
    if return_row_max:
        return lse[..., :T], ent[..., :T], row_max[..., :T]
    return lse[..., :T], ent[..., :T]


@functools.partial(jax.jit, static_argnums=0)
def _run(plan, q, k, v, row_vecs, key_vecs, kb_mma=None, ones=None):
    return _launch(plan, q, k, v, row_vecs, key_vecs, kb_mma, ones)
