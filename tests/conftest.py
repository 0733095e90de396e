"""Test-session settings: float64 on, rank promotion strict, hypothesis profiles.

Profiles: ``dev`` (default, 10 examples) and ``ci`` (25 examples, derandomized, no database),
chosen by ``HYPOTHESIS_PROFILE`` or ``CI=true``.
"""

import os

import hypothesis
import jax

# The Mosaic GPU interpreter simulates each warpgroup with a thread; with too few CPU devices its
# thread pool can deadlock on a 2-core machine (pallas_kernels/NOTES_backward.md).
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile("dev", max_examples=10, deadline=None)
hypothesis.settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, database=None,
    print_blob=True, suppress_health_check=[hypothesis.HealthCheck.too_slow])
_default = "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))
