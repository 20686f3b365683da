"""Exact float64 oracles for small networks, independent of crsam's estimators.

:mod:`crsam.verify.exact` differentiates a network's loss from the definitions with
``torch.func`` (dense Hessians, traces, third-derivative contractions);
:mod:`crsam.verify.closed_forms` contains closed forms (linear models, Gaussian expectations of
polynomials, kl values with mpmath) that check those oracles in turn.
"""

from crsam.verify.closed_forms import (
    gaussian_expectation_of_polynomial,
    kl_bernoulli_high_precision,
    kl_gaussians_isotropic,
    kl_inv_upper_high_precision,
    linear_cross_entropy_hessian,
    linear_cross_entropy_trace,
    linear_squared_error_hessian,
    polynomial_value,
)
from crsam.verify.networks import random_classification_data, smooth_cnn1d, smooth_mlp
from crsam.verify.exact import (
    directional_derivative,
    exact_gradient,
    exact_hessian,
    exact_third_contraction,
    exact_trace,
    flatten_parameters,
    loss_of_flat,
    parameter_names,
    unflatten_parameters,
)

__all__ = [
    "directional_derivative",
    "exact_gradient",
    "exact_hessian",
    "exact_third_contraction",
    "exact_trace",
    "flatten_parameters",
    "gaussian_expectation_of_polynomial",
    "kl_bernoulli_high_precision",
    "kl_gaussians_isotropic",
    "kl_inv_upper_high_precision",
    "linear_cross_entropy_hessian",
    "linear_cross_entropy_trace",
    "linear_squared_error_hessian",
    "loss_of_flat",
    "random_classification_data",
    "smooth_cnn1d",
    "smooth_mlp",
    "parameter_names",
    "polynomial_value",
    "unflatten_parameters",
]
