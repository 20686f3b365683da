"""PAC-Bayes certificates for trained networks.

:func:`certify` bounds the expected 0-1 error of the Gaussian posterior ``N(w, sigma^2 I)``
around a trained network, with the prior ``N(w0, sigma^2 I)`` at weights chosen without the
bound's data. It chooses sigma from a fixed grid and estimates the posterior's training error by
Monte Carlo, and it counts both steps in the failure probability it reports. Besides the kl
family (kl, McAllester, quadratic), it can report Catoni's bound and the Dziugaite-Roy
prior-variance bound, each family with its own share of the failure probability.

:func:`tight_certificate` trains the prior's mean on a held-out split of the training set,
fits a Gaussian posterior with per-layer or per-parameter variances by minimizing a PAC-Bayes
objective, and certifies it on the other split with fresh Monte-Carlo samples.
:func:`format_certificate_table` renders either report as text.
"""

from .gaussian import (
    BOUND_FAMILIES,
    BOUND_NAMES,
    DEFAULT_CATONI_GRID,
    DEFAULT_DELTA,
    DEFAULT_FAMILIES,
    DEFAULT_MC_SAMPLES,
    DEFAULT_MONTE_CARLO_FRACTION,
    DEFAULT_PRIOR_VARIANCE_B,
    DEFAULT_PRIOR_VARIANCE_C,
    DEFAULT_SELECTION_SAMPLES,
    DEFAULT_SIGMA_GRID,
    certify,
    noise_seeds,
)
from .montecarlo import (
    MAX_DRAWS,
    MonteCarloErrors,
    ParameterLayout,
    WeightSampler,
    count_errors,
    estimate_errors,
)
from .table import format_certificate_table
from .tight import (
    DEFAULT_TIGHT_MC_SAMPLES,
    certify_diagonal_posterior,
    optimize_posterior,
    tight_certificate,
    tight_certificate_for_run,
    tight_noise_seeds,
    train_prior,
)

__all__ = [
    "BOUND_FAMILIES",
    "BOUND_NAMES",
    "DEFAULT_CATONI_GRID",
    "DEFAULT_DELTA",
    "DEFAULT_FAMILIES",
    "DEFAULT_MC_SAMPLES",
    "DEFAULT_MONTE_CARLO_FRACTION",
    "DEFAULT_PRIOR_VARIANCE_B",
    "DEFAULT_PRIOR_VARIANCE_C",
    "DEFAULT_SELECTION_SAMPLES",
    "DEFAULT_SIGMA_GRID",
    "DEFAULT_TIGHT_MC_SAMPLES",
    "MAX_DRAWS",
    "MonteCarloErrors",
    "ParameterLayout",
    "WeightSampler",
    "certify",
    "certify_diagonal_posterior",
    "count_errors",
    "estimate_errors",
    "format_certificate_table",
    "noise_seeds",
    "optimize_posterior",
    "tight_certificate",
    "tight_certificate_for_run",
    "tight_noise_seeds",
    "train_prior",
]
