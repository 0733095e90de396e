"""Speed, memory and tuning benchmarks of jaxattn's kernels: ``python3 -m benchmarks --help``."""

import sys


def require_gpu(what):
    """Exits with status 2 and a message when JAX has no GPU backend (these scripts time a GPU)."""
    import jax
    if jax.default_backend() != "gpu":
        print(f"{what} needs an NVIDIA Hopper GPU (JAX backend 'gpu'); this machine's backend is "
                 f"{jax.default_backend()!r}. On a CPU, run the tests instead (./test.sh): they "
                 "check the kernels under the Mosaic GPU interpreter.", file=sys.stderr)
        sys.exit(2)
