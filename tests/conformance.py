"""One conformance test base for every backend of :func:`jaxattn.attention` (tokamax style).

A backend subclasses :class:`AttentionConformance`, sets ``IMPLEMENTATION`` and its capability flags,
dtypes, tolerances and shape buckets. The tests compare the backend with the float64 NumPy oracle of
``tests/oracle.py`` (forward, statistics) and its gradients with finite differences of the oracle
(float64) and with the XLA reference's gradients (other backends). Hypothesis draws the shape bucket,
dtype, masking options, hyper-parameters and seeds; options a backend does not support are never
drawn, and tests of unsupported variants or capabilities skip with the reason.

A kernel backend, for example::

    class TestPallasInterpret(AttentionConformance):
        IMPLEMENTATION = "pallas"
        DTYPES = ("bfloat16", "float16")
        SHAPES = (Shape(1, 128, 128, 4, 2, 64, 64), Shape(2, 64, 192, 2, 2, 128, 128))
        SUPPORTED_VARIANTS = DIFFERENTIABLE_VARIANTS
        SUPPORTS_MASK_ARRAY = SUPPORTS_BIAS = False

The XLA subclass (``tests/test_conformance_xla.py``) runs in float64: the reference must match the
oracle to float64 precision, and its gradients must match the oracle's finite differences.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from tests.oracle import attention_oracle

# Every example compiles or runs eagerly and costs up to a second: skip the (slow) shrink phase.
# A failure still prints its drawn values (replay them with ``--hypothesis-seed``).
NO_SHRINK = hypothesis.settings(
    deadline=None,
    phases=[p for p in hypothesis.Phase if p not in (hypothesis.Phase.shrink, hypothesis.Phase.explain)])
# For the slower tests (backward passes): at most 10 examples.
FEW_NO_SHRINK = hypothesis.settings(NO_SHRINK, max_examples=min(NO_SHRINK.max_examples, 10))

ALL_VARIANTS = ("softmax", "adaptive_temperature", "scalable_softmax", "rbf", "hardmax", "topk")
DIFFERENTIABLE_VARIANTS = ("softmax", "adaptive_temperature", "scalable_softmax", "rbf")


class Shape(NamedTuple):
    batch: int
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_head_dim: int


@dataclasses.dataclass
class Case:
    """One drawn problem: arrays (in the test dtype), the variant and the masking options.

    The variant is ``make_variant(param)``: its hyper-parameter ``param`` (temperature, ``s``,
    ``gamma``, or None) is an argument of its own so that gradients reach it as a plain array.
    """

    query: jax.Array
    key: jax.Array
    value: jax.Array
    make_variant: Callable
    param: jax.Array | None
    bias: jax.Array | None
    registers: tuple | None
    options: dict  # mask, scale, is_causal, lengths, segment ids, local_window_size

    @property
    def variant(self):
        return self.make_variant(self.param)

    def diff_args(self):
        """The differentiable arguments as a dict (None entries dropped)."""
        args = dict(query=self.query, key=self.key, value=self.value, bias=self.bias,
                    registers=self.registers, param=self.param)
        return {name: x for name, x in args.items() if x is not None}


def call_attention(args, case, *, implementation, return_stats):
    """:func:`jaxattn.attention` on a dict of differentiable args and the case's options."""
    return jaxattn.attention(
        args["query"], args["key"], args["value"], variant=case.make_variant(args.get("param")),
        bias=args.get("bias"), registers=args.get("registers"), implementation=implementation,
        return_stats=return_stats, **case.options)


def call_oracle(args, case, fixed_beta=None):
    args = jax.tree.map(lambda x: np.asarray(x, np.float64), args)
    return attention_oracle(
        args["query"], args["key"], args["value"], variant=case.make_variant(args.get("param")),
        bias=args.get("bias"), registers=args.get("registers"), fixed_beta=fixed_beta,
        **case.options)


def adaptive_kink_rows(base_entropy, variant, margin):
    """Bool ``[B, N, T]``: rows whose base entropy is within ``margin`` of a kink of beta(H)."""
    h = base_entropy
    near_threshold = np.abs(h - variant.threshold) < margin
    poly = np.polyval(np.asarray(variant.coeffs), h)
    near_one = (h > variant.threshold - margin) & (np.abs(poly - 1.0) < margin)
    return near_threshold | near_one


def _assert_close(actual, expected, tol, what):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    np.testing.assert_allclose(actual, expected, err_msg=what, **tol)


def _assert_close_in_norm(actual, expected, rtol, what):
    """``||actual - expected|| <= rtol ||expected||`` (Frobenius): the usual bar for 16-bit kernels."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err, ref = np.linalg.norm(actual - expected), np.linalg.norm(expected)
    assert err <= rtol * ref + 1e-12, f"{what}: relative error {err / max(ref, 1e-300):.3e} > {rtol}"


class AttentionConformance:
    """What every backend of :func:`jaxattn.attention` must satisfy. Subclass it as ``Test...``."""

    IMPLEMENTATION = "xla"
    SUPPORTED_VARIANTS = ALL_VARIANTS
    DTYPES = ("float64",)
    SHAPES = (
        Shape(2, 8, 8, 4, 2, 16, 16),  # grouped-query
        Shape(1, 5, 9, 2, 1, 8, 12),  # multi-query, T < S, value head dim differs
        Shape(2, 7, 4, 3, 3, 4, 4),  # multi-head, T > S
    )
    MAGNITUDES = (0.5, 1.0, 2.0)  # scales of the random q and k (sharper logits when larger)
    SUPPORTS_VJP = True
    SUPPORTS_STATS = True
    SUPPORTS_STATS_VJP = True  # gradients flow through the returned statistics
    SUPPORTS_MASK_ARRAY = True
    SUPPORTS_BIAS = True
    SUPPORTS_REGISTERS = True
    SUPPORTS_SEGMENT_IDS = True
    SUPPORTS_LOCAL_WINDOW = True
    SUPPORTS_SEQ_LENGTHS = True
    # Forward and statistics tolerances (against the float64 oracle), per input dtype.
    TOLERANCES = {
        "float64": dict(rtol=1e-10, atol=1e-10),
        "float32": dict(rtol=2e-5, atol=2e-6),
        "bfloat16": dict(rtol=2e-2, atol=2e-2),
        "float16": dict(rtol=2e-3, atol=2e-3),
    }
    # Gradient tolerances against the XLA reference (backends other than "xla"), per input dtype.
    GRAD_TOLERANCES = {
        "float64": dict(rtol=1e-9, atol=1e-9),
        "float32": dict(rtol=1e-4, atol=1e-5),
        "bfloat16": dict(rtol=5e-2, atol=5e-2),
        "float16": dict(rtol=5e-3, atol=5e-3),
    }
    # If set for a dtype, gradients are compared with the XLA reference in relative Frobenius norm
    # instead of element by element (16-bit kernels: a few elements of large gradients stray).
    GRAD_NORM_RTOL: dict | None = None
    # The variant parameter's gradient (temperature, SSMax s, RBF gamma: one scalar, or one per
    # head) under GRAD_NORM_RTOL. It is a sum over every query row r of t_r = d loss_r / d param,
    # and the rows do not share signs: |sum t_r| can be 1000x below sum |t_r| (seen: an SSMax s
    # draw in float16 with the kernel off by 8 % of the sum, 0.08 u sum |t_r|). Each t_r is formed
    # by a 16-bit kernel from dO and the output rounded to the input dtype and P and dZ rounded
    # before the products: a relative error of a few unit roundoffs u at worst per row (errors of
    # random sign in practice: measured |error| <= 0.18 u sum |t_r| over 54 float16 and bfloat16
    # draws), and no centering across rows. So the bound is
    #     |g_kernel - g_ref| <= PARAM_SUM_ROUNDOFFS * u * sum_r |t_r|,
    # with the t_r from the float64 XLA reference (forward-mode, per row) and u = UNIT_ROUNDOFF of
    # the input dtype; no relative bound on |sum t_r| alone, which has no error model.
    UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
    PARAM_SUM_ROUNDOFFS = 2.0
    FD_STEP = 1e-4  # finite-difference step of the float64 gradient check
    FD_RTOL = 1e-6
    # Rows this close to a kink get no cotangent, so the finite differences probe a smooth loss:
    # the adaptive temperature's beta(H) (entropy margin) and max_weight (gap between the two
    # largest weights).
    KINK_MARGIN = 0.05
    MAX_WEIGHT_GAP = 0.01

    # ---- capability helpers -------------------------------------------------------------------

    def skip_unless_variant(self, name):
        if name not in self.SUPPORTED_VARIANTS:
            pytest.skip(f"{self.IMPLEMENTATION}: variant {name!r} is not supported")

    def skip_unless(self, flag, what):
        if not getattr(self, flag):
            pytest.skip(f"{self.IMPLEMENTATION}: {what} is not supported ({flag} = False)")

    # ---- drawing a case -----------------------------------------------------------------------

    def draw_variant(self, data, name, shape):
        """``(make_variant, param)``: the variant's constructor and its drawn hyper-parameter."""
        if name == "softmax":
            t = data.draw(st.sampled_from([1.0, 0.5, 0.8, 2.5]), label="temperature")
            return jaxattn.Softmax, np.float64(t)
        if name == "adaptive_temperature":
            sg = data.draw(st.booleans(), label="stop_gradient_beta")
            return (lambda _: jaxattn.AdaptiveTemperature(stop_gradient_beta=sg)), None
        if name == "scalable_softmax":
            if data.draw(st.booleans(), label="s_per_head"):
                seed = data.draw(st.integers(0, 2**31 - 1), label="s_seed")
                s = np.random.default_rng(seed).uniform(0.2, 1.5, shape.num_heads)
            else:
                s = np.float64(data.draw(st.sampled_from([0.43, 1.0, 0.3]), label="s"))
            return jaxattn.ScalableSoftmax, s
        if name == "rbf":
            gamma = data.draw(st.sampled_from([None, 0.1, 0.4]), label="gamma")
            if gamma is None:
                return (lambda _: jaxattn.RBF()), None
            return jaxattn.RBF, np.float64(gamma)
        if name == "hardmax":
            return (lambda _: jaxattn.Hardmax()), None
        if name == "topk":
            k = data.draw(st.integers(1, shape.kv_len), label="k")
            return (lambda _: jaxattn.TopK(k)), None
        raise ValueError(name)

    def draw_case(self, data, name, *, dtype=None, shape=None):
        """Draws arrays, variant and options for variant ``name``."""
        shape = shape or data.draw(st.sampled_from(self.SHAPES), label="shape")
        dtype = jnp.dtype(dtype or data.draw(st.sampled_from(self.DTYPES), label="dtype"))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
        B, T, S, N, K, H, Hv = shape
        # Hardmax and top-k get small dyadic values: exact logits, so ties are real and frequent.
        quantized = name in ("hardmax", "topk")
        magnitude = 1.0 if quantized else data.draw(st.sampled_from(self.MAGNITUDES), label="mag")

        def values(*dims):
            if quantized:
                return rng.integers(-2, 3, dims) / 2.0
            return magnitude * rng.standard_normal(dims)

        def array(x, dt=dtype):
            return jnp.asarray(x, dt)

        options = {}
        options["scale"] = data.draw(st.sampled_from([None, 0.25, 0.5]), label="scale")
        options["is_causal"] = data.draw(st.booleans(), label="is_causal")
        if self.SUPPORTS_LOCAL_WINDOW and data.draw(st.booleans(), label="window"):
            options["local_window_size"] = (data.draw(st.integers(0, 3), label="left"),
                                            data.draw(st.integers(0, 3), label="right"))
        if self.SUPPORTS_SEQ_LENGTHS and data.draw(st.booleans(), label="q_lengths"):
            options["query_seq_lengths"] = jnp.asarray(rng.integers(0, T + 1, B), jnp.int32)
        if self.SUPPORTS_SEQ_LENGTHS and data.draw(st.booleans(), label="kv_lengths"):
            options["key_value_seq_lengths"] = jnp.asarray(rng.integers(0, S + 1, B), jnp.int32)
        if self.SUPPORTS_SEGMENT_IDS and data.draw(st.booleans(), label="segments"):
            options["q_segment_ids"] = jnp.asarray(rng.integers(0, 3, (B, T)), jnp.int32)
            options["kv_segment_ids"] = jnp.asarray(rng.integers(0, 3, (B, S)), jnp.int32)
        full = (B, N, T, S)
        broadcast_shapes = [full, (B, 1, T, S), (T, S), (1, N, 1, S)]
        if self.SUPPORTS_MASK_ARRAY and data.draw(st.booleans(), label="mask"):
            mshape = data.draw(st.sampled_from(broadcast_shapes), label="mask_shape")
            options["mask"] = jnp.asarray(rng.random(mshape) < 0.7)
        bias = None
        if self.SUPPORTS_BIAS and data.draw(st.booleans(), label="bias"):
            bshape = data.draw(st.sampled_from(broadcast_shapes), label="bias_shape")
            bias = array(rng.integers(-2, 3, bshape) / 4.0 if quantized
                         else 0.5 * rng.standard_normal(bshape))
        registers = None
        if self.SUPPORTS_REGISTERS and data.draw(st.booleans(), label="registers"):
            R = data.draw(st.integers(1, 2), label="num_registers")
            lead = (B, R) if data.draw(st.booleans(), label="batched_registers") else (R,)
            registers = (array(values(*lead, K, H)), array(values(*lead, K, Hv)))
        make_variant, param = self.draw_variant(data, name, shape)
        return Case(query=array(values(B, T, N, H)), key=array(values(B, S, K, H)),
                    value=array(rng.standard_normal((B, S, K, Hv))), make_variant=make_variant,
                    param=param, bias=bias, registers=registers, options=options)

    # ---- forward ------------------------------------------------------------------------------

    def stats_dtype(self, dtype):
        return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32

    def run(self, case, args=None):
        """The backend's ``(out, stats)`` (stats None unless supported)."""
        args = case.diff_args() if args is None else args
        # blocks: no XLA op may queue behind an interpreted kernel (tests/interpreter.py)
        result = jax.block_until_ready(call_attention(args, case, implementation=self.IMPLEMENTATION,
                                                      return_stats=self.SUPPORTS_STATS))
        return result if self.SUPPORTS_STATS else (result, None)

    def check_forward(self, case):
        """Output (and statistics) against the oracle; returns the oracle's result."""
        out, stats = self.run(case)
        expected = call_oracle(case.diff_args(), case)
        dtype = case.query.dtype
        tol = self.TOLERANCES[jnp.dtype(dtype).name]
        assert out.dtype == dtype, f"output dtype {out.dtype} != query dtype {dtype}"
        _assert_close(out, expected.out, tol, "output")
        if stats is not None:
            for field in jaxattn.AttentionStats._fields:
                got = getattr(stats, field)
                assert got.dtype == self.stats_dtype(dtype), f"{field} dtype {got.dtype}"
                _assert_close(got, getattr(expected, field), tol, field)
        return expected

    @pytest.mark.parametrize("variant_name", ALL_VARIANTS)
    @NO_SHRINK
    @hypothesis.given(data=st.data())
    def test_forward_matches_oracle(self, variant_name, data):
        """Output and (if supported) statistics over every masking option, GQA and registers."""
        self.skip_unless_variant(variant_name)
        self.check_forward(self.draw_case(data, variant_name))

    @pytest.mark.parametrize("variant_name", ALL_VARIANTS)
    @FEW_NO_SHRINK
    @hypothesis.given(data=st.data())
    def test_fully_masked_rows_are_zero(self, variant_name, data):
        """Rows with no visible key give exact zeros (output, stats, query gradient), never NaN."""
        self.skip_unless_variant(variant_name)
        case = self.draw_case(data, variant_name)
        B, T = case.query.shape[:2]
        S = case.key.shape[1]
        case.registers = None  # registers are visible to every valid row
        if self.SUPPORTS_SEQ_LENGTHS:  # batch 0 has no valid key; the last query row is padding
            case.options["key_value_seq_lengths"] = jnp.asarray([0] + [S] * (B - 1), jnp.int32)
            case.options["query_seq_lengths"] = jnp.full((B,), T - 1, jnp.int32)
        elif self.SUPPORTS_MASK_ARRAY:  # the last query row sees nothing
            case.options["mask"] = jnp.asarray(np.arange(T)[:, None] < np.full((1, S), T - 1))
        else:
            pytest.skip(f"{self.IMPLEMENTATION}: no way to hide keys (lengths or mask arrays)")
        expected = self.check_forward(case)
        empty = ~expected.visible.any(axis=-1)  # [B, N, T]
        assert empty.any()
        out, stats = self.run(case)
        out = np.asarray(out, np.float64).transpose(0, 2, 1, 3)  # [B, N, T, Hv]
        assert np.all(out[empty] == 0.0), "rows with no visible key must be exactly zero"
        if stats is not None:
            for field, values in zip(jaxattn.AttentionStats._fields, stats, strict=True):
                assert np.all(np.asarray(values)[empty] == 0.0), f"{field} of an empty row"
        if self.SUPPORTS_VJP and variant_name in DIFFERENTIABLE_VARIANTS:
            args = case.diff_args()
            ct_out = np.random.default_rng(0).standard_normal(out.shape).transpose(0, 2, 1, 3)
            grads = jax.block_until_ready(
                jax.grad(self.loss_fn(case, ct_out, None, self.IMPLEMENTATION))(args))
            for name, g in grads.items():
                assert np.all(np.isfinite(np.asarray(g, np.float64))), f"non-finite d{name}"
            dq = np.asarray(grads["query"], np.float64).transpose(0, 2, 1, 3)  # [B, N, T, H]
            assert np.all(dq[empty] == 0.0), "gradient reaches the query of an empty row"

    # ---- gradients ----------------------------------------------------------------------------

    def cotangents(self, rng, case, expected):
        """Random cotangents for the output (and statistics); zero on rows near a kink."""
        B, T, N = case.query.shape[:3]
        Hv = case.value.shape[-1]
        ct_out = rng.standard_normal((B, T, N, Hv))
        ct_stats = None
        if self.SUPPORTS_STATS and self.SUPPORTS_STATS_VJP:
            ct_stats = rng.standard_normal((3, B, N, T))
            w = expected.weights
            top2 = np.sort(np.concatenate([np.zeros((*w.shape[:-1], 1)), w], -1), -1)[..., -2:]
            ct_stats[2] = np.where(top2[..., 1] - top2[..., 0] < self.MAX_WEIGHT_GAP, 0.0, ct_stats[2])
        if isinstance(case.variant, jaxattn.AdaptiveTemperature):
            kink = adaptive_kink_rows(expected.base_entropy, case.variant, self.KINK_MARGIN)
            ct_out = np.where(kink.transpose(0, 2, 1)[..., None], 0.0, ct_out)
            if ct_stats is not None:
                ct_stats = np.where(kink[None], 0.0, ct_stats)
        return ct_out, ct_stats

    def loss_fn(self, case, ct_out, ct_stats, implementation):
        """``sum(ct * out) (+ sum(ct_s * stats))`` as a function of the dict of arguments."""
        ct_out = jnp.asarray(ct_out)  # float64 under x64, else float32

        def loss(args):
            result = call_attention(args, case, implementation=implementation,
                                    return_stats=ct_stats is not None)
            out, stats = result if ct_stats is not None else (result, ())
            total = jnp.sum(out.astype(ct_out.dtype) * ct_out)
            for ct, s in zip(() if ct_stats is None else ct_stats, stats, strict=True):
                total = total + jnp.sum(s.astype(ct_out.dtype) * jnp.asarray(ct, ct_out.dtype))
            return total

        return loss

    def oracle_loss(self, args, case, ct_out, ct_stats, fixed_beta=None):
        res = call_oracle(args, case, fixed_beta)
        total = np.sum(res.out * ct_out)
        if ct_stats is not None:
            for ct, field in zip(ct_stats, jaxattn.AttentionStats._fields, strict=True):
                total += np.sum(ct * getattr(res, field))
        return total

    def check_grads_against_oracle(self, rng, case, grads, ct_out, ct_stats, expected):
        """Each argument's directional derivative vs a 4-point finite difference of the oracle.

        With ``stop_gradient_beta`` the oracle's beta stays frozen at its unperturbed values.
        """
        args = case.diff_args()
        variant = case.variant
        frozen = getattr(variant, "stop_gradient_beta", False)
        fixed_beta = expected.beta if frozen else None
        h = self.FD_STEP
        for name in args:
            direction = jax.tree.map(lambda x: rng.standard_normal(np.shape(x)), args[name])

            def at(t, name=name, direction=direction):
                moved = dict(args)
                moved[name] = jax.tree.map(lambda x, d: np.asarray(x, np.float64) + t * d,
                                           args[name], direction)
                return self.oracle_loss(moved, case, ct_out, ct_stats, fixed_beta)

            fd = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
            terms = jax.tree.leaves(jax.tree.map(lambda g, d: np.asarray(g, np.float64) * d,
                                                 grads[name], direction))
            analytic = sum(float(np.sum(t)) for t in terms)
            size = sum(float(np.sum(np.abs(t))) for t in terms)
            assert abs(analytic - fd) <= self.FD_RTOL * (1.0 + size), (
                f"d/d{name}: analytic {analytic!r} vs finite difference {fd!r}")

    def param_row_terms(self, case, ct_out, ct_stats, ref_args):
        """``t_r``: each query row's share of d loss / d param, ``[B, T, N, *param.shape]``, by
        forward mode through the XLA reference at ``ref_args``' precision (see
        ``PARAM_SUM_ROUNDOFFS``)."""
        ct_out = jnp.asarray(ct_out, ref_args["param"].dtype)

        def rows(param):
            args = dict(ref_args, param=param)
            result = call_attention(args, case, implementation="xla",
                                    return_stats=ct_stats is not None)
            out, stats = result if ct_stats is not None else (result, ())
            per_row = jnp.sum(out.astype(ct_out.dtype) * ct_out, axis=-1)  # [B, T, N]
            for ct, s in zip(() if ct_stats is None else ct_stats, stats, strict=True):
                per_row = per_row + jnp.transpose(s.astype(ct_out.dtype) * ct, (0, 2, 1))
            return per_row

        return np.asarray(jax.jacfwd(rows)(ref_args["param"]), np.float64)

    @pytest.mark.parametrize("variant_name", DIFFERENTIABLE_VARIANTS)
    @FEW_NO_SHRINK
    @hypothesis.given(data=st.data())
    def test_gradients(self, variant_name, data):
        """Gradients wrt q, k, v, bias, registers and the variant's hyper-parameter."""
        self.skip_unless_variant(variant_name)
        self.skip_unless("SUPPORTS_VJP", "differentiation")
        case = self.draw_case(data, variant_name)
        self.check_gradients(case, data.draw(st.integers(0, 2**31 - 1), label="ct_seed"))

    def check_gradients(self, case, ct_seed):
        """The backend's gradients of ``case`` (random cotangents from ``ct_seed``) against the
        oracle's finite differences (float64) or the XLA reference's gradients."""
        rng = np.random.default_rng(ct_seed)
        expected = call_oracle(case.diff_args(), case)
        ct_out, ct_stats = self.cotangents(rng, case, expected)
        grads = jax.block_until_ready(
            jax.grad(self.loss_fn(case, ct_out, ct_stats, self.IMPLEMENTATION))(case.diff_args()))
        for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
            leaf = np.asarray(leaf, np.float64)
            assert np.all(np.isfinite(leaf)), f"non-finite gradient {jax.tree_util.keystr(path)}"
        dtype = jnp.dtype(case.query.dtype)
        if dtype == jnp.float64:
            self.check_grads_against_oracle(rng, case, grads, ct_out, ct_stats, expected)
        if self.IMPLEMENTATION != "xla":  # the XLA reference's own gradients are checked above
            ref_dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
            ref_args = jax.tree.map(lambda x: jnp.asarray(x, ref_dtype), case.diff_args())
            ref = jax.grad(self.loss_fn(case, ct_out, ct_stats, "xla"))(ref_args)
            tol = self.GRAD_TOLERANCES[dtype.name]
            norm_rtol = (self.GRAD_NORM_RTOL or {}).get(dtype.name)
            flat_ref = jax.tree.leaves(ref)
            for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), flat_ref,
                                         strict=True):
                what = f"gradient {jax.tree_util.keystr(path)}"
                if norm_rtol is None:
                    _assert_close(got, want, tol, what)
                elif path == (jax.tree_util.DictKey("param"),):
                    terms = self.param_row_terms(case, ct_out, ct_stats, ref_args)
                    bound = (self.PARAM_SUM_ROUNDOFFS * self.UNIT_ROUNDOFF[dtype.name]
                             * np.abs(terms).sum(axis=(0, 1, 2)))
                    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
                    assert np.all(np.isfinite(err)) and np.all(err <= bound), (
                        f"{what}: |error| {err} > {bound} ({self.PARAM_SUM_ROUNDOFFS} u sum_r "
                        f"|t_r|, sum_r t_r = {terms.sum(axis=(0, 1, 2))})")
                else:
                    _assert_close_in_norm(got, want, norm_rtol, what)
