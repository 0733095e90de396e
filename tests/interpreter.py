"""What every test module that runs the Mosaic GPU interpreter on CPU shares.

The interpreter runs each simulated warpgroup as its own XLA CPU computation that blocks in barrier
callbacks: with a CPU thread pool smaller than the number of threads blocked at once it deadlocks (seen
on the 2-core box). ``tests/conftest.py`` starts the backend with 8 CPU devices, which is enough;
``pytestmark = needs_interpreter_threads`` skips a module (instead of hanging) if that did not happen.

A second deadlock (``docs/kernels.md``, "Pallas on Hopper"): an eager XLA op queued on the CPU
device while an interpreted kernel runs waits behind the kernel, whose simulated threads wait for their
own ops behind it. Test code blocks on each kernel's result (:func:`blocking`) before queueing more.
"""

import functools
import os

import jax
import pytest

needs_interpreter_threads = pytest.mark.skipif(
    jax.default_backend() == "cpu" and jax.device_count() < 4 and (os.cpu_count() or 1) < 8,
    reason="the Mosaic GPU interpreter may deadlock with a small CPU thread pool: set "
           "jax_num_cpu_devices=8 before the backend starts (tests/conftest.py)")


def blocking(fn):
    """``fn`` that blocks until its results are computed (``jax.block_until_ready``)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return jax.block_until_ready(fn(*args, **kwargs))
    return call
