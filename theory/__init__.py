"""PAC-Bayes bounds and Bernoulli kl inverses in numpy/scipy, with no torch dependency.

Every bound is an upper bound on the expected risk of the stochastic predictor, which draws fresh
weights from the posterior for each prediction. All functions are vectorized over numpy arrays
and raise ``ValueError`` naming the value when an argument is invalid. The sympy derivations
live in ``crsam.theory.symbolic``, which is imported on demand because sympy is slow to load.
"""

from .bernoulli import kl, kl_inv_lower, kl_inv_lower_grad, kl_inv_upper, kl_inv_upper_grad
from .bounds import (
    catoni_bound,
    catoni_grid_bound,
    kl_bound,
    lambda_bound,
    log_maurer_xi,
    mcallester_bound,
    optimal_lambda,
    quad_bound,
    sample_bound,
)
from .gaussian import gaussian_kl
from .prior_grid import (
    PriorVarianceGridPoint,
    dziugaite_roy_bound,
    prior_variance_grid,
    prior_variance_union_cost,
    round_prior_variance,
)
from .second_order import SecondOrderBound, clipped_cross_entropy, second_order_bound, smooth_bounded_cross_entropy

__all__ = [
    "kl",
    "kl_inv_upper",
    "kl_inv_lower",
    "kl_inv_upper_grad",
    "kl_inv_lower_grad",
    "kl_bound",
    "mcallester_bound",
    "quad_bound",
    "lambda_bound",
    "optimal_lambda",
    "catoni_bound",
    "catoni_grid_bound",
    "sample_bound",
    "log_maurer_xi",
    "gaussian_kl",
    "PriorVarianceGridPoint",
    "prior_variance_grid",
    "round_prior_variance",
    "prior_variance_union_cost",
    "dziugaite_roy_bound",
    "clipped_cross_entropy",
    "smooth_bounded_cross_entropy",
    "SecondOrderBound",
    "second_order_bound",
]
