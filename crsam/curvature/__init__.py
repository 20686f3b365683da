"""Curvature of a network's loss: Hessian-vector products, traces, eigenvalues and reports.

Everything works on the loss as a function of the flat parameter vector
(:class:`EmpiricalLoss`), averaged over a whole data set in batches. Estimators accept that
loss, a dense symmetric matrix, or any ``matmat`` callable, and report their uncertainty.
"""

from crsam.curvature.eigen import EigenResult, top_eigenvalues
from crsam.curvature.functional import EmpiricalLoss, FiniteDifferenceHessian, finite_difference_step
from crsam.curvature.operators import Operator, as_operator
from crsam.curvature.report import (
    METHODS,
    curvature_report,
    format_curvature_table,
    gradient_direction_curvature,
    normalized_trace,
)
from crsam.curvature.trace import TraceEstimate, exact_trace, hutchinson_trace, hutchpp_trace, xtrace_trace

__all__ = [
    "METHODS",
    "EigenResult",
    "EmpiricalLoss",
    "FiniteDifferenceHessian",
    "Operator",
    "TraceEstimate",
    "as_operator",
    "curvature_report",
    "exact_trace",
    "finite_difference_step",
    "format_curvature_table",
    "gradient_direction_curvature",
    "hutchinson_trace",
    "hutchpp_trace",
    "normalized_trace",
    "top_eigenvalues",
    "xtrace_trace",
]
