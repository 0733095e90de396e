"""Attention variants as small specs shared by the reference and the kernels.

Every variant computes logits of one form and normalises them over the visible keys:

.. math::

  z_{ij} = c_i \\, (a \\, q_i \\cdot k_j + b_j + \\text{bias}_{ij}), \\qquad
  p_{i\\cdot} = \\text{normalise}(z_{i\\cdot})

* ``a`` -- :meth:`Variant.logit_scale`, a scalar (``scale``, or ``2 gamma`` for RBF);
* ``b_j`` -- :meth:`Variant.key_bias`, a per-key bias (``-gamma ||k_j||^2`` for RBF);
* ``c_i`` -- :meth:`Variant.query_scale`, a per-query scale (``1/theta``, ``s log n_i``, ``beta_i``),
  which may need a statistics sweep first (:attr:`Variant.needs_stats`);
* ``normalise`` -- softmax, hardmax or top-k (:attr:`Variant.normalizer`).

Variants are frozen dataclasses registered as pytrees: numeric hyper-parameters are leaves (they
may be traced arrays, e.g. a learned ``s``), structural ones are static.
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Variant",
    "Softmax",
    "AdaptiveTemperature",
    "ScalableSoftmax",
    "RBF",
    "Hardmax",
    "TopK",
    "VARIANT_NAMES",
    "get_variant",
    "ADAPTIVE_TEMPERATURE_COEFFS",
]

# The paper's polynomial, highest power first (numpy.polyval order).
ADAPTIVE_TEMPERATURE_COEFFS = (-0.037, 0.481, -2.3, 4.917, -1.791)


def _is_concrete(x) -> bool:
    return isinstance(x, (int, float, np.ndarray, np.generic)) or (
        isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
    )


def _check_positive(name: str, value) -> None:
    """Raises ValueError if a concrete `value` has an entry <= 0 (traced values are not checked)."""
    if value is None or not _is_concrete(value):
        return
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if np.any(~np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _register(cls, data_fields):
    """Registers ``cls`` as a pytree whose unflatten skips ``__init__`` (and its validation).

    JAX rebuilds pytrees with arbitrary leaves (zeros in ``optax.init``, gradients, tracers), which a
    positivity check must not reject; validation happens only when a user constructs a variant.
    """
    data_fields = tuple(data_fields)
    meta_fields = tuple(f.name for f in dataclasses.fields(cls) if f.name not in data_fields)

    def flatten(v):
        children = [(jax.tree_util.GetAttrKey(n), getattr(v, n)) for n in data_fields]
        return children, tuple(getattr(v, n) for n in meta_fields)

    def unflatten(meta, children):
        v = object.__new__(cls)
        for n, x in zip(data_fields + meta_fields, tuple(children) + tuple(meta), strict=True):
            object.__setattr__(v, n, x)
        return v

    jax.tree_util.register_pytree_with_keys(cls, flatten, unflatten)
    return cls


@dataclasses.dataclass(frozen=True)
class Variant:
    """Base spec. Subclasses override the hooks they need; the defaults give plain softmax."""

    name: ClassVar[str] = "base"
    normalizer: ClassVar[str] = "softmax"  # "softmax" | "hardmax" | "topk"
    needs_stats: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    # The statistics sweep's entropy is -sum p log(p + entropy_eps) (adaptive temperature: the
    # paper's 1e-9, a dataclass field there). Unannotated here, so that it is no dataclass field of
    # the base: a field would come first in every subclass's positional arguments.
    entropy_eps = 0.0
    # Learned per-query-head fields: a module owns one parameter of shape [N] for each and
    # rebuilds the variant with them (SSMax's s).
    learned_fields: ClassVar[tuple[str, ...]] = ()
    # Registers initialised at zero rather than small random values (RBF: the origin is the
    # sink every query can fall back to).
    zero_registers: ClassVar[bool] = False

    def check_num_keys(self, num_keys: int) -> None:
        """Raises ValueError when the variant cannot run over ``num_keys`` keys (registers
        included)."""
        del num_keys

    def stats_gradient(self) -> bool:
        """Whether gradients flow through the statistics sweep (when :attr:`needs_stats`)."""
        return True

    def logit_scale(self, scale):
        """The scalar ``a`` multiplying ``q . k``."""
        return scale

    def key_bias(self, key, scale):
        """Per-key bias ``b_j`` as float32 ``[B, S, K]``, or None. ``key`` is ``[B, S, K, H]``."""
        del key, scale
        return None

    def key_bias_norm(self, scale):
        """``g`` when :meth:`key_bias` is ``g ||k_j||^2`` (computed in float32 from the keys as
        given), else None. A kernel hint: the fused backward then adds the bias's key gradient
        ``2 g db_j k_j`` to dk itself instead of leaving it to XLA."""
        del scale
        return None

    def query_offset(self, query, scale):
        """Per-query constant dropped from the logits (it cancels in the weights), ``[B, T, N]``.

        Only the reported logsumexp uses it, so that it is the logsumexp of the logits as the
        variant defines them.
        """
        del query, scale
        return None

    def query_scale(self, num_visible, entropy):
        """Per-query scale ``c_i``, broadcastable to ``[B, N, T]``, or None for 1.

        Args:
          num_visible: int32 ``[B, N, T]``, the keys each query can attend after masking.
          entropy: float32 ``[B, N, T]`` entropy of ``softmax(z / c)`` when :attr:`needs_stats`,
            else None.
        """
        del num_visible, entropy
        return None

    def query_scale_nonnegative(self) -> bool:
        """True when :meth:`query_scale` is known to be ``>= 0`` everywhere (a kernel hint: the
        fused forward then takes the row max before scaling, one multiply-add per logit)."""
        return False


@dataclasses.dataclass(frozen=True)
class Softmax(Variant):
    """Softmax attention at temperature ``theta``: ``p = softmax((scale q.k + bias) / theta)``.

    Args:
      temperature: ``theta > 0``; a float or a traced scalar.

    Examples:
      >>> import jax.numpy as jnp, jaxattn
      >>> q = k = v = jnp.ones((1, 4, 2, 8))
      >>> jaxattn.attention(q, k, v, variant=jaxattn.variants.Softmax(0.5)).shape
      (1, 4, 2, 8)
    """

    temperature: Any = 1.0
    name: ClassVar[str] = "softmax"

    def __post_init__(self):
        _check_positive("temperature", self.temperature)

    def query_scale(self, num_visible, entropy):
        if _is_concrete(self.temperature) and np.all(np.asarray(self.temperature) == 1.0):
            return None
        return 1.0 / jnp.asarray(self.temperature)  # no cast: float64 stays float64


@dataclasses.dataclass(frozen=True)
class AdaptiveTemperature(Variant):
    """Adaptive-temperature softmax (Velickovic et al., 2025).

    .. math::

      H_i = -\\sum_j p_{ij} \\log(p_{ij} + \\epsilon), \\quad p = \\text{softmax}(z) \\\\
      \\beta_i = \\max(1, \\text{polyval}(\\text{coeffs}, H_i)) \\text{ if } H_i > h_0 \\text{ else } 1
      \\\\ \\text{out} = \\text{softmax}(\\beta_i z_i) \\, V

    Args:
      coeffs: polynomial coefficients, highest power first (``numpy.polyval`` order).
      threshold: entropy ``h_0`` (nats) above which the temperature adapts.
      entropy_eps: the ``epsilon`` inside the paper's entropy (1e-9).
      stop_gradient_beta: if True, no gradient flows through ``beta`` (the paper's code has none).

    References:
      Velickovic, Perivolaropoulos, Barbero, Pascanu. "softmax is not enough (for sharp size
      generalisation)". ICML 2025. https://arxiv.org/abs/2410.01104
    """

    coeffs: tuple = ADAPTIVE_TEMPERATURE_COEFFS
    threshold: float = 0.5
    entropy_eps: float = 1e-9
    stop_gradient_beta: bool = False
    name: ClassVar[str] = "adaptive_temperature"
    needs_stats: ClassVar[bool] = True

    def __post_init__(self):
        try:
            coeffs = tuple(float(c) for c in self.coeffs)
        except (TypeError, ValueError):
            # e.g. AdaptiveTemperature(-1.0): the first positional argument is coeffs, not a
            # threshold or temperature
            raise TypeError("coeffs must be a sequence of real polynomial coefficients, highest "
                            f"power first (numpy.polyval order), got {self.coeffs!r}") from None
        if not coeffs:
            raise ValueError("coeffs must hold at least one coefficient")
        if not all(np.isfinite(coeffs)):
            raise ValueError(f"coeffs must be finite, got {coeffs}")
        object.__setattr__(self, "coeffs", coeffs)
        # An entropy in nats is >= 0, so a negative threshold adapts every row, as 0 does: it can
        # only be a mistake (e.g. a log-probability passed for an entropy). NaN fails the test too.
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float,
                                                                               np.number)):
            raise TypeError(f"threshold must be a real number (an entropy in nats), got "
                            f"{self.threshold!r}")
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (an entropy in nats, which is never "
                             f"negative), got {self.threshold}")
        if not 0 <= self.entropy_eps < np.inf:
            raise ValueError(f"entropy_eps must be finite and >= 0, got {self.entropy_eps}")

    def stats_gradient(self) -> bool:
        return not self.stop_gradient_beta

    def beta(self, entropy):
        """``beta(H)``: the paper's inverse temperature for entropy ``H`` (nats)."""
        poly = jnp.polyval(jnp.asarray(self.coeffs, entropy.dtype), entropy)
        beta = jnp.where(entropy > self.threshold, jnp.maximum(poly, 1.0), 1.0)
        return jax.lax.stop_gradient(beta) if self.stop_gradient_beta else beta

    def query_scale(self, num_visible, entropy):
        return self.beta(entropy)

    def query_scale_nonnegative(self) -> bool:
        return True  # beta >= 1 by construction


@dataclasses.dataclass(frozen=True)
class ScalableSoftmax(Variant):
    """Scalable-Softmax (SSMax): logits times ``s log n_i``, ``n_i`` = keys query ``i`` can attend.

    .. math:: p_{ij} = \\text{softmax}_j(s \\log(n_i) \\, z_{ij})

    Args:
      s: a finite scalar or one value per query head (shape ``[N]``); may be a traced (learned)
        array. Any sign is accepted: ``s = 0`` gives uniform weights over the visible keys and
        ``s < 0`` ranks keys by dissimilarity, ever more sharply as ``n_i`` grows. A learned ``s``
        may cross zero in training, and the module rebuilds this variant from its concrete value
        on every eager call, so rejecting a sign would break such models.

    References:
      Nakanishi. "Scalable-Softmax Is Superior for Attention". 2025.
      https://arxiv.org/abs/2501.19399
    """

    s: Any = 0.43
    name: ClassVar[str] = "scalable_softmax"
    learned_fields: ClassVar[tuple[str, ...]] = ("s",)

    def __post_init__(self):
        if not _is_concrete(self.s):
            return
        if np.ndim(self.s) > 1:
            raise ValueError(f"s must be a scalar or one value per query head [N], got shape "
                             f"{np.shape(self.s)}")
        arr = np.asarray(self.s)
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise TypeError(f"s must be a real number or array, got {self.s!r}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"s must be finite (it multiplies the logits by s log n), got "
                             f"{self.s!r}")

    def query_scale(self, num_visible, entropy):
        s = jnp.asarray(self.s)
        if s.ndim == 1:
            if s.shape[0] != num_visible.shape[1]:
                raise ValueError(f"s has {s.shape[0]} values but there are {num_visible.shape[1]} "
                                 "query heads")
            s = s[None, :, None]
        # log(n) with n >= 1; rows with n = 0 are fully masked and give zeros anyway.
        # Default float dtype: float32, or float64 under jax_enable_x64 (the reference casts c to
        # the logits' dtype).
        return s * jnp.log(jnp.maximum(num_visible, 1).astype(float))

    def query_scale_nonnegative(self) -> bool:
        return _is_concrete(self.s) and bool(np.all(np.asarray(self.s) >= 0))  # log n_i >= 0


@dataclasses.dataclass(frozen=True)
class RBF(Variant):
    """RBF (distance) attention: ``z_ij = -gamma ||q_i - k_j||^2``.

    Softmax is shift-invariant per query, so this is dot-product attention at scale ``2 gamma``
    with the per-key bias ``-gamma ||k_j||^2``; the ``-gamma ||q_i||^2`` term cancels.

    Args:
      gamma: ``> 0``; None uses the call's ``scale`` (which defaults to ``1/sqrt(H)``).

    References:
      Pisoni. "Scaled RBF Attention". 2026. Code: https://github.com/4rtemi5/rbf_attention
    """

    gamma: Any = None
    name: ClassVar[str] = "rbf"
    zero_registers: ClassVar[bool] = True

    def __post_init__(self):
        _check_positive("gamma", self.gamma)

    def _gamma(self, scale):
        return scale if self.gamma is None else self.gamma

    def logit_scale(self, scale):
        return 2.0 * self._gamma(scale)

    def key_bias(self, key, scale):
        k = key.astype(jnp.promote_types(key.dtype, jnp.float32))
        return -self._gamma(scale) * jnp.einsum("BSKH,BSKH->BSK", k, k)

    def key_bias_norm(self, scale):
        return -self._gamma(scale)

    def query_offset(self, query, scale):
        q = query.astype(jnp.promote_types(query.dtype, jnp.float32))
        return -self._gamma(scale) * jnp.einsum("BTNH,BTNH->BTN", q, q)


@dataclasses.dataclass(frozen=True)
class Hardmax(Variant):
    """Hardmax attention: uniform weight over each query's maximal logits (ties share equally).

    The limit ``beta -> infinity`` of ``softmax(beta z)``. Forward-only: differentiating raises.
    """

    name: ClassVar[str] = "hardmax"
    normalizer: ClassVar[str] = "hardmax"
    differentiable: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class TopK(Variant):
    """Top-k attention: softmax over each query's ``k`` largest visible logits, zero elsewhere.

    Ties are broken deterministically by key index: among equal logits the lower index is kept
    (``jax.lax.top_k`` order), with registers counted before the sequence keys. A query with fewer
    than ``k`` visible keys keeps all of them. Forward-only: differentiating raises.

    Args:
      k: a static int in ``[1, S]``.
    """

    k: int = 1
    name: ClassVar[str] = "topk"
    normalizer: ClassVar[str] = "topk"
    differentiable: ClassVar[bool] = False

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)):
            raise TypeError(f"k must be a static int, got {self.k!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def check_num_keys(self, num_keys: int) -> None:
        if not 1 <= self.k <= num_keys:
            raise ValueError(f"TopK k must be in [1, S] = [1, {num_keys}] (keys incl. registers), "
                             f"got {self.k}")


Softmax = _register(Softmax, ["temperature"])
AdaptiveTemperature = _register(AdaptiveTemperature, [])
ScalableSoftmax = _register(ScalableSoftmax, ["s"])
RBF = _register(RBF, ["gamma"])
Hardmax = _register(Hardmax, [])
TopK = _register(TopK, [])

_BY_NAME = {
    "softmax": Softmax,
    "adaptive_temperature": AdaptiveTemperature,
    "scalable_softmax": ScalableSoftmax,
    "rbf": RBF,
    "hardmax": Hardmax,
}
VARIANT_NAMES = tuple(_BY_NAME)


def get_variant(variant) -> Variant:
    """Returns the spec for a name (see :data:`VARIANT_NAMES`) or passes a :class:`Variant` through."""
    if isinstance(variant, Variant):
        return variant
    if isinstance(variant, str):
        if variant not in _BY_NAME:
            raise ValueError(f"variant must be one of {list(VARIANT_NAMES)} or a "
                             f"jaxattn.variants.Variant, got {variant!r}")
        return _BY_NAME[variant]()
    raise TypeError(f"variant must be a name (one of {list(VARIANT_NAMES)}) or a "
                    f"jaxattn.variants.Variant, got {type(variant).__name__}")
