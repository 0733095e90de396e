"""Bad input gives a clear ValueError/TypeError naming the argument and the constraint."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn
from jaxattn.model import Transformer

B, T, S, N, K, H = 2, 4, 5, 4, 2, 8


def _qkv(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal(s), dtype)
                 for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))


def _call(**kwargs):
    q, k, v = _qkv()
    q, k, v = kwargs.pop("query", q), kwargs.pop("key", k), kwargs.pop("value", v)
    return jaxattn.attention(q, k, v, **kwargs)


def test_valid_call_runs():
    """The baseline every case below perturbs is itself valid."""
    assert _call().shape == (B, T, N, H)


@pytest.mark.parametrize("name, shape, match", [
    ("key", (S, K, H), "key must have the rank of query"),
    ("value", (B, S, K), "value must have the rank of query"),
    ("query", (T, N), "query must be"),
    ("query", (1, B, T, N, H), "query must be"),
])
def test_rank_mismatch(name, shape, match):
    with pytest.raises(ValueError, match=match):
        _call(**{name: jnp.ones(shape, jnp.float32)})


def test_head_dim_mismatch():
    with pytest.raises(ValueError, match="key head dim"):
        _call(key=jnp.ones((B, S, K, H + 1), jnp.float32))


def test_value_shape_mismatch():
    with pytest.raises(ValueError, match="value must match key"):
        _call(value=jnp.ones((B, S + 1, K, H), jnp.float32))


def test_batch_mismatch():
    with pytest.raises(ValueError, match="key batch"):
        _call(key=jnp.ones((B + 1, S, K, H), jnp.float32), value=jnp.ones((B + 1, S, K, H), jnp.float32))


def test_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match=r"query heads N=4 must be a multiple of key/value heads K=3"):
        _call(key=jnp.ones((B, S, 3, H), jnp.float32), value=jnp.ones((B, S, 3, H), jnp.float32))


@pytest.mark.parametrize("shape", [(B, N, T, S + 1), (3, N, T, S), (T + 1, S), (1, 1, B, N, T, S)])
def test_mask_does_not_broadcast(shape):
    with pytest.raises(ValueError, match="mask"):
        _call(mask=jnp.ones(shape, bool))


@pytest.mark.parametrize("shape", [(B, N, T, S + 1), (B, 3, T, S), (T, S - 1), (2, B, N, T, S)])
def test_bias_does_not_broadcast(shape):
    with pytest.raises(ValueError, match="bias"):
        _call(bias=jnp.zeros(shape, jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float32])
def test_non_bool_mask(dtype):
    with pytest.raises(TypeError, match="mask must be a bool"):
        _call(mask=jnp.ones((T, S), dtype))


def test_non_float_bias():
    with pytest.raises(TypeError, match="bias"):
        _call(bias=jnp.ones((T, S), jnp.int32))


@pytest.mark.parametrize("name, shape", [
    ("query_seq_lengths", (B,)), ("key_value_seq_lengths", (B,)),
])
def test_non_integer_lengths(name, shape):
    with pytest.raises(TypeError, match=name):
        _call(**{name: jnp.full(shape, 2.0, jnp.float32)})


def test_non_integer_segment_ids():
    with pytest.raises(TypeError, match="q_segment_ids"):
        _call(q_segment_ids=jnp.zeros((B, T), jnp.float32), kv_segment_ids=jnp.zeros((B, S), jnp.int32))
    with pytest.raises(TypeError, match="kv_segment_ids"):
        _call(q_segment_ids=jnp.zeros((B, T), jnp.int32), kv_segment_ids=jnp.zeros((B, S), bool))


@pytest.mark.parametrize("name, shape", [
    ("query_seq_lengths", (B + 1,)), ("query_seq_lengths", (B, 1)),
    ("key_value_seq_lengths", ()), ("key_value_seq_lengths", (1,)),
])
def test_wrong_length_shapes(name, shape):
    with pytest.raises(ValueError, match=name):
        _call(**{name: jnp.ones(shape, jnp.int32)})


@pytest.mark.parametrize("q_shape, kv_shape, bad", [
    ((B, T + 1), (B, S), "q_segment_ids"), ((B, T), (B, S - 1), "kv_segment_ids"),
    ((T,), (B, S), "q_segment_ids"),
])
def test_wrong_segment_id_shapes(q_shape, kv_shape, bad):
    with pytest.raises(ValueError, match=bad):
        _call(q_segment_ids=jnp.zeros(q_shape, jnp.int32), kv_segment_ids=jnp.zeros(kv_shape, jnp.int32))


def test_segment_ids_come_together():
    with pytest.raises(ValueError, match="q_segment_ids and kv_segment_ids"):
        _call(q_segment_ids=jnp.zeros((B, T), jnp.int32))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        jaxattn.Softmax(temperature)


@pytest.mark.parametrize("gamma", [0.0, -0.5, float("nan")])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        jaxattn.RBF(gamma)


def test_bad_temperature_array():
    with pytest.raises(ValueError, match="temperature"):
        jaxattn.Softmax(jnp.asarray(-0.5))


@pytest.mark.parametrize("k", [0, -1])
def test_topk_k_below_one(k):
    with pytest.raises(ValueError, match="k must be >= 1"):
        jaxattn.TopK(k)


def test_topk_k_not_an_int():
    with pytest.raises(TypeError, match="k must be a static int"):
        jaxattn.TopK(2.0)


def test_topk_k_above_kv_len():
    with pytest.raises(ValueError, match=r"TopK k must be in \[1, S\]"):
        _call(variant=jaxattn.TopK(S + 1))


def test_topk_k_counts_registers():
    """With R registers, k may reach S + R but not beyond."""
    regs = (jnp.ones((2, K, H), jnp.float32), jnp.ones((2, K, H), jnp.float32))
    assert _call(variant=jaxattn.TopK(S + 2), registers=regs).shape == (B, T, N, H)
    with pytest.raises(ValueError, match="TopK k"):
        _call(variant=jaxattn.TopK(S + 3), registers=regs)


def test_unknown_variant_name_lists_valid_names():
    with pytest.raises(ValueError, match="variant must be one of") as info:
        _call(variant="sofmax")
    for name in jaxattn.VARIANT_NAMES:
        assert repr(name) in str(info.value)
    assert "'sofmax'" in str(info.value)


def test_variant_of_wrong_type():
    with pytest.raises(TypeError, match="variant must be a name"):
        _call(variant=3)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, bool])
def test_unsupported_dtype(dtype):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="query must have dtype"):
        jaxattn.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype))


@pytest.mark.parametrize("name", ["key", "value"])
def test_dtype_mismatch(name):
    q, k, v = _qkv()
    args = dict(query=q, key=k, value=v)
    args[name] = args[name].astype(jnp.bfloat16)
    with pytest.raises(TypeError, match=f"{name} dtype bfloat16 differs from query dtype float32"):
        jaxattn.attention(args["query"], args["key"], args["value"])


@pytest.mark.parametrize("window, error", [
    ((-1, 2), ValueError), ((2, -3), ValueError), ((1, 2, 3), TypeError), (1.5, TypeError),
    ((1.0, 2), TypeError), ("left", TypeError), ((True, 1), TypeError),
])
def test_bad_local_window_size(window, error):
    with pytest.raises(error, match="local_window_size"):
        _call(local_window_size=window)


@pytest.mark.parametrize("implementation", ["cudnn", "XLA", "triton", 0])
def test_bad_implementation(implementation):
    with pytest.raises(ValueError, match="implementation must be one of"):
        _call(implementation=implementation)


def test_pallas_unsupported_configuration():
    """Hardmax stays outside the fused kernel: asking for it must raise, not fall back silently."""
    with pytest.raises(NotImplementedError):
        _call(variant="hardmax", implementation="pallas")


def test_bad_registers():
    good = jnp.ones((2, K, H), jnp.float32)
    with pytest.raises(TypeError, match="registers must be a pair"):
        _call(registers=good)
    with pytest.raises(ValueError, match="key_registers"):
        _call(registers=(jnp.ones((2, K + 1, H), jnp.float32), good))
    with pytest.raises(ValueError, match="key_registers and value_registers"):
        _call(registers=(good, jnp.ones((3, K, H), jnp.float32)))


def test_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        _call(scale=float("nan"))


def test_bad_is_causal():
    with pytest.raises(TypeError, match="is_causal"):
        _call(is_causal=1)


def test_scalable_softmax_s_per_head_count():
    with pytest.raises(ValueError, match="s has 3 values"):
        _call(variant=jaxattn.ScalableSoftmax(jnp.ones(3)))
    with pytest.raises(ValueError, match="s must be a scalar or one value per query head"):
        jaxattn.ScalableSoftmax(np.ones((2, 2)))


def test_value_none():
    q, k, _ = _qkv()
    with pytest.raises(TypeError, match="value"):
        jaxattn.attention(q, k, None)


# ---- values out of range (concrete values are checked; traced ones are documented) ----------

@pytest.mark.parametrize("name, values, bound", [
    ("key_value_seq_lengths", [S + 1, 2], f"[0, S] = [0, {S}]"),
    ("key_value_seq_lengths", [-1, 2], f"[0, S] = [0, {S}]"),
    ("query_seq_lengths", [T + 1, 2], f"[0, T] = [0, {T}]"),
    ("query_seq_lengths", [2, -3], f"[0, T] = [0, {T}]"),
])
def test_lengths_out_of_range(name, values, bound):
    for make in (jnp.asarray, np.asarray):
        with pytest.raises(ValueError, match=re.escape(f"{name} must be in {bound}")):
            _call(**{name: make(values, np.int32)})


def test_lengths_at_the_bounds_are_valid():
    out = _call(query_seq_lengths=jnp.asarray([0, T], jnp.int32),
                key_value_seq_lengths=jnp.asarray([S, 0], jnp.int32))
    assert np.all(np.asarray(out)[0] == 0.0) and np.all(np.asarray(out)[1] == 0.0)


def test_traced_lengths_out_of_range_act_as_clipped():
    """Under jit the values are unknown at trace time; the documented outcome is clipping."""
    f = jax.jit(lambda q_len, kv_len: _call(query_seq_lengths=q_len, key_value_seq_lengths=kv_len))
    got = f(jnp.asarray([T + 3, -2], jnp.int32), jnp.asarray([S + 9, -1], jnp.int32))
    want = _call(query_seq_lengths=jnp.asarray([T, 0], jnp.int32),
                 key_value_seq_lengths=jnp.asarray([S, 0], jnp.int32))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # jit may reassociate sums
    assert np.all(np.asarray(got)[1] == 0.0)


@pytest.mark.parametrize("scale", [0.0, -1.0, -0.125, np.float32(-2.0)])
def test_nonpositive_scale(scale):
    with pytest.raises(ValueError, match="scale must be positive"):
        _call(scale=scale)
    with pytest.raises(ValueError, match="scale must be positive"):
        _call(scale=jnp.asarray(scale, jnp.float32))


def test_traced_scale_is_not_checked():
    """A traced scale cannot be inspected; a learned positive one runs as a concrete one does."""
    got = jax.jit(lambda s: _call(scale=s))(jnp.float32(0.3))
    np.testing.assert_allclose(got, _call(scale=0.3), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("s", [float("nan"), float("inf"), np.array([0.4, np.nan])])
def test_scalable_softmax_s_not_finite(s):
    with pytest.raises(ValueError, match="s must be finite"):
        jaxattn.ScalableSoftmax(s)


def test_scalable_softmax_accepts_any_sign_of_s():
    """s <= 0 is accepted on purpose (a learned s may cross zero): s < 0 is SSMax(|s|) on the
    negated logits, s = 0 weighs every visible key equally."""
    q, k, v = _qkv()
    neg = jaxattn.attention(q, k, v, variant=jaxattn.ScalableSoftmax(-0.5), implementation="xla")
    pos = jaxattn.attention(q, -k, v, variant=jaxattn.ScalableSoftmax(0.5), implementation="xla")
    np.testing.assert_allclose(neg, pos, rtol=1e-6, atol=1e-6)
    zero = jaxattn.attention(q, k, v, variant=jaxattn.ScalableSoftmax(0.0), implementation="xla")
    mean = jnp.repeat(jnp.mean(v, axis=1, keepdims=True), N // K, axis=2)
    np.testing.assert_allclose(zero, jnp.broadcast_to(mean, zero.shape), rtol=1e-6, atol=1e-6)


def test_traced_scalable_softmax_s_keeps_working():
    s = jnp.asarray([0.4, -0.2, 0.0, 0.6], jnp.float32)
    got = jax.jit(lambda s: _call(variant=jaxattn.ScalableSoftmax(s)))(s)
    np.testing.assert_allclose(got, _call(variant=jaxattn.ScalableSoftmax(np.asarray(s))),
                               rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(jax.grad(
        lambda s: jnp.sum(_call(variant=jaxattn.ScalableSoftmax(s))))(s)))


@pytest.mark.parametrize("threshold", [-1.0, -1e-3, float("nan")])
def test_adaptive_temperature_bad_threshold(threshold):
    with pytest.raises(ValueError, match=r"threshold must be >= 0 \(an entropy in nats"):
        jaxattn.AdaptiveTemperature(threshold=threshold)


def test_adaptive_temperature_threshold_zero_is_valid():
    assert _call(variant=jaxattn.AdaptiveTemperature(threshold=0.0)).shape == (B, T, N, H)


@pytest.mark.parametrize("coeffs", [-1.0, 2, None, ("a", 1.0)])
def test_adaptive_temperature_coeffs_not_a_sequence(coeffs):
    with pytest.raises(TypeError, match=r"coeffs must be a sequence of real polynomial "
                                        r"coefficients, highest power first"):
        jaxattn.AdaptiveTemperature(coeffs)


@pytest.mark.parametrize("coeffs", [(1.0, float("nan")), (float("inf"),)])
def test_adaptive_temperature_coeffs_not_finite(coeffs):
    with pytest.raises(ValueError, match="coeffs must be finite"):
        jaxattn.AdaptiveTemperature(coeffs)


@pytest.mark.parametrize("eps", [-1e-9, float("inf"), float("nan")])
def test_adaptive_temperature_bad_entropy_eps(eps):
    with pytest.raises(ValueError, match="entropy_eps must be finite and >= 0"):
        jaxattn.AdaptiveTemperature(entropy_eps=eps)


def test_traced_is_causal_must_be_static():
    with pytest.raises(TypeError, match="is_causal must be a static Python bool, not a traced "
                                        "value.*static_argnames"):
        jax.jit(lambda c: _call(is_causal=c))(True)
    with pytest.raises(TypeError, match="is_causal must be a static Python bool"):
        _call(is_causal=jnp.asarray(True))


@pytest.mark.parametrize("window", [2, (1, 2)])
def test_traced_local_window_size_must_be_static(window):
    with pytest.raises(TypeError, match="local_window_size must be a static Python int or "
                                        r"\(left, right\) pair of static ints, not a traced "
                                        "value.*static_argnames"):
        jax.jit(lambda w: _call(local_window_size=w))(window)


def test_static_is_causal_and_window_under_jit_run():
    f = jax.jit(lambda c, w: _call(is_causal=c, local_window_size=w),
                static_argnames=("c", "w"))
    np.testing.assert_allclose(f(c=True, w=(1, 0)), _call(is_causal=True, local_window_size=(1, 0)),
                               rtol=1e-6, atol=1e-6)


# ---- the model and the module ---------------------------------------------------------------

def test_transformer_input_longer_than_max_len():
    model = Transformer(16, 8, num_layers=1, d_model=8, num_heads=2, mlp_dim=16, rngs=nnx.Rngs(0))
    assert model(jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, 16)
    with pytest.raises(ValueError, match="input length T=9 exceeds max_len=8"):
        model(jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("name, value", [
    ("vocab_size", 0), ("max_len", 0), ("max_len", -4), ("num_layers", -1), ("mlp_dim", 0),
    ("d_model", 0),
])
def test_transformer_bad_sizes(name, value):
    kw = dict(vocab_size=16, max_len=8, num_layers=1, d_model=8, num_heads=2, mlp_dim=16)
    kw[name] = value
    vocab_size, max_len = kw.pop("vocab_size"), kw.pop("max_len")
    with pytest.raises(ValueError, match=f"{name} must be an int >= "):
        Transformer(vocab_size, max_len, **kw, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name, value", [
    ("num_kv_heads", 0), ("num_kv_heads", -2), ("qkv_features", 0), ("qkv_features", -8),
    ("out_features", 0), ("in_features", 0), ("num_heads", 0),
])
def test_module_nonpositive_sizes(name, value):
    kw = dict(num_heads=2, in_features=8)
    kw[name] = value
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got {value}"):
        jaxattn.MultiHeadAttention(kw.pop("num_heads"), kw.pop("in_features"), **kw,
                                   rngs=nnx.Rngs(0))


def test_module_bad_implementation_and_registers():
    with pytest.raises(ValueError, match="implementation must be one of"):
        jaxattn.MultiHeadAttention(2, 8, implementation="cudnn", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="num_registers must be an int"):
        jaxattn.MultiHeadAttention(2, 8, num_registers=1.5, rngs=nnx.Rngs(0))


def test_module_segment_ids_with_cross_attention():
    mha = jaxattn.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 4, 8), jnp.float32)
    seg = jnp.zeros((1, 4), jnp.int32)
    assert mha(x, x, segment_ids=seg).shape == (1, 4, 8)  # the same array: self-attention
    with pytest.raises(ValueError, match="segment_ids is for self-attention only"):
        mha(x, x + 1.0, segment_ids=seg)
