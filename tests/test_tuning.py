"""The default tiles read from :mod:`pallas_kernels.tuning` are the ones the code chose before
they became data: every head dim and flag combination against a literal table (no kernel runs).

The expected values below were taken from the selection code as it was before the tables moved
(``default_block_sizes`` / ``default_stats_block_sizes`` / ``default_backward_block_sizes`` with their tile
tables in ``forward.py`` and ``backward.py``); a change of a tuned entry must change them here too.
"""

import dataclasses
import itertools

import jax
import pytest

from pallas_kernels import tuning
from pallas_kernels.backward import BackwardBlockSizes, default_backward_block_sizes, fuses_entropy_grad
from pallas_kernels.forward import (
    DEFAULT_BLOCK_SIZES,
    BlockSizes,
    _blocks,
    default_block_sizes,
    default_stats_block_sizes,
)

KINDS = (None, "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB",
         "cpu")
FT = (False, True)

# Names: key tile x stages, f fold_scale, m mma_bias; /s2, /s4 the statistics sweep's layout
# (2 or 4 free-running warpgroups, no V stream). Field order of BlockSizes: block_q, block_kv,
# max_concurrent_steps, fold_scale, mma_bias, compute_wgs, pingpong, intra_overlap, sweep_skips_v,
# heavy_first (exp2_fma_cols, last, is 0 in every entry).
FWD = {
    "64x2": (64, 64, 2, False, False, 2, True, False, False, True),
    "64x2f": (64, 64, 2, True, False, 2, True, False, False, True),
    "128x2/s2": (64, 128, 2, False, False, 2, False, False, True, True),
    "128x2f/s2": (64, 128, 2, True, False, 2, False, False, True, True),
    "128x2f": (64, 128, 2, True, False, 2, True, False, False, True),
    "128x2f/s4": (64, 128, 2, True, False, 4, False, False, True, True),
    "128x2fm": (64, 128, 2, True, True, 2, True, False, False, True),
    "128x2fm/s4": (64, 128, 2, True, True, 4, False, False, True, True),
    "256x2f": (64, 256, 2, True, False, 2, True, False, False, True),
    "256x2fm": (64, 256, 2, True, True, 2, True, False, False, True),
    "256x3f": (64, 256, 3, True, False, 2, True, False, False, True),
}
# Names: dq64 / dq128 the dq kernel's key tile, db mma_db, split dkv_split (one warpgroup).
# Field order of BackwardBlockSizes: block_q_dq, block_kv_dq, block_q_dkv, block_kv_dkv, compute_wgs,
# max_concurrent_steps, dq_edge_masks, dkv_edge_masks, mma_bias, mma_db, overlap, dc_mma,
# dc_center_lse, dq_heavy_first, dkv_split.
BWD = {
    "split": (64, 64, 64, 64, 1, 2, False, False, False, False, False, False, False, True, True),
    "dq64": (64, 64, 64, 64, 2, 2, False, True, True, False, True, False, False, True, False),
    "dq128": (64, 128, 64, 64, 2, 2, False, True, True, False, True, True, False, True, False),
    "dq128db": (64, 128, 64, 64, 2, 2, False, True, True, True, True, True, False, True, False),
    "dq64db": (64, 64, 64, 64, 2, 2, False, True, True, True, False, False, False, True, False),
    "dq64split": (64, 64, 64, 64, 2, 2, False, True, True, False, True, False, False, True, True),
}
# default_backward_block_sizes(H, True, masked, entropy_grad=True) for masked in (F, T), and
# fuses_entropy_grad(H, masked).
ENTROPY = {64: (("dq128db", True), ("dq64db", True)),
           128: (("dq64split", True), ("dq64split", False)),
           256: (("split", False), ("split", False))}
CAUSAL_KEYS = (0, 1024, 2048, 2049, 4096)
# default_block_sizes(D, c, b, fixed_max=fm, masked=m, causal_keys=k) for k in CAUSAL_KEYS.
FORWARD = {
    (64, False, False, False, False): ("256x3f", "128x2f", "128x2f", "256x3f", "256x3f"),
    (64, False, False, False, True): ("256x3f", "128x2f", "128x2f", "256x3f", "256x3f"),
    (64, False, False, True, False): ("256x3f", "128x2f", "128x2f", "256x3f", "256x3f"),
    (64, False, False, True, True): ("256x3f", "128x2f", "128x2f", "256x3f", "256x3f"),
    (64, False, True, False, False): "256x2fm",
    (64, False, True, False, True): "256x2fm",
    (64, False, True, True, False): "256x2fm",
    (64, False, True, True, True): "256x2fm",
    (64, True, False, False, False): "128x2f",
    (64, True, False, False, True): "128x2f",
    (64, True, False, True, False): "256x2f",
    (64, True, False, True, True): "128x2f",
    (64, True, True, False, False): "128x2fm",
    (64, True, True, False, True): "128x2fm",
    (64, True, True, True, False): "128x2fm",
    (64, True, True, True, True): "128x2fm",
    (128, False, False, False, False): "128x2f",
    (128, False, False, False, True): "128x2f",
    (128, False, False, True, False): "128x2f",
    (128, False, False, True, True): "128x2f",
    (128, False, True, False, False): "128x2fm",
    (128, False, True, False, True): "128x2fm",
    (128, False, True, True, False): "128x2fm",
    (128, False, True, True, True): "128x2fm",
    (128, True, False, False, False): "128x2f",
    (128, True, False, False, True): "128x2f",
    (128, True, False, True, False): "128x2f",
    (128, True, False, True, True): "128x2f",
    (128, True, True, False, False): "128x2fm",
    (128, True, True, False, True): "128x2fm",
    (128, True, True, True, False): "128x2fm",
    (128, True, True, True, True): "128x2fm",
    (192, False, False, False, False): "64x2",
    (192, False, False, False, True): "64x2",
    (192, False, False, True, False): "64x2",
    (192, False, False, True, True): "64x2",
    (192, False, True, False, False): "64x2",
    (192, False, True, False, True): "64x2",
    (192, False, True, True, False): "64x2",
    (192, False, True, True, True): "64x2",
    (192, True, False, False, False): "64x2",
    (192, True, False, False, True): "64x2",
    (192, True, False, True, False): "64x2",
    (192, True, False, True, True): "64x2",
    (192, True, True, False, False): "64x2",
    (192, True, True, False, True): "64x2",
    (192, True, True, True, False): "64x2",
    (192, True, True, True, True): "64x2",
    (256, False, False, False, False): "64x2",
    (256, False, False, False, True): "64x2",
    (256, False, False, True, False): "64x2",
    (256, False, False, True, True): "64x2",
    (256, False, True, False, False): "64x2",
    (256, False, True, False, True): "64x2",
    (256, False, True, True, False): "64x2",
    (256, False, True, True, True): "64x2",
    (256, True, False, False, False): "64x2f",
    (256, True, False, False, True): "64x2f",
    (256, True, False, True, False): "64x2f",
    (256, True, False, True, True): "64x2f",
    (256, True, True, False, False): "64x2",
    (256, True, True, False, True): "64x2",
    (256, True, True, True, False): "64x2",
    (256, True, True, True, True): "64x2",
}
# The forward's and the statistics sweep's tiles of a q / v head dim, padded by the kernels'
# wrapper, for (c, b) = (F, F), (F, T), (T, F), (T, T).
PADDED_FWD = {
    32: ("256x3f", "256x2fm", "128x2f", "128x2fm"),
    64: ("256x3f", "256x2fm", "128x2f", "128x2fm"),
    96: ("128x2f", "128x2fm", "128x2f", "128x2fm"),
    128: ("128x2f", "128x2fm", "128x2f", "128x2fm"),
    160: ("64x2", "64x2", "64x2", "64x2"),
    192: ("64x2", "64x2", "64x2", "64x2"),
    200: ("64x2", "64x2", "64x2f", "64x2"),
    256: ("64x2", "64x2", "64x2f", "64x2"),
}
PADDED_STATS = {
    32: ("128x2f/s4", "128x2fm/s4", "128x2f/s4", "128x2fm/s4"),
    64: ("128x2f/s4", "128x2fm/s4", "128x2f/s4", "128x2fm/s4"),
    96: ("128x2f/s4", "128x2fm/s4", "128x2f/s4", "128x2fm/s4"),
    128: ("128x2f/s4", "128x2fm/s4", "128x2f/s4", "128x2fm/s4"),
    160: ("64x2", "64x2", "64x2", "64x2"),
    192: ("64x2", "64x2", "64x2", "64x2"),
    200: ("128x2/s2", "128x2/s2", "128x2f/s2", "128x2/s2"),
    256: ("128x2/s2", "128x2/s2", "128x2f/s2", "128x2/s2"),
}
# default_stats_block_sizes(D, c, b) for (c, b) = (F, F), (F, T), (T, F), (T, T).
STATS = {
    64: ("128x2f/s4", "128x2fm/s4", "128x2f/s4", "128x2fm/s4"),
    128: ("128x2f/s4", "128x2fm/s4", "128x2f/s4", "128x2fm/s4"),
    192: ("64x2", "64x2", "64x2", "64x2"),
    256: ("128x2/s2", "128x2/s2", "128x2f/s2", "128x2/s2"),
}
# default_backward_block_sizes(H, c, masked, grad) for (c, masked, grad) in
# itertools.product((F, T), repeat=3).
BACKWARD = {
    32: "dq128db",
    48: "dq128db",
    64: "dq128db",
    96: ("dq128", "dq128", "dq128", "dq128", "dq128", "dq128", "dq128", "dq64"),
    128: ("dq128", "dq128", "dq128", "dq128", "dq128", "dq128", "dq128", "dq64"),
    160: "split",
    192: "split",
    200: "split",
    256: "split",
}


def _fwd(name):
    return BlockSizes(*FWD[name])


def _bwd(name):
    return BackwardBlockSizes(*BWD[name])


def test_literal_field_order():
    fields = dataclasses.fields(BlockSizes)
    # FWD's rows name the first 10; the last keeps its default (0: no exponentials on the FMA pipe)
    assert len(fields) == 11 and fields[-1].name == "exp2_fma_cols" and fields[-1].default == 0
    # BWD's rows name the first 15; exp2_fma_cols (last) keeps its default in every entry
    bwd = dataclasses.fields(BackwardBlockSizes)
    assert len(bwd) == 16 and bwd[-1].name == "exp2_fma_cols" and bwd[-1].default == 0


@pytest.mark.parametrize("kind", KINDS)
def test_forward_defaults(kind):
    for (D, c, b, fixed_max, masked), row in FORWARD.items():
        row = row if isinstance(row, tuple) else (row,) * len(CAUSAL_KEYS)
        for keys, name in zip(CAUSAL_KEYS, row, strict=True):
            got = default_block_sizes(D, c, b, fixed_max=fixed_max, masked=masked, causal_keys=keys,
                                      device_kind=kind)
            assert got == _fwd(name), (kind, D, c, b, fixed_max, masked, keys)


@pytest.mark.parametrize("kind", KINDS)
def test_stats_defaults(kind):
    for D, row in STATS.items():
        for (c, b), name in zip(itertools.product(FT, FT), row, strict=True):
            assert default_stats_block_sizes(D, c, b, device_kind=kind) == _fwd(name), (kind, D, c, b)


def test_padded_head_dims():
    """The kernels' wrappers pad the head dim (32 -> 64, 96 -> 128, 160 -> 192, 200 -> 256)."""
    for Dq in PADDED_FWD:
        q = jax.ShapeDtypeStruct((1, 8, 1, Dq), "bfloat16")
        row = zip(PADDED_FWD[Dq], PADDED_STATS[Dq], strict=True)
        for (c, b), (fwd, stats) in zip(itertools.product(FT, FT), row, strict=True):
            scale, bias = (object() if c else None), (object() if b else None)
            assert _blocks(q, q, None, scale, bias)[1] == _fwd(fwd), (Dq, c, b)
            assert _blocks(q, q, None, scale, bias, default_stats_block_sizes)[1] == _fwd(stats), (Dq, c, b)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_defaults(kind):
    for H, row in BACKWARD.items():
        row = row if isinstance(row, tuple) else (row,) * 8
        for (c, masked, grad), name in zip(itertools.product(FT, repeat=3), row, strict=True):
            got = default_backward_block_sizes(H, c, masked, grad, device_kind=kind)
            assert got == _bwd(name), (kind, H, c, masked, grad)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_entropy_defaults(kind):
    """The backward's tiles with the entropy term fused, and where the library fuses it."""
    for H, row in ENTROPY.items():
        for masked, (name, fused) in zip(FT, row, strict=True):
            got = default_backward_block_sizes(H, True, masked, entropy_grad=True, device_kind=kind)
            assert got == _bwd(name), (kind, H, masked)
            assert fuses_entropy_grad(H, masked, device_kind=kind) is fused, (kind, H, masked)


def test_tables():
    assert DEFAULT_BLOCK_SIZES == {64: _fwd("256x3f"), 128: _fwd("128x2f"),
                                   192: _fwd("64x2"), 256: _fwd("64x2")}
    assert tuning.table("NVIDIA H100 80GB HBM3") is tuning.table("NVIDIA H200") is tuning.SM90
    assert tuning.table("cpu") is tuning.SM90
    with pytest.raises(KeyError):
        default_block_sizes(96)
    with pytest.raises(NotImplementedError):
        default_backward_block_sizes(257)
    for section in ("forward", "backward"):
        for (_, case) in tuning.SM90[section]:
            assert case in tuning.FALLBACK
