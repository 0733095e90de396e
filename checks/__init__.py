"""GPU correctness checks of the fused kernels and of the public API, at realistic sizes.

They sit outside the library packages: they import ``pallas_kernels`` and ``jaxattn``, nothing
imports them but the tests (which run their case routines at tiny sizes in the interpreter).

* ``python -m checks.forward``: the forward kernels and the statistics sweep;
* ``python -m checks.backward``: the backward kernels (dq, dk/dv), with timing;
* ``python -m checks.api``: ``jaxattn.attention`` on the fused path against the XLA path.

``python3 -m benchmarks check`` runs the three. Without a GPU each exits at once with status 2.
"""
