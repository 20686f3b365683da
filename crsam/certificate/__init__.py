"""PAC-Bayes certificates for trained networks.

:func:`certify` bounds the expected 0-1 error of the Gaussian posterior ``N(w, sigma^2 I)``
around a trained network, with the prior ``N(w0, sigma^2 I)`` at weights chosen without the
bound's data. It chooses sigma from a fixed grid and estimates the posterior's training error by
Monte Carlo, and it counts both steps in the failure probability it reports.
:func:`format_certificate_table` renders the report as text.
"""

from .gaussian import (
    BOUND_NAMES,
    DEFAULT_DELTA,
    DEFAULT_MC_SAMPLES,
    DEFAULT_MONTE_CARLO_FRACTION,
    DEFAULT_SELECTION_SAMPLES,
    DEFAULT_SIGMA_GRID,
    certify,
    noise_seeds,
)
from .montecarlo import ParameterLayout, WeightSampler, count_errors, estimate_errors
from .table import format_certificate_table

__all__ = [
    "BOUND_NAMES",
    "DEFAULT_DELTA",
    "DEFAULT_MC_SAMPLES",
    "DEFAULT_MONTE_CARLO_FRACTION",
    "DEFAULT_SELECTION_SAMPLES",
    "DEFAULT_SIGMA_GRID",
    "ParameterLayout",
    "WeightSampler",
    "certify",
    "count_errors",
    "estimate_errors",
    "format_certificate_table",
    "noise_seeds",
]
