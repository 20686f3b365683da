r"""Union bound over a grid of prior variances (Dziugaite and Roy 2017).

A prior :math:`P = \mathcal{N}(w_0, \lambda I)` must be fixed before the data, but the best
variance :math:`\lambda` is found by optimizing the bound. Dziugaite and Roy make the choice
legitimate by restricting :math:`\lambda` to the countable grid

.. math::

    \lambda_j = c\,e^{-j/b}, \qquad j = 1, 2, \dots,

and giving grid point :math:`j` the failure probability
:math:`\delta_j = 6\delta / (\pi^2 j^2)`, which sums to :math:`\delta` because
:math:`\sum_{j \ge 1} 1/j^2 = \pi^2/6`. Replacing :math:`\delta` by :math:`\delta_j` adds

.. math::

    \ln\frac{\pi^2 j^2}{6} = 2\ln j + \ln\frac{\pi^2}{6}

nats to the numerator of the PAC-Bayes term. An optimized variance :math:`\lambda` maps to
:math:`j = b \ln(c/\lambda)`, which is rounded to an integer (and the KL recomputed at the
rounded variance). Variances above :math:`\lambda_1 = c e^{-1/b}`, including those above
:math:`c` where :math:`\ln(c/\lambda) < 0`, are moved to :math:`j = 1` and flagged, so that the
union-bound cost is finite and never NaN for any positive finite variance.

References
----------
- Dziugaite, G. K., & Roy, D. M. (2017). Computing nonvacuous generalization bounds for deep
  (stochastic) neural networks with many more parameters than training data. UAI.
  Released code: github.com/gkdziugaite/pacbayes-opt, ``snn/core/network.py``.
"""

import dataclasses
import math

import numpy as np

from ._validation import check_count, check_delta, check_nonnegative, check_probability, scalar_or_array
from .bernoulli import kl_inv_upper

__all__ = [
    "PriorVarianceGridPoint",
    "prior_variance_grid",
    "round_prior_variance",
    "prior_variance_union_cost",
    "dziugaite_roy_bound",
]

_ROUNDING_DIRECTIONS = ("nearest", "larger_variance", "smaller_variance")


@dataclasses.dataclass(frozen=True)
class PriorVarianceGridPoint:
    """A prior variance rounded onto the grid ``c * exp(-j / b)``, with its union-bound cost.

    Attributes
    ----------
    index : int
        Grid index ``j >= 1``.
    variance : float
        Grid variance ``c * exp(-index / b)``; recompute the KL at this value.
    union_cost : float
        ``ln(pi^2 j^2 / 6)`` nats, to add to the KL in the PAC-Bayes numerator.
    requested_variance : float
        The variance that was rounded.
    at_edge : bool
        True when the requested variance lay above the first grid point ``c * exp(-1 / b)`` and
        was moved down to it. A grid with a larger ``c`` would have fit the optimized variance.
    """

    index: int
    variance: float
    union_cost: float
    requested_variance: float
    at_edge: bool


def _check_grid_parameters(b, c):
    """Check the grid density ``b`` and scale ``c`` (finite floats > 0)."""
    for name, value in (("b", b), ("c", c)):
        if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(b), float(c)


def prior_variance_union_cost(index):
    r"""Compute the union-bound cost :math:`\ln(\pi^2 j^2 / 6)` in nats of grid point ``index``.

    Parameters
    ----------
    index : int or array_like of int
        Grid index :math:`j \ge 1`.

    Examples
    --------
    >>> round(prior_variance_union_cost(1), 12)  # ln(pi^2 / 6)
    0.497700302471
    """
    index = check_count(index, "index")
    return scalar_or_array(2.0 * np.log(index) + math.log(math.pi**2 / 6.0))


def prior_variance_grid(b, c, size):
    r"""List the first ``size`` grid variances :math:`\lambda_j = c e^{-j/b}`, :math:`j = 1, \dots`.

    Parameters
    ----------
    b : float
        Grid density: points per factor :math:`e` of variance (Dziugaite and Roy use 100).
    c : float
        Scale: every grid variance is below :math:`c` (Dziugaite and Roy use 0.1).
    size : int
        Number of grid points, >= 1.

    Returns
    -------
    numpy.ndarray
        The variances, decreasing.
    """
    b, c = _check_grid_parameters(b, c)
    size = int(check_count(size, "size"))
    j = np.arange(1, size + 1, dtype=np.float64)
    return c * np.exp(-j / b)


def round_prior_variance(variance, b, c, direction="nearest"):
    r"""Round a prior variance onto the grid :math:`c e^{-j/b}` and return its union-bound cost.

    The continuous index is :math:`j = b \ln(c/\lambda)`. ``direction`` picks the neighbouring
    integer: ``"nearest"``, ``"larger_variance"`` (:math:`\lfloor j \rfloor`) or
    ``"smaller_variance"`` (:math:`\lceil j \rceil`); Dziugaite and Roy evaluate both neighbours
    and keep the better bound, which costs nothing extra because every grid point is already
    paid for. An index below 1 is moved to 1 with ``at_edge=True``.

    Parameters
    ----------
    variance : float
        The optimized prior variance :math:`\lambda`, finite and > 0.
    b, c : float
        Grid density and scale, as in :func:`prior_variance_grid`.
    direction : str
        ``"nearest"``, ``"larger_variance"`` or ``"smaller_variance"``.

    Returns
    -------
    PriorVarianceGridPoint

    Raises
    ------
    ValueError
        If the variance is not finite and > 0, ``b`` or ``c`` is invalid, ``direction`` is
        unknown, or the index does not fit in a float (``b`` near 1e300).

    Examples
    --------
    >>> point = round_prior_variance(0.5, b=100, c=0.1)
    >>> point.index, point.at_edge
    (1, True)
    """
    b, c = _check_grid_parameters(b, c)
    if not (isinstance(variance, (int, float, np.floating, np.integer)) and math.isfinite(variance) and variance > 0):
        raise ValueError(f"variance must be a finite number > 0, got {variance!r}.")
    if direction not in _ROUNDING_DIRECTIONS:
        raise ValueError(f"direction must be one of {_ROUNDING_DIRECTIONS}, got {direction!r}.")

    # Continuous index j = b ln(c / variance); ln of two positive finite floats is finite.
    continuous = b * (math.log(c) - math.log(variance))
    if not math.isfinite(continuous):
        raise ValueError(f"the grid index b * ln(c / variance) overflows for b = {b!r}; choose a smaller b.")
    rounders = {"nearest": round, "larger_variance": math.floor, "smaller_variance": math.ceil}
    index = int(rounders[direction](continuous))

    # Indices below 1 (variances above c * exp(-1 / b)) go to the first grid point.
    at_edge = index < 1
    index = max(index, 1)
    grid_variance = c * math.exp(-index / b)
    if grid_variance == 0.0:
        raise ValueError(
            f"variance {variance!r} rounds to grid index {index}, whose variance underflows float64. "
            "Use a larger prior variance."
        )
    return PriorVarianceGridPoint(
        index=index,
        variance=grid_variance,
        union_cost=float(prior_variance_union_cost(index)),
        requested_variance=float(variance),
        at_edge=at_edge,
    )


def dziugaite_roy_bound(risk, kl, n, delta, index, *, form="maurer"):
    r"""Compute the PAC-Bayes-kl bound for a prior variance on the grid, union bound included.

    With probability at least :math:`1 - \delta`, simultaneously for every grid index :math:`j`
    and every posterior:

    - ``form="maurer"`` (default, the tighter one):

      .. math::

          L_D(Q) \le \mathrm{kl}^{-1}_{+}\Big(\hat L_S(Q),
              \frac{\mathrm{KL}(Q\|P_j) + \ln(\pi^2 j^2/6) + \ln(2\sqrt{n}/\delta)}{n}\Big);

    - ``form="dziugaite-roy-code"``, the budget computed in Dziugaite and Roy's released code,
      for reproducing their published numbers:

      .. math::

          \frac{\mathrm{KL}(Q\|P_j) + 2\ln j + \ln(\pi^2 n / (6\delta))}{n - 1}.

    Parameters
    ----------
    risk : float or array_like
        Empirical risk in [0, 1] on the ``n`` examples (in practice a Monte-Carlo upper bound on
        it, from :func:`crsam.theory.sample_bound`, whose own delta is counted separately).
    kl : float or array_like
        :math:`\mathrm{KL}(Q\|P_j)` in nats, computed with the grid variance of ``index``.
    n : int
        Number of examples, >= 1 (>= 2 for the released-code form).
    delta : float
        Failure probability in (0, 1) for the whole grid.
    index : int
        Grid index :math:`j \ge 1` from :func:`round_prior_variance`.
    form : str
        ``"maurer"`` or ``"dziugaite-roy-code"``.

    Returns
    -------
    float or numpy.ndarray
        The bound, in [0, 1].
    """
    risk = check_probability(risk, "risk")
    kl = check_nonnegative(kl, "kl")
    n = check_count(n, "n")
    delta = check_delta(delta)
    index = check_count(index, "index")

    # Numerator and denominator of the kl budget for the requested form.
    if form == "maurer":
        numerator = kl + prior_variance_union_cost(index) + (math.log(2.0) + 0.5 * np.log(n) - np.log(delta))
        denominator = n
    elif form == "dziugaite-roy-code":
        if np.any(n < 2):
            raise ValueError(f"n must be >= 2 for form='dziugaite-roy-code', got {float(np.min(n))!r}.")
        numerator = kl + 2.0 * np.log(index) + np.log(math.pi**2 * n / (6.0 * delta))
        denominator = n - 1.0
    else:
        raise ValueError(f"form must be 'maurer' or 'dziugaite-roy-code', got {form!r}.")
    return kl_inv_upper(risk, numerator / denominator)
