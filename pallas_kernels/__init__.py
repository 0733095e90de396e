"""Fused Pallas (Mosaic GPU) attention kernels over plain arrays.

The kernel-level problem (:mod:`pallas_kernels.common`) is

.. math::

  z_{ij} = c_i \\, (a \\, q_i \\cdot k_j + b_j), \\qquad
  o_i = \\sum_j \\text{softmax}_j(z_{i\\cdot}) \\, v_j

over the keys a :class:`MaskSpec` leaves visible: ``a`` a python float, ``c`` a per-query and ``b``
a per-key float32 array. This package knows no attention variant and imports nothing from
``jaxattn``: the library turns each variant's plan into ``a``, ``b`` and ``c``
(``jaxattn.fused``).

* :func:`flash_attention`, :func:`flash_entropy`, :func:`flash_entropy_scaled` -- differentiable
  ops (``jax.custom_vjp``); :func:`flash_hardmax` -- hardmax on the forward kernel (forward-only);
* :func:`flash_forward`, :func:`flash_stats`, :func:`flash_backward` -- the kernels themselves;
* :class:`MaskSpec`, :func:`visible`, :func:`count_visible` -- the mask description and the one
  visibility rule; :func:`flash_reference` -- the pure-jnp oracle of the kernel-level problem.
"""

from pallas_kernels.backward import BackwardBlockSizes, flash_backward, fuses_entropy_grad
from pallas_kernels.common import BaseEntropy, MaskSpec, flash_reference, visible
from pallas_kernels.forward import (
    BlockSizes,
    count_visible,
    flash_forward,
    flash_stats,
    row_max_from_stats,
    scale_row_max,
)
from pallas_kernels.ops import flash_attention, flash_entropy, flash_entropy_scaled, flash_hardmax

__all__ = [
    "MaskSpec",
    "BaseEntropy",
    "visible",
    "count_visible",
    "flash_reference",
    "flash_attention",
    "flash_entropy",
    "flash_entropy_scaled",
    "flash_hardmax",
    "flash_forward",
    "flash_stats",
    "flash_backward",
    "fuses_entropy_grad",
    "BlockSizes",
    "BackwardBlockSizes",
    "scale_row_max",
    "row_max_from_stats",
]
