"""jaxattn: attention variants for JAX, with references, Flax NNX modules and Pallas kernels."""

from jaxattn import variants
from jaxattn.api import IMPLEMENTATIONS, attention, attention_weights
from jaxattn.reference import AttentionStats, attention_reference, attention_weights_reference
from jaxattn.variants import (
    RBF,
    VARIANT_NAMES,
    AdaptiveTemperature,
    Hardmax,
    ScalableSoftmax,
    Softmax,
    TopK,
    get_variant,
)

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_weights",
    "attention_reference",
    "attention_weights_reference",
    "AttentionStats",
    "IMPLEMENTATIONS",
    "variants",
    "Softmax",
    "AdaptiveTemperature",
    "ScalableSoftmax",
    "RBF",
    "Hardmax",
    "TopK",
    "VARIANT_NAMES",
    "get_variant",
]

from jaxattn.modules import MultiHeadAttention, attention_fn  # noqa: E402

__all__ += ["MultiHeadAttention", "attention_fn"]

from jaxattn import parallel  # noqa: E402
from jaxattn.parallel import Parallelism, sharded_attention  # noqa: E402

__all__ += ["parallel", "Parallelism", "sharded_attention"]
