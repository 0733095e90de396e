"""Test-session settings: float64 on, rank promotion strict, hypothesis profiles.

Profiles (``HYPOTHESIS_PROFILE`` picks one; the default is ``ci``, with or without ``CI=true``):

* ``ci``: 25 examples, derandomized, no example database. Every run draws the same examples, so
  ``./test.sh`` gives the same verdict on a fresh clone, on a rerun, and in CI; a failure stored
  by an earlier run cannot make later runs fail.
* ``fuzz``: 500 random examples per test, with the example database in ``.hypothesis/`` (a found
  failure is replayed first on the next fuzz run). For hunting bugs, on chosen files, e.g.
  ``HYPOTHESIS_PROFILE=fuzz .venv/bin/python -m pytest tests/test_theory_dispersion.py``.

The profile is loaded here, at import of this conftest, which pytest does before it imports any
test module: settings objects built at module level (``tests/conformance.py``'s ``NO_SHRINK``)
inherit from it. ``tests/test_theory_profiles.py`` checks both.
"""

import os
import pathlib

import hypothesis
import jax

# The Mosaic GPU interpreter simulates each warpgroup with a thread; with too few CPU devices its
# thread pool can deadlock on a 2-core machine (docs/kernels.md, "Pallas on Hopper").
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

_SLOW_OK = [hypothesis.HealthCheck.too_slow]
hypothesis.settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, database=None,
    print_blob=True, suppress_health_check=_SLOW_OK)
# The database path is absolute, so fuzz runs from any working directory share one store.
hypothesis.settings.register_profile(
    "fuzz", max_examples=500, deadline=None, derandomize=False,
    database=hypothesis.database.DirectoryBasedExampleDatabase(
        pathlib.Path(__file__).resolve().parent.parent / ".hypothesis" / "examples"),
    print_blob=True, suppress_health_check=_SLOW_OK)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
