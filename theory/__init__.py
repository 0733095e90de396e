"""Numerical checks of the published claims behind jaxattn's attention variants.

* :mod:`theory.dispersion` -- dispersion of softmax-type attention (Velickovic et al., 2025) and the
  limits of normalisation and top-N selection (Mudarisov et al., 2025): both sides of every claim.
* :mod:`theory.sample_complexity` -- attention on a token distribution and its Monte Carlo
  convergence (Bohbot et al., 2026): exact limits, estimators with replicates, slope fits.
* :mod:`theory.hardmax` -- the ``lambda -> infinity`` limit of softmax attention.
* ``python -m theory.check`` prints one row per claim with its status and numbers.

Every attention computation goes through :func:`jaxattn.attention` or
:func:`jaxattn.attention_weights` (the reference implementation), so the checks run on the same
functions that models train with. See ``docs/science.md`` section 2 for the claims.
"""

from theory import dispersion, hardmax, sample_complexity

__all__ = ["dispersion", "hardmax", "sample_complexity"]
