"""The XLA reference against the float64 oracle: forward, statistics and gradients."""

from tests.conformance import AttentionConformance


class TestXlaConformance(AttentionConformance):
    """``implementation="xla"`` in float64: it must match the oracle to float64 precision."""

    IMPLEMENTATION = "xla"
    DTYPES = ("float64",)
