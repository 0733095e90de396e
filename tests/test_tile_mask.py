"""The kernels' tile-level visibility rule and tile ranges (``pallas_kernels.common.TileMask``)
against the dense rule (``pallas_kernels.common.visible``): integer arithmetic, so every check is
exact. Both kernels read these: a tile range that drops a visible pair, or a tile taken as full
that holds a hidden one, is a wrong gradient or output in every kernel at once."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import MaskSpec, TileMask, codes_visible, visibility_codes, visible


def _dense(causal, window, registers, T, S):
    """``[T, S]`` visibility of ``S`` keys (``registers`` of them registers)."""
    spec = MaskSpec(is_causal=causal, local_window_size=window, num_registers=registers)
    return np.asarray(visible(spec, 0, jnp.arange(T)[:, None], jnp.arange(S)[None, :]))


def _padded(vis, Tp, Sp):
    out = np.zeros((Tp, Sp), bool)
    out[:vis.shape[0], :vis.shape[1]] = vis
    return out


windows = st.one_of(st.none(), st.tuples(st.integers(0, 300), st.integers(0, 300)))


# The examples put a band's edge one index off a tile edge, where an off-by-one in a range shows:
# query 127 (the last of query tile 0) is the first to see key 192 under a right window of 65.
@hypothesis.settings(deadline=None, max_examples=20)
@hypothesis.example(causal=True, window=None, registers=1, T=384, S=257)
@hypothesis.example(causal=False, window=(5, 65), registers=0, T=384, S=256)
@hypothesis.given(causal=st.booleans(), window=windows, registers=st.sampled_from([0, 1, 3, 62]),
                  T=st.sampled_from([128, 384, 512]), S=st.sampled_from([128, 256, 641]))
def test_tile_ranges_cover_visible_keys(causal, window, registers, T, S):
    """Tile skipping never drops a visible (query, key) pair, for the dq kernel's key tiles and
    the dkv kernel's query tiles."""
    bq, bkv = 128, 64
    Tp, Sp = -(-T // bq) * bq, -(-S // bkv) * bkv
    vis = _padded(_dense(causal, window, registers, T, S), Tp, Sp)
    tiles = TileMask(registers, causal, window, S, hide_padded_keys=Sp != S)
    with jax.enable_x64(False):
        for start in range(0, Tp, bq):
            lo, _, _, hi = (int(x) for x in tiles.key_tiles(jnp.int32(start), bq, bkv))
            keys = np.nonzero(vis[start:start + bq].any(0))[0]
            assert keys.size == 0 or (lo * bkv <= keys.min() and keys.max() < hi * bkv)
            assert hi * bkv <= Sp
        for start in range(0, Sp, bkv):
            lo, n = (int(x) for x in tiles.query_tiles(jnp.int32(start), bkv, bq, Tp // bq))
            queries = np.nonzero(vis[:, start:start + bkv].any(1))[0]
            assert queries.size == 0 or (lo * bq <= queries.min() and queries.max() < (lo + n) * bq)


def test_causal_ranges_skip_tiles():
    """Causal: the dq kernel visits the lower triangle of tiles only, the dkv kernel likewise."""
    tiles = TileMask(0, True, None, 512, hide_padded_keys=False)
    with jax.enable_x64(False):
        dq = [int(tiles.key_tiles(jnp.int32(s), 128, 64)[3]) for s in range(0, 512, 128)]
        dkv = [int(tiles.query_tiles(jnp.int32(s), 64, 128, 4)[1]) for s in range(0, 512, 64)]
    assert dq == [2, 4, 6, 8]
    assert dkv == [4, 4, 3, 3, 2, 2, 1, 1]


# 62 registers put the causal edge one key before a 64-key tile's end (a tile one key too wide
# taken as full shows).
@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.example(causal=True, window=None, registers=62, T=128, S=128, bq=64, bkv=64)
@hypothesis.given(causal=st.booleans(), window=windows, registers=st.sampled_from([0, 3, 62]),
                  T=st.sampled_from([128, 200, 384]), S=st.sampled_from([128, 190, 256]),
                  bq=st.sampled_from([64, 128]), bkv=st.sampled_from([64, 128]))
def test_full_tiles_see_every_key(causal, window, registers, T, S, bq, bkv):
    """Neither the backward's per-tile ``tile_is_full`` nor the forward's full key range
    ``[full_lo, full_hi)`` of ``key_tiles`` takes a tile holding a hidden pair as full; and
    without a mask every tile is full."""
    S = S + registers
    Tp, Sp = -(-T // bq) * bq, -(-S // bkv) * bkv
    vis = _padded(_dense(causal, window, registers, T, S), Tp, Sp)
    backward = TileMask(registers, causal, window, S, hide_padded_keys=Sp != S,
                        queries=T if Tp != T else None)
    forward = TileMask(registers, causal, window, S, hide_padded_keys=True)
    cleared = 0
    with jax.enable_x64(False):
        for q0 in range(0, Tp, bq):
            for k0 in range(0, Sp, bkv):
                if bool(backward.tile_is_full(jnp.int32(q0), bq, jnp.int32(k0), bkv)):
                    assert vis[q0:q0 + bq, k0:k0 + bkv].all(), (q0, k0)
                    cleared += 1
            _, full_lo, full_hi, _ = (int(x) for x in forward.key_tiles(jnp.int32(q0), bq, bkv))
            rows = vis[q0:min(q0 + bq, T)]  # the forward drops padded query rows
            assert rows[:, full_lo * bkv:full_hi * bkv].all(), (q0, full_lo, full_hi)
    if not causal and window is None and T % bq == 0 and S % bkv == 0:
        assert cleared == (Tp // bq) * (Sp // bkv)


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(causal=st.booleans(), window=windows, registers=st.sampled_from([0, 2]),
                  lengths=st.booleans(), segments=st.booleans(), seed=st.integers(0, 2**16))
def test_tile_rule_is_the_dense_rule(causal, window, registers, lengths, segments, seed):
    """``TileMask.visible`` with the codes of ``visibility_codes`` (the kernels' evaluation, on
    padded index tiles) equals ``visible`` (the reference's) on every real (query, key) pair, and
    hides every padded key and query row."""
    B, T, S, Tp, Sp = 2, 70, 90, 128, 128
    rng = np.random.default_rng(seed)
    kw = {}
    if lengths:
        kw.update(q_lengths=jnp.asarray(rng.integers(0, T + 1, B), jnp.int32),
                  kv_lengths=jnp.asarray(rng.integers(0, S - registers + 1, B), jnp.int32))
    if segments:
        kw.update(q_segment_ids=jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), 1), jnp.int32),
                  kv_segment_ids=jnp.asarray(np.sort(rng.integers(0, 3, (B, S - registers)), 1),
                                             jnp.int32))
    spec = MaskSpec(is_causal=causal, local_window_size=window, num_registers=registers, **kw)
    codes = bool(kw)
    tiles = TileMask(registers, causal, window, S, hide_padded_keys=True, queries=T,
                     has_codes=codes)
    qcode, kcode = visibility_codes(spec, B, T, S, Tp, Sp) if codes else (None, None)
    qi, kj = jnp.arange(Tp)[:, None], jnp.arange(Sp)[None, :]
    for b in range(B):
        got = tiles.visible(qi, kj, None if qcode is None else qcode[b][:, None],
                            None if kcode is None else kcode[b][None, :])
        want = _padded(np.asarray(visible(spec, b, qi[:T], kj[:, :S])), Tp, Sp)
        np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), (Tp, Sp)), want)


def test_no_mask_is_none_and_codes_without_query_codes():
    """Nothing to hide: ``visible`` says None (the kernels skip the mask); key lengths alone (no
    query codes) hide only the invalid keys."""
    assert TileMask(2, False, None, 128, hide_padded_keys=False).visible(
        jnp.arange(4)[:, None], jnp.arange(8)[None, :]) is None
    assert not TileMask(2, False, None, 128, hide_padded_keys=False).masks_tiles
    kcode = jnp.asarray([-3, -3, 0, 0, -2, -2], jnp.int32)
    np.testing.assert_array_equal(np.asarray(codes_visible(None, kcode)),
                                  [True, True, True, True, False, False])
