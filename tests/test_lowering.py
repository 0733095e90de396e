"""The kernels lowered for the GPU (``lowering_platforms=("cuda",)``) on the CPU: no device needed.

Mosaic GPU checks a kernel's shared memory at lowering time against the sm90 limit (227 KiB when no
device says otherwise), so an SMEM overflow of a default configuration shows up here, not first on
the H100. The kernels also lower with ``reduction_scratch_bytes=0`` (the forward's compiler params):
Mosaic reserves that SMEM for reductions across warps, and every reduction of these kernels stays
within a warp (WGMMA-layout rows); a spy on the lowering's scratch requests checks that.
"""

import traceback

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.mosaic_gpu import lowering as mgpu_lowering

from pallas_kernels.backward import flash_backward
from pallas_kernels.common import MaskSpec
from pallas_kernels.forward import BlockSizes, _prepare, flash_forward, flash_stats

B, T, N = 1, 1024, 2


@pytest.fixture
def reduction_scratch(monkeypatch):
    """The SMEM scratch views that reductions request while lowering (should stay empty)."""
    requests, real = [], mgpu_lowering.ModuleContext.scratch_view

    def spy(self, *args, **kwargs):
        if any("reduce" in frame.name for frame in traceback.extract_stack(limit=4)):
            requests.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mgpu_lowering.ModuleContext, "scratch_view", spy)
    return requests


def _lower(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _operands(D):
    x = jax.ShapeDtypeStruct((B, T, N, D), jnp.bfloat16)
    row = jax.ShapeDtypeStruct((B, N, T), jnp.float32)
    return x, row


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("flags", ["plain", "c", "b", "cb"])
@pytest.mark.parametrize("causal", [False, True])
def test_default_kernels_fit_smem(reduction_scratch, D, flags, causal):
    """Every kernel at its default configuration lowers for sm90 (fits the SMEM limit) and no
    reduction asks for cross-warp scratch."""
    x, row = _operands(D)
    c = row if "c" in flags else None
    b = row if "b" in flags else None
    mask = MaskSpec(is_causal=causal)

    def forward(q, k, v, c, b):
        return flash_forward(q, k, v, logit_scale=0.1, query_scale=c, key_bias=b, mask=mask,
                             query_scale_nonnegative=c is not None, interpret=False)

    def stats(q, k, c, b):
        return flash_stats(q, k, logit_scale=0.1, query_scale=c, key_bias=b, mask=mask,
                           query_scale_nonnegative=c is not None, interpret=False)

    def backward(q, k, v, o, lse, do, c, b):
        return flash_backward(q, k, v, o, lse, do, logit_scale=0.1, query_scale=c, key_bias=b,
                              mask=mask, interpret=False)

    _lower(forward, x, x, x, c, b)
    _lower(stats, x, x, c, b)
    _lower(backward, x, x, x, x, row, x, c, b)
    assert not reduction_scratch


@pytest.mark.parametrize("D", [64, 128, 256])
def test_signed_scale_row_flip_lowers(reduction_scratch, D):
    """A per-query scale without the nonnegative promise: the folding defaults (D = 64, 128, and 256
    with ``c``) negate Q's rows in shared memory (row_flip); forward and sweep lower for
    sm90 and fit SMEM."""
    x, row = _operands(D)
    q = jnp.ones(x.shape, x.dtype)
    assert _prepare(q, q, q, 0.1, jnp.ones(row.shape), None, MaskSpec(), None, False, stats=False,
                    pv=True)[0].row_flip
    forward = lambda q, k, v, c: flash_forward(q, k, v, logit_scale=0.1, query_scale=c, mask=MaskSpec(),
                                               interpret=False)
    stats = lambda q, k, c: flash_stats(q, k, logit_scale=0.1, query_scale=c, mask=MaskSpec(),
                                        interpret=False)
    _lower(forward, x, x, x, row)
    _lower(stats, x, x, row)
    assert not reduction_scratch


@pytest.mark.parametrize("block_kv, steps, fits", [(192, 2, True), (128, 3, True), (256, 2, False)])
def test_d128_forward_tiles_against_the_smem_limit(reduction_scratch, block_kv, steps, fits):
    """D = 128 softmax forward: 192-key tiles (2 stages) and 128-key tiles in 3 stages fit only
    without the reduction scratch (232536 / 232568 bytes with it, limit 232448); 256-key tiles do
    not fit at all."""
    x, _ = _operands(128)
    cfg = BlockSizes(block_q=64, block_kv=block_kv, max_concurrent_steps=steps, fold_scale=True)

    def forward(q, k, v):
        return flash_forward(q, k, v, logit_scale=0.1, config=cfg, interpret=False)

    if fits:
        _lower(forward, x, x, x)
    else:
        with pytest.raises(ValueError, match="shared memory"):
            _lower(forward, x, x, x)
    assert not reduction_scratch


@pytest.mark.parametrize("skip_v, fits", [(False, False), (True, True)])
def test_stats_sweep_without_v_frees_its_smem(reduction_scratch, skip_v, fits):
    """The statistics sweep at D = 128 with 3 free-running warpgroups and 256-key tiles in 2 stages:
    over the SMEM limit with the (unused) V ring, inside it without (``sweep_skips_v``)."""
    x, _ = _operands(128)
    cfg = BlockSizes(block_q=64, block_kv=256, max_concurrent_steps=2, compute_wgs=3,
                     pingpong=False, sweep_skips_v=skip_v)

    def stats(q, k):
        return flash_stats(q, k, logit_scale=0.1, config=cfg, interpret=False)

    if fits:
        _lower(stats, x, x)
    else:
        with pytest.raises(ValueError, match="shared memory"):
            _lower(stats, x, x)
    assert not reduction_scratch


def test_heavy_first_lowers(reduction_scratch):
    """The causal launch order (``BlockSizes.heavy_first``, ``BackwardBlockSizes.dq_heavy_first``)
    lowers for sm90: the reversed tile index is plain scalar arithmetic on the grid index."""
    import dataclasses

    from pallas_kernels.backward import default_backward_block_sizes
    from pallas_kernels.forward import default_block_sizes, default_stats_block_sizes
    x, row = _operands(64)
    mask = MaskSpec(is_causal=True)
    fwd_cfg = dataclasses.replace(default_block_sizes(64), heavy_first=True)
    stats_cfg = dataclasses.replace(default_stats_block_sizes(64), heavy_first=True)
    bwd_cfg = dataclasses.replace(default_backward_block_sizes(64, True), dq_heavy_first=True)
    _lower(lambda q, k, v: flash_forward(q, k, v, logit_scale=0.1, mask=mask, config=fwd_cfg,
                                         interpret=False), x, x, x)
    _lower(lambda q, k: flash_stats(q, k, logit_scale=0.1, mask=mask, config=stats_cfg,
                                    interpret=False), x, x)
    _lower(lambda q, k, v, o, lse, do, c: flash_backward(
        q, k, v, o, lse, do, logit_scale=0.1, query_scale=c, mask=mask, config=bwd_cfg,
        interpret=False), x, x, x, x, row, x, row)
    assert not reduction_scratch


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_row_flip_lowers(reduction_scratch, D, causal):
    """A per-query scale of unknown sign at the folding defaults (D = 64 / 128): the forward and
    the statistics sweep negate Q's rows in SMEM where ``r < 0`` (``_Plan.row_flip``) and lower."""
    x, row = _operands(D)
    mask = MaskSpec(is_causal=causal)
    zeros = jnp.zeros(x.shape, x.dtype)
    for v, pv in ((zeros, True), (None, False)):
        plan = _prepare(zeros, zeros, v, 0.1, jnp.ones(row.shape), None, mask, None, False,
                        stats=not pv, pv=pv)[0]
        assert plan.row_flip
    _lower(lambda q, k, v, c: flash_forward(q, k, v, logit_scale=0.1, query_scale=c, mask=mask,
                                            interpret=False), x, x, x, row)
    _lower(lambda q, k, c: flash_stats(q, k, logit_scale=0.1, query_scale=c, mask=mask,
                                       interpret=False), x, x, row)
    assert not reduction_scratch


@pytest.mark.parametrize("cols", [16, 24, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_exp2_on_the_fma_pipe_lowers(reduction_scratch, cols, causal):
    """``BlockSizes.exp2_fma_cols`` (the polynomial's bit casts, integer shift and barrier on a
    column slice of the WGMMA layout) lowers for sm90 in the forward and the statistics sweep,
    and changes the kernel: a flag the lowering dropped would leave it as without it."""
    import dataclasses

    from benchmarks.same_kernels import lowering_digest
    from pallas_kernels.forward import default_block_sizes, default_stats_block_sizes
    x, row = _operands(64)
    mask = MaskSpec(is_causal=causal)
    fwd_cfg = default_block_sizes(64, True, False, masked=causal)
    sweep_cfg = default_stats_block_sizes(64, True, False)
    digests = []
    for n in (0, cols):
        f_cfg = dataclasses.replace(fwd_cfg, exp2_fma_cols=n)
        s_cfg = dataclasses.replace(sweep_cfg, exp2_fma_cols=n)
        forward = jax.jit(lambda q, k, v, c, f_cfg=f_cfg: flash_forward(
            q, k, v, logit_scale=0.1, query_scale=c, mask=mask, config=f_cfg,
            query_scale_nonnegative=True, interpret=False))
        stats = jax.jit(lambda q, k, c, s_cfg=s_cfg: flash_stats(
            q, k, logit_scale=0.1, query_scale=c, mask=mask, config=s_cfg,
            query_scale_nonnegative=True, interpret=False))
        digests.append((lowering_digest(forward, x, x, x, row)[1], lowering_digest(stats, x, x, row)[1]))
    assert len(digests) == 2 and digests[0][0] != digests[1][0] and digests[0][1] != digests[1][1]
    assert not reduction_scratch


@pytest.mark.parametrize("cols", [16, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_exp2_on_the_fma_pipe_lowers(reduction_scratch, cols, causal):
    """``BackwardBlockSizes.exp2_fma_cols`` lowers for sm90 in the dq and dk/dv kernels with the
    entropy term fused (``p`` and ``p0`` on the polynomial) and changes the lowered kernels."""
    import dataclasses

    from benchmarks.same_kernels import lowering_digest
    from pallas_kernels.backward import default_backward_block_sizes
    from pallas_kernels.common import BaseEntropy
    x, row = _operands(64)
    mask = MaskSpec(is_causal=causal)
    base = default_backward_block_sizes(64, True, causal, entropy_grad=True)
    digests = []
    for n in (0, cols):
        cfg = dataclasses.replace(base, exp2_fma_cols=n)
        backward = jax.jit(lambda q, k, v, o, lse, do, c, h, cfg=cfg: flash_backward(
            q, k, v, o, lse, do, logit_scale=0.1, query_scale=c, mask=mask, config=cfg,
            base_entropy=BaseEntropy(lse, h, c), interpret=False))
        digests.append(lowering_digest(backward, x, x, x, x, row, x, row, row)[1])
    assert digests[0] != digests[1]
    assert not reduction_scratch
