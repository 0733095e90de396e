"""Flax integration: the NNX module, the attention_fn adapter, and training the small model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn
from jaxattn import variants as V
from jaxattn.data import VOCAB_SIZE, TextBatches, load_pydoc_bytes
from jaxattn.model import Transformer, eval_step, make_optimizer, train_step

DIFFERENTIABLE = {
    "softmax": (V.Softmax(), 0),
    "softmax_temperature": (V.Softmax(temperature=0.7), 0),
    "adaptive_temperature": (V.AdaptiveTemperature(), 0),
    "adaptive_temperature_stop_grad": (V.AdaptiveTemperature(stop_gradient_beta=True), 0),
    "scalable_softmax": (V.ScalableSoftmax(), 1),
    "rbf": (V.RBF(), 1),
}


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_module_matches_functional_attention():
    mha = jaxattn.MultiHeadAttention(4, 16, num_kv_heads=2, variant="rbf", num_registers=2,
                                     rngs=nnx.Rngs(0))
    x = _x((2, 5, 16))
    q, k, v = mha.query(x), mha.key(x), mha.value(x)
    regs = (mha.key_registers[...], mha.value_registers[...])
    np.testing.assert_array_equal(regs[0], 0.0)  # RBF registers start at the origin
    ref = mha.out(jaxattn.attention(q, k, v, variant="rbf", is_causal=True, registers=regs))
    np.testing.assert_allclose(mha(x, is_causal=True), ref, rtol=1e-6, atol=1e-6)


def test_module_params_and_grads_reach_variant_parameters():
    mha = jaxattn.MultiHeadAttention(4, 16, variant=V.ScalableSoftmax(0.5), num_registers=1,
                                     rngs=nnx.Rngs(1))
    np.testing.assert_allclose(mha.variant_params["s"][...], np.full(4, 0.5))
    assert float(jnp.abs(mha.key_registers[...]).max()) > 0  # small random for non-RBF
    x = _x((2, 6, 16), seed=3)

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.sum(m(x, is_causal=True) ** 2))(m)

    g = grads(mha)
    for leaf in (g.variant_params["s"], g.key_registers, g.value_registers, g.query.kernel):
        assert float(jnp.abs(leaf[...]).max()) > 0


def test_module_under_remat_matches():
    mha = jaxattn.MultiHeadAttention(2, 8, variant="adaptive_temperature", rngs=nnx.Rngs(2))
    x = _x((1, 7, 8), seed=4)

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x, is_causal=True)))

    plain = nnx.grad(loss)(mha, x)
    remat = nnx.grad(lambda m, x: nnx.remat(loss)(m, x))(mha, x)
    np.testing.assert_allclose(plain.query.kernel[...], remat.query.kernel[...], rtol=1e-5,
                               atol=1e-6)


def test_module_segment_ids_isolate_documents():
    mha = jaxattn.MultiHeadAttention(2, 8, rngs=nnx.Rngs(5))
    x = _x((1, 6, 8), seed=6)
    seg = jnp.array([[0, 0, 0, 1, 1, 1]])
    packed = mha(x, segment_ids=seg)
    np.testing.assert_allclose(packed[:, :3], mha(x[:, :3]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed[:, 3:], mha(x[:, 3:]), rtol=1e-5, atol=1e-6)


def test_module_use_bias_adds_projection_biases():
    # The biases BERT's attention carries: q = x Wq + bq etc. and out = o Wo + bo, checked against
    # softmax attention written out (no jaxattn code on the reference side).
    mha = jaxattn.MultiHeadAttention(2, 8, use_bias=True, rngs=nnx.Rngs(7))
    assert jaxattn.MultiHeadAttention(2, 8, rngs=nnx.Rngs(7)).query.bias is None  # default: none
    for i, proj in enumerate((mha.query, mha.key, mha.value, mha.out)):
        np.testing.assert_array_equal(proj.bias[...], 0.0)  # zero-initialised
        proj.bias[...] = _x(proj.bias.shape, seed=20 + i)
    x = _x((2, 5, 8), seed=8)
    mask = jnp.array([True] * 4 + [False])[None, None, None, :]

    def proj(p, x):
        return jnp.einsum("BTF,FNH->BTNH", x, p.kernel[...]) + p.bias[...][None, None]

    q, k, v = proj(mha.query, x), proj(mha.key, x), proj(mha.value, x)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(4.0)
    p = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    o = jnp.einsum("BNTS,BSNH->BTNH", p, v)
    want = jnp.einsum("BTNH,NHF->BTF", o, mha.out.kernel[...]) + mha.out.bias[...][None, None]
    # float32 sums of 8 and 5 terms of O(1) values: a few ulps, far below 1e-5
    np.testing.assert_allclose(mha(x, mask=mask), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="use_bias"):
        jaxattn.MultiHeadAttention(2, 8, use_bias=1, rngs=nnx.Rngs(0))


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        jaxattn.MultiHeadAttention(4, 16, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="qkv_features"):
        jaxattn.MultiHeadAttention(3, 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_registers"):
        jaxattn.MultiHeadAttention(2, 16, num_registers=-1, rngs=nnx.Rngs(0))


def test_attention_fn_in_nnx_matches_flax_softmax():
    kw = dict(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
    ours = nnx.MultiHeadAttention(attention_fn=jaxattn.attention_fn("softmax"), **kw)
    kw["rngs"] = nnx.Rngs(0)
    theirs = nnx.MultiHeadAttention(**kw)
    x = _x((2, 5, 8))
    mask = nnx.make_causal_mask(jnp.ones((2, 5)))
    np.testing.assert_allclose(ours(x, mask=mask), theirs(x, mask=mask), rtol=1e-5, atol=1e-6)


def test_attention_fn_in_nnx_sows_weights():
    mha = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
                                 attention_fn=jaxattn.attention_fn("hardmax"), rngs=nnx.Rngs(0))
    x = _x((1, 4, 8))
    _, intermediates = nnx.capture(lambda m, x: m(x, sow_weights=True), nnx.Intermediate)(mha, x)
    (weights,) = intermediates["attention_weights"].get_value()
    assert weights.shape == (1, 2, 4, 4)
    np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, rtol=1e-6)
    assert set(np.unique(np.asarray(weights)).tolist()) <= {0.0, 0.5, 1.0, 1 / 3, 0.25}


def test_attention_fn_in_linen_matches_flax_softmax():
    x = _x((2, 5, 8))
    ours = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=jaxattn.attention_fn())
    theirs = nn.MultiHeadDotProductAttention(num_heads=2)
    params = theirs.init(jax.random.key(0), x)
    mask = nn.make_causal_mask(jnp.ones((2, 5)))
    np.testing.assert_allclose(ours.apply(params, x, mask=mask), theirs.apply(params, x, mask=mask),
                               rtol=1e-5, atol=1e-6)


def test_attention_fn_binds_variant_options_and_rejects_dropout():
    fn = jaxattn.attention_fn(V.RBF(gamma=0.3), local_window_size=(1, 0))
    q, k, v = (_x((1, 6, 2, 4), seed=s) for s in range(3))
    np.testing.assert_allclose(
        fn(q, k, v), jaxattn.attention(q, k, v, variant=V.RBF(0.3), local_window_size=(1, 0)))
    with pytest.raises(NotImplementedError, match="dropout"):
        fn(q, k, v, dropout_rate=0.1, deterministic=False)


@pytest.fixture(scope="module")
def tokens():
    return load_pydoc_bytes()


@pytest.mark.parametrize("name", sorted(DIFFERENTIABLE))
def test_small_transformer_trains(name, tokens):
    variant, regs = DIFFERENTIABLE[name]
    model = Transformer(VOCAB_SIZE, 32, num_layers=1, d_model=32, num_heads=2, mlp_dim=64,
                        variant=variant, num_registers=regs, rngs=nnx.Rngs(0))
    opt = make_optimizer(model, 3e-3)
    data = TextBatches(tokens, 32, 8, seed=0)
    losses = [float(train_step(model, opt, jnp.asarray(data.next_train()))) for _ in range(40)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.75 * losses[0], losses
    loss, stats = eval_step(model, jnp.asarray(data.eval_batch()))
    assert np.isfinite(float(loss)) and len(stats) == 1
    assert stats[0].entropy.shape == (8, 2, 32)
