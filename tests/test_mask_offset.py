"""``MaskSpec.offset``: attention of a block of queries over a block of keys elsewhere in the sequence.

Query ``i`` sits at position ``i + offset`` in the key block's coordinates. The rule lives in
:func:`pallas_kernels.common.visible`; :func:`pallas_kernels.common.fold_offset` turns it into the
causal / window flags the kernels already run, and ``flash_attention`` / ``flash_entropy`` apply it.

* ``visible`` against a brute-force definition on global positions, and ``count_visible`` against
  the sum of ``visible``;
* ``fold_offset``: the folded spec has the same visibility exactly, no offset and window sides
  ``>= 0``; it raises only where the visible band needs a side below 0;
* the kernels (Mosaic GPU interpreter on CPU) with offsets against ``flash_reference`` with the
  same spec: forward and ``jax.vjp`` to ``q, k, v, c, b`` with an lse cotangent;
* what makes the offset useful: causal attention over a whole sequence is the logsumexp merge of
  attention over its key blocks, each at its offset (the reference, and the kernels over a 2 x 2
  ring of chunks).
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops
from pallas_kernels.common import MaskSpec, flash_reference, fold_offset, visible
from pallas_kernels.forward import MASKED, count_visible
from tests.interpreter import needs_interpreter_threads

# ---------------------------------------------------------------------------------------------
# visible / count_visible / fold_offset on small shapes (no kernels)

VB, VT, VS = 2, 6, 8  # batch, queries, sequence keys (registers come on top)
VQ_LEN, VKV_LEN = np.array([6, 4]), np.array([8, 5])
VQ_SEG = np.array([[0, 0, 1, 1, 1, 2], [3, 3, 3, 4, 4, 4]])
VKV_SEG = np.array([[0, 1, 1, 1, 2, 2, 2, 0], [3, 4, 4, 3, 4, 4, 5, 5]])

# (is_causal, local_window_size, num_registers, lengths, segments)
MASKS = [
    (True, None, 0, False, False),
    (True, None, 2, True, False),
    (True, None, 1, False, True),
    (False, (3, 1), 0, False, False),
    (False, (0, 2), 2, True, True),
    (True, (2, 0), 0, False, False),
    (True, (1, 3), 1, True, False),
    (False, (9, 0), 0, False, True),
]
OFFSETS = range(-VT - 3, VS + 5)


def _spec(causal, window, R, lengths, segments, offset):
    extra = {}
    if lengths:
        extra.update(q_lengths=jnp.asarray(VQ_LEN, jnp.int32),
                     kv_lengths=jnp.asarray(VKV_LEN, jnp.int32))
    if segments:
        extra.update(q_segment_ids=jnp.asarray(VQ_SEG, jnp.int32),
                     kv_segment_ids=jnp.asarray(VKV_SEG, jnp.int32))
    return MaskSpec(is_causal=causal, local_window_size=window, num_registers=R, offset=offset,
                    **extra)


def _brute_visible(causal, window, R, lengths, segments, offset, q_start=1000):
    """``[B, T, R + S]`` bool from global positions: query ``i`` at ``q_start + i``, sequence key
    ``p`` at ``q_start - offset + p`` (the key block starts ``offset`` positions earlier)."""
    k_start = q_start - offset
    vis = np.zeros((VB, VT, R + VS), bool)
    for b, i, j in itertools.product(range(VB), range(VT), range(R + VS)):
        if lengths and i >= VQ_LEN[b]:
            continue
        if j < R:  # a register: visible to every valid query
            vis[b, i, j] = True
            continue
        p = j - R
        qg, kg = q_start + i, k_start + p
        ok = True
        if causal:
            ok &= kg <= qg
        if window is not None:
            ok &= qg - window[0] <= kg <= qg + window[1]
        if lengths:
            ok &= p < VKV_LEN[b]
        if segments:
            ok &= VQ_SEG[b, i] == VKV_SEG[b, p]
        vis[b, i, j] = ok
    return vis


def _visible(spec, T=VT, S=None):
    S = VS + spec.num_registers if S is None else S
    vis = visible(spec, jnp.arange(VB)[:, None, None], jnp.arange(T)[None, :, None],
                  jnp.arange(S)[None, None, :])
    return np.broadcast_to(np.asarray(vis), (VB, T, S))


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_visible_matches_global_positions(mask):
    for offset in OFFSETS:
        want = _brute_visible(*mask, offset)
        np.testing.assert_array_equal(_visible(_spec(*mask, offset)), want, err_msg=str(offset))


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_count_visible_is_the_sum_of_visible(mask):
    R = mask[2]
    for offset in OFFSETS:
        spec = _spec(*mask, offset)
        want = _visible(spec).sum(-1)
        # block=4: the segment-id loop runs over more than one key block
        got = np.asarray(count_visible(spec, VB, VT, VS + R, block=4))
        np.testing.assert_array_equal(got, want, err_msg=str(offset))


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_fold_offset_is_exact(mask):
    """The folded spec: offset 0, window sides >= 0, the same visibility bit for bit;
    ``no_keys`` exactly when no (query, sequence key) pair passes the causal / window rule.
    Every causal / window-with-sides->=-0 band lets query 0 see key 0, and every band that does
    is one of them; so NotImplementedError must come exactly when some pair is visible but not
    (0, 0)."""
    causal, window, R = mask[:3]
    for offset in OFFSETS:
        spec = _spec(*mask, offset)
        # the static rule alone (no lengths, segments or registers): which pairs it lets through
        band = _brute_visible(causal, window, 0, False, False, offset)[0]
        try:
            folded, no_keys = fold_offset(spec, VB, VT, VS + R)
        except NotImplementedError as e:
            assert f"offset={offset}" in str(e) and "window side below 0" in str(e)
            assert band.any() and not band[0, 0], offset
            continue
        assert band[0, 0] or not band.any(), offset
        assert folded.offset == 0, offset
        if folded.local_window_size is not None:
            assert min(folded.local_window_size) >= 0, (offset, folded.local_window_size)
        assert no_keys == (not band.any()), offset
        np.testing.assert_array_equal(_visible(folded), _visible(spec), err_msg=str(offset))
        if offset == 0:
            assert folded is spec and not no_keys


def test_fold_offset_table():
    """The mapping of ``fold_offset``'s docstring, over T = 6 queries and S = 8 keys (F = 14)."""
    T, S = 6, 8

    def fold(**kw):
        spec, no_keys = fold_offset(MaskSpec(**kw), 1, T, S)
        return spec.is_causal, spec.local_window_size, no_keys

    assert fold(is_causal=True, offset=-T) == (False, None, True)
    assert fold(is_causal=True, offset=3) == (False, (14, 3), False)
    assert fold(is_causal=True, offset=S - 1) == (False, None, False)
    assert fold(is_causal=True, local_window_size=(4, 2), offset=1) == (False, (3, 1), False)
    assert fold(is_causal=True, local_window_size=(4, 0), offset=2) == (False, (2, 2), False)
    assert fold(local_window_size=(4, 2), offset=-2) == (True, None, False)
    assert fold(local_window_size=(2, 2), offset=-2) == (True, (4, 0), False)
    assert fold(local_window_size=(2, 2), offset=S + 2) == (False, None, True)
    for kw in (dict(is_causal=True, offset=-1), dict(local_window_size=(4, 2), offset=5)):
        with pytest.raises(NotImplementedError, match="window side below 0"):
            fold(**kw)


def test_the_kernels_refuse_an_offset():
    """``flash_forward`` / ``flash_stats`` / ``flash_backward`` run offset-free specs only: an
    offset they would ignore raises before any launch (the ops fold it first)."""
    from pallas_kernels.forward import flash_forward, flash_stats
    q, k = (jax.random.normal(x, (1, 64, 1, 64), jnp.float32).astype(jnp.bfloat16)
            for x in jax.random.split(jax.random.key(3)))
    spec = MaskSpec(is_causal=True, offset=5)
    with pytest.raises(ValueError, match="offset-free.*fold_offset"):
        flash_forward(q, k, k, logit_scale=1.0, mask=spec)
    with pytest.raises(ValueError, match="offset-free.*fold_offset"):
        flash_stats(q, k, logit_scale=1.0, mask=spec)
    from pallas_kernels.backward import flash_backward
    lse = jnp.zeros((1, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="offset-free.*fold_offset"):
        flash_backward(q, k, k, q, lse, q, logit_scale=1.0, mask=spec)


# ---------------------------------------------------------------------------------------------
# The kernels (interpreter) against flash_reference with the same offset spec

B, T, S, N, K, H = 1, 64, 128, 2, 1, 64  # S: all keys, registers included
A = 0.3
# Tolerances: the model of tests/test_pallas_backward.py -- the kernels round P (and dZ) to the
# 16-bit input dtype before the P @ V (and gradient) products, a relative error of 2^-9 per term,
# measured ~3e-3 in relative Frobenius norm for bf16 (here: out 1.8e-3, dq / dk / db 3-5.5e-3,
# dv 2.2e-3, dc 8e-4); the bound is its 1e-2. ``out`` is also
# rounded to bf16 (2^-9 relative) and stays under the same bound. The lse comes from the same
# float32 logits (bf16 products, float32 accumulation) on both sides: float32 rounding only,
# atol 1e-4 / rtol 1e-5 as test_pallas_backward.test_soft_cap. dc and db are float32 sums.
TOL = 1e-2

CAUSAL = dict(is_causal=True)
WINDOW = dict(local_window_size=(24, 8))
LENGTHS = dict(is_causal=True, q_lengths=np.array([T - 5]), kv_lengths=np.array([S - 40]))
# (mask kwargs, registers, offset, expected, per-query scale): "kernel" runs the kernels,
# "empty" returns the empty rows without a kernel call, "raises" is NotImplementedError. The
# per-query scale's gradient with an lse cotangent costs a statistics sweep in the backward
# (~3 s in the interpreter): on in the cases whose folded spec is new to the kernels (a window
# with a far side), a key bias everywhere.
CASES = {
    "causal_all_masked": (CAUSAL, 0, -T, "empty", True),
    "causal_minus_one": (CAUSAL, 0, -1, "raises", True),
    "causal_zero": (CAUSAL, 0, 0, "kernel", False),
    "causal_partial_lengths_registers": (LENGTHS, 2, 37, "kernel", True),
    "causal_past_the_end": (CAUSAL, 0, S - 1, "kernel", False),
    "causal_all_masked_registers": (CAUSAL, 2, -T, "kernel", False),  # the registers stay visible
    "window_all_masked": (WINDOW, 0, -(T + 8), "empty", True),
    "window_first_rows_empty": (WINDOW, 0, -9, "raises", True),
    "window_zero": (WINDOW, 0, 0, "kernel", False),
    "window_partial": (WINDOW, 0, 13, "kernel", True),
    "window_below_the_diagonal": (WINDOW, 0, 25, "raises", True),
    "window_past_the_end": (WINDOW, 0, S + 24, "empty", True),
}


def _kernel_inputs(seed, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(dtype)
    c = jax.random.uniform(ks[3], (B, N, T), jnp.float32, 0.3, 2.0)
    b = jax.random.normal(ks[4], (B, K, S), jnp.float32)
    dout = jax.random.normal(ks[5], (B, T, N, H), jnp.float32).astype(dtype)
    dlse = jax.random.normal(ks[6], (B, N, T), jnp.float32)
    return q, k, v, c, b, dout, dlse


def _mask(kw, R, offset):
    kw = {name: jnp.asarray(x, jnp.int32) if isinstance(x, np.ndarray) else x
          for name, x in kw.items()}
    return MaskSpec(num_registers=R, offset=offset, **kw)


@jax.jit(static_argnames=("a",))
def _reference_vjp(q, k, v, c, b, spec, dout, dlse, a=A):
    """float32 ``(out, lse)`` of the oracle and its ``jax.vjp`` to ``q, k, v, c, b`` at
    ``(dout, dlse)``; jitted (eagerly, each small op compiles on its own)."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (out, lse), vjp = jax.vjp(
        lambda q, k, v, c, b: flash_reference(q, k, v, logit_scale=a, query_scale=c, key_bias=b,
                                              mask=spec), *f32, c, b)
    return out, lse, vjp((dout.astype(jnp.float32), dlse))


_reference = jax.jit(flash_reference, static_argnames=("logit_scale",))


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got))
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


@needs_interpreter_threads
@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_attention_with_offset(name, monkeypatch):
    kw, R, offset, expected, use_c = CASES[name]
    spec = _mask(kw, R, offset)
    q, k, v, c, b, dout, dlse = _kernel_inputs(sorted(CASES).index(name))
    c = c if use_c else None

    def ours(q, k, v, c, b):
        return ops.flash_attention(q, k, v, logit_scale=A, query_scale=c, key_bias=b, mask=spec)

    if expected == "raises":
        with pytest.raises(NotImplementedError, match=f"offset={offset}.*window side below 0"):
            ours(q, k, v, c, b)
        with pytest.raises(NotImplementedError, match="window side below 0"):
            ops.flash_entropy(q, k, logit_scale=A, mask=spec)
        return
    if expected == "empty":  # no kernel may run
        def no_kernel(*args, **kwargs):
            raise AssertionError("a kernel ran for a block with no visible key")
        monkeypatch.setattr(ops, "_flash", no_kernel)
        monkeypatch.setattr(ops, "_entropy", no_kernel)

    (out, lse), vjp = jax.vjp(ours, q, k, v, c, b)
    jax.block_until_ready((out, lse))
    grads = jax.block_until_ready(vjp((dout, dlse)))
    r_out, r_lse, r_grads = _reference_vjp(q, k, v, c, b, spec, dout, dlse)
    assert out.dtype == q.dtype and out.shape == (B, T, N, H) and lse.shape == (B, N, T)
    for g, x in zip(grads, (q, k, v, c, b), strict=True):
        assert (g is None) if x is None else (g.shape == x.shape and g.dtype == x.dtype)
    if expected == "empty":  # the kernels' empty rows, and no gradient anywhere
        assert not np.asarray(r_out).any() and not np.asarray(r_lse).any()
        assert not np.asarray(out, np.float32).any() and not np.asarray(lse).any()
        for g, r in zip(grads, r_grads, strict=True):
            assert (g is None and r is None) or not (np.asarray(g, np.float32).any()
                                                     or np.asarray(r).any())
        ent, row_max = ops.flash_entropy(q, k, logit_scale=A, query_scale=c, mask=spec)
        assert not np.asarray(ent).any()
        np.testing.assert_array_equal(row_max, np.full((B, N, T), MASKED, np.float32))
        dq = jax.grad(lambda q: jnp.sum(ops.flash_entropy(q, k, logit_scale=A, mask=spec)[0]))(q)
        assert dq.shape == q.shape and not np.asarray(dq, np.float32).any()
        return
    assert _rel(out, r_out) <= TOL, ("out", _rel(out, r_out))
    np.testing.assert_allclose(lse, r_lse, atol=1e-4, rtol=1e-5)
    for label, g, r in zip(("dq", "dk", "dv", "dc", "db"), grads, r_grads, strict=True):
        if g is not None or r is not None:
            assert _rel(g, r) <= TOL, (label, _rel(g, r))


@needs_interpreter_threads
def test_flash_entropy_with_offset():
    """The statistics sweep at a partial offset: the entropy ``lse - sum_j p_ij z_ij`` and the
    base-2 row max of the reference's visible logits (float32 on both sides: atol 1e-4)."""
    q, k, *_ = _kernel_inputs(5)
    spec = _mask(LENGTHS, 2, 37)
    ent, row_max = jax.block_until_ready(ops.flash_entropy(q, k, logit_scale=A, mask=spec,
                                                           differentiable=False))
    qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
    z = A * jnp.einsum("btnh,bsnh->bnts", qf, jnp.broadcast_to(kf, (B, S, N, H)),
                       precision=jax.lax.Precision.HIGHEST)
    vis = visible(spec, jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None],
                  jnp.arange(S)[None, None, :])[:, None]
    zm = jnp.where(vis, z, -jnp.inf)
    m = jnp.max(zm, -1)
    seen = jnp.isfinite(m)
    p = jnp.where(vis, jnp.exp(zm - jnp.where(seen, m, 0)[..., None]), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    want_ent = jnp.where(seen, -jnp.sum(jnp.where(vis, p * jnp.log(jnp.where(vis, p, 1.0)), 0), -1),
                         0.0)
    want_max = jnp.where(seen, m * np.log2(np.e), MASKED)
    assert not bool(seen.all())  # q_lengths leaves rows empty
    np.testing.assert_allclose(ent, want_ent, atol=1e-4)
    np.testing.assert_allclose(row_max, want_max, atol=1e-4, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The use: attention over the whole sequence = the merge of attention over its key blocks


def _merge(blocks):
    """Logsumexp merge of ``(out [B, T, N, Hv], lse [B, N, T], count [B, T])`` over key blocks;
    a row that saw no key of a block (``count == 0``, where the kernels give ``lse = 0``) counts
    with weight 0."""
    lses = jnp.stack([jnp.where(n[:, None, :] > 0, lse, -jnp.inf) for _, lse, n in blocks])
    lse = jax.nn.logsumexp(lses, axis=0)
    out = sum(jnp.transpose(jnp.exp(lb - lse), (0, 2, 1))[..., None] * o.astype(jnp.float32)
              for (o, _, _), lb in zip(blocks, lses, strict=True))
    return out, lse


@pytest.mark.parametrize("window, split", [(None, 8), ((5, 0), 3), ((4, 2), 11)])
def test_key_blocks_merge_to_the_whole_sequence(window, split):
    """Causal attention (one register, lengths, segment ids; optionally a window) of all queries
    over all keys equals the merge over key blocks ``[0, split)`` and ``[split, L)``, each at
    offset ``-start`` with lengths and segment ids localized to the block and the register in the
    first block only (the reference; float32, so equal up to rounding)."""
    Bm, L, R, Nm, Hm = 2, 16, 1, 2, 8
    ks = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(ks[0], (Bm, L, Nm, Hm), jnp.float32)
    k = jax.random.normal(ks[1], (Bm, R + L, Nm, Hm), jnp.float32)
    v = jax.random.normal(ks[2], (Bm, R + L, Nm, Hm), jnp.float32)
    kv_len = np.array([L, 13])
    seg = np.array([[0] * 6 + [1] * 10, [2] * 9 + [3] * 7])
    full_spec = MaskSpec(kv_lengths=jnp.asarray(kv_len, jnp.int32),
                         q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg),
                         is_causal=True, local_window_size=window, num_registers=R)
    want = _reference(q, k, v, logit_scale=0.5, mask=full_spec)
    blocks = []
    for start, stop in ((0, split), (split, L)):
        regs = R if start == 0 else 0
        keys = np.r_[np.arange(regs), R + np.arange(start, stop)]
        spec = dataclasses.replace(
            full_spec, num_registers=regs, offset=-start,
            kv_lengths=jnp.asarray(np.clip(kv_len - start, 0, stop - start), jnp.int32),
            kv_segment_ids=jnp.asarray(seg[:, start:stop]))
        out, lse = _reference(q, k[:, keys], v[:, keys], logit_scale=0.5, mask=spec)
        blocks.append((out, lse, count_visible(spec, Bm, L, len(keys))))
    out, lse = _merge(blocks)
    np.testing.assert_allclose(out, want[0], atol=1e-5)
    np.testing.assert_allclose(lse, want[1], atol=1e-5)


@needs_interpreter_threads
def test_ring_of_chunks_with_the_kernels(monkeypatch):
    """Causal attention over 2 x 64 positions as a 2 x 2 ring of 64-position chunks through
    ``flash_attention``: query chunk ``a`` against key chunk ``b`` at offset ``64 (a - b)`` --
    causal (0), every key (64 >= S - 1) and no key at all (-64: no kernel call) -- merged, against
    the float32 reference over the whole sequence (bf16 output rounding and P in bf16: the 1e-2
    relative bound above; the lse is float32: 1e-4)."""
    C = 64
    ks = jax.random.split(jax.random.key(11), 3)
    q, k, v = (jax.random.normal(x, (B, 2 * C, N, H), jnp.float32).astype(jnp.bfloat16) for x in ks)
    want_out, want_lse = _reference(*(x.astype(jnp.float32) for x in (q, k, v)),
                                    logit_scale=A, mask=MaskSpec(is_causal=True))
    runs = []
    flash = ops._flash
    monkeypatch.setattr(ops, "_flash", lambda *args: runs.append(args[5]) or flash(*args))
    outs, lses = [], []
    for a in range(2):
        blocks = []
        for b in range(2):
            spec = MaskSpec(is_causal=True, offset=C * (a - b))
            out, lse = jax.block_until_ready(ops.flash_attention(
                q[:, a * C:(a + 1) * C], k[:, b * C:(b + 1) * C], v[:, b * C:(b + 1) * C],
                logit_scale=A, mask=spec))
            blocks.append((out, lse, count_visible(spec, B, C, C)))
        out, lse = _merge(blocks)
        outs.append(out)
        lses.append(lse)
    assert [(s.is_causal, s.local_window_size, s.offset) for s in runs] == [
        (True, None, 0), (False, None, 0), (True, None, 0)]  # (0, 1) ran no kernel
    out, lse = jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)
    assert _rel(out, want_out) <= TOL
    np.testing.assert_allclose(lse, want_lse, atol=1e-4, rtol=1e-5)
