"""jaxattn.model: rotary position embeddings (the formula, relative positions, the attention hook)
and the Transformer's position options (RoPE past the training length, learned positions bounded)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn
from jaxattn.data import VOCAB_SIZE, TextBatches, load_pydoc_bytes
from jaxattn.model import Block, Transformer, make_optimizer, rope, train_step


def _normal(shape, seed=0, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _rotation_matrix(m, h, base):
    """The paper's R^d_{Theta,m} (Su et al. 2021, Eq. 15): 2x2 blocks [[cos, -sin], [sin, cos]] at
    angles m theta_i, theta_i = base^(-2(i-1)/d), i = 1..d/2, written out entry by entry."""
    r = np.zeros((h, h))
    for i in range(h // 2):
        angle = m * base ** (-2.0 * i / h)
        r[2 * i, 2 * i], r[2 * i, 2 * i + 1] = np.cos(angle), -np.sin(angle)
        r[2 * i + 1, 2 * i], r[2 * i + 1, 2 * i + 1] = np.sin(angle), np.cos(angle)
    return r


def test_rope_matches_the_papers_rotation_matrices():
    t, n, h, base = 7, 2, 6, 100.0
    x = _normal((2, t, n, h))
    positions = np.array([0, 1, 2, 5, 17, 300, 4095])
    got = np.asarray(rope(x, jnp.asarray(positions), base=base))
    want = np.einsum("TGH,BTNH->BTNG", np.stack([_rotation_matrix(m, h, base) for m in positions]),
                     np.asarray(x))
    # float64 throughout: angles up to 4095 rad carry |m| 2^-53 ~ 5e-13 rad of rounding, times
    # |x| ~ 3 per pair; 1e-10 is far above that and far below any wrong frequency or pairing
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    assert rope(x.astype(jnp.float32), jnp.asarray(positions)).dtype == jnp.float32
    assert rope(x.astype(jnp.bfloat16), jnp.asarray(positions)).dtype == jnp.bfloat16


def test_rope_scores_depend_on_the_offset_only():
    t, n, h = 12, 3, 8
    q, k = _normal((1, t, n, h), 1), _normal((1, t, n, h), 2)

    def scores(qpos, kpos):
        return np.asarray(jnp.einsum("BTNH,BSNH->BNTS", rope(q, qpos), rope(k, kpos)))

    pos = jnp.arange(t)
    base_scores = scores(pos, pos)
    # shifting every position by c changes no score (float64: rounding ~ |m| 2^-53 |q||k|, with
    # |m| <= 1e4 and |q||k| ~ 10 about 1e-11; 1e-9 leaves room and catches any absolute term)
    for c in (1, 37, 10_000):
        np.testing.assert_allclose(scores(pos + c, pos + c), base_scores, rtol=0, atol=1e-9)
    # shifting the queries only changes them: the offset i - j is what matters
    assert np.abs(scores(pos + 3, pos) - base_scores).max() > 1e-2
    # one query vector and one key vector at every position: the score matrix is Toeplitz,
    # s_ij = f(i - j)
    qq = jnp.broadcast_to(q[:, :1], q.shape)
    kk = jnp.broadcast_to(k[:, :1], k.shape)
    s = np.asarray(jnp.einsum("BTNH,BSNH->BNTS", rope(qq, pos), rope(kk, pos)))[0]
    for d in range(-t + 1, t):
        diag = np.diagonal(s, offset=d, axis1=1, axis2=2)
        np.testing.assert_allclose(diag, diag[:, :1] * np.ones_like(diag), rtol=0, atol=1e-9)
    # ... and not constant along a row (scores do depend on the offset)
    assert np.ptp(s[:, 0, :], axis=-1).min() > 1e-2
    # rotations keep norms
    np.testing.assert_allclose(np.linalg.norm(rope(q, pos + 5), axis=-1),
                               np.linalg.norm(q, axis=-1), rtol=1e-12)


def test_rotary_block_attention_is_attention_on_rotated_queries_and_keys():
    d_model, n = 16, 2  # head dim 8
    block = Block(d_model, n, 32, variant="rbf", num_registers=1, rope=10000.0,
                  rngs=nnx.Rngs(3))
    mha = block.attn
    mha.key_registers[...] = _normal(mha.key_registers.shape, 4, jnp.float32)
    x = _normal((2, 9, d_model), 5, jnp.float32)
    proj = lambda p: jnp.einsum("BTF,FNH->BTNH", x, p.kernel[...])
    pos = jnp.arange(9)
    q, k = rope(proj(mha.query.projection), pos), rope(proj(mha.key.projection), pos)
    v = proj(mha.value)
    # registers are prepended after the projections, un-rotated: position-free sinks
    o = jaxattn.attention(q, k, v, variant="rbf", is_causal=True,
                          registers=(mha.key_registers[...], mha.value_registers[...]))
    want = jnp.einsum("BTNH,NHF->BTF", o, mha.out.kernel[...])
    # float32 sums of 16 and 10 O(1) terms on both sides, one ordering apart: a few ulps
    np.testing.assert_allclose(mha(x, is_causal=True), want, rtol=1e-5, atol=1e-5)
    plain = Block(d_model, n, 32, variant="rbf", num_registers=1, rngs=nnx.Rngs(3))
    assert not hasattr(plain.attn.query, "projection")


def test_rope_transformer_evaluates_beyond_its_training_length():
    kw = dict(num_layers=2, d_model=16, num_heads=2, mlp_dim=32, variant="scalable_softmax",
              num_registers=1, rngs=nnx.Rngs(0))
    model = Transformer(VOCAB_SIZE, 16, positions="rope", **kw)
    assert model.pos is None
    tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, VOCAB_SIZE)
    logits = model(tokens)
    assert logits.shape == (2, 128, VOCAB_SIZE) and np.isfinite(np.asarray(logits)).all()
    # causal attention with relative positions: the first 16 positions of a long input see what a
    # 16-token input sees (SSMax's log n per query depends on the query's position, which agrees);
    # float32, different summation lengths in XLA's reductions: a few ulps of O(1) logits
    np.testing.assert_allclose(logits[:, :16], model(tokens[:, :16]), rtol=1e-5, atol=1e-5)


def test_learned_positions_raise_beyond_max_len():
    model = Transformer(VOCAB_SIZE, 16, num_layers=1, d_model=16, num_heads=2, mlp_dim=32,
                        rngs=nnx.Rngs(0))
    assert model(jnp.zeros((1, 16), jnp.int32)).shape == (1, 16, VOCAB_SIZE)
    with pytest.raises(ValueError, match="T=17 exceeds max_len=16.*positions='rope'"):
        model(jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize("kw, match", [
    (dict(positions="alibi"), "positions must be one of"),
    (dict(positions="rope", d_model=12, num_heads=4), "even head dim"),  # head dim 3
    (dict(positions="rope", rope_base=0.0), "rope_base"),
])
def test_transformer_position_arguments(kw, match):
    args = dict(num_layers=1, d_model=16, num_heads=2, mlp_dim=32) | kw
    with pytest.raises(ValueError, match=match):
        Transformer(VOCAB_SIZE, 8, **args, rngs=nnx.Rngs(0))


def test_rope_bad_arguments():
    with pytest.raises(ValueError, match="head dim H=5 must be even"):
        rope(jnp.ones((3, 1, 5)), jnp.arange(3))
    with pytest.raises(ValueError, match="positions must have shape"):
        rope(jnp.ones((3, 1, 4)), jnp.arange(4))
    with pytest.raises(ValueError, match="x must be"):
        rope(jnp.ones((3, 4)), jnp.arange(3))


def test_rope_transformer_trains():
    tokens = load_pydoc_bytes()
    model = Transformer(VOCAB_SIZE, 32, num_layers=1, d_model=32, num_heads=2, mlp_dim=64,
                        positions="rope", rngs=nnx.Rngs(0))
    opt = make_optimizer(model, 3e-3)
    data = TextBatches(tokens, 32, 8, seed=0)
    losses = [float(train_step(model, opt, jnp.asarray(data.next_train()))) for _ in range(40)]
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.75 * losses[0], losses
