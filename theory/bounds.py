r"""PAC-Bayes upper bounds on the expected risk of a stochastic predictor with a [0, 1]-valued loss.

Setting: a prior :math:`P` fixed before seeing the :math:`n` i.i.d. examples of the bound, any
posterior :math:`Q`, the posterior's empirical risk :math:`\hat L = \hat L_S(Q)` (the loss
averaged over the examples and over :math:`h \sim Q`) and its true risk :math:`L = L_D(Q)`. Every
bound here certifies :math:`L_D(Q)`, the risk of the *stochastic* predictor that draws a fresh
:math:`h \sim Q` for each prediction, not the risk of the posterior mean.

The kl family follows from one event. With probability at least :math:`1 - \delta`, for all
:math:`Q` simultaneously (Seeger 2002; Maurer 2004),

.. math::

    \mathrm{kl}(\hat L \,\|\, L) \le B, \qquad
    B = \frac{\mathrm{KL}(Q\|P) + \ln(\xi(n) / \delta)}{n}, \qquad
    \sqrt{n} \le \xi(n) \le 2\sqrt{n},

so :func:`kl_bound`, :func:`mcallester_bound`, :func:`quad_bound` and :func:`lambda_bound` (for
every ``lam``) hold together on that event and may be minimized over freely without further
confidence cost. They use :math:`2\sqrt{n}` by default and the exact :math:`\xi(n)` with
``maurer_xi=True``. Catoni's bound is a different event for each ``C``; a minimum over a grid of
``C`` pays a union bound (:func:`catoni_grid_bound`).

Closed-form bounds are evaluated in float64 with a relative error of a few ulps and then raised
by ``CLOSED_FORM_REL_SLACK`` (16 ulps), so the returned value is never below the formula's exact
value at the given inputs. The kl-inverse bounds are conservative by construction
(:mod:`crsam.theory.bernoulli`). Values are not clipped to [0, 1]: a value above 1 is a true but
vacuous bound.

References
----------
- Catoni, O. (2007). PAC-Bayesian supervised classification: the thermodynamics of statistical
  learning. IMS Lecture Notes Monograph Series 56.
- Hoeffding, W. (1963). Probability inequalities for sums of bounded random variables. Journal
  of the American Statistical Association 58(301).
- Langford, J., & Caruana, R. (2001). (Not) bounding the true error. NeurIPS 14.
- Maurer, A. (2004). A note on the PAC Bayesian theorem. arXiv:cs/0411099.
- McAllester, D. (1999). PAC-Bayesian model averaging. COLT.
- Perez-Ortiz, M., Rivasplata, O., Shawe-Taylor, J., & Szepesvari, C. (2021). Tighter risk
  certificates for neural networks. JMLR 22.
- Seeger, M. (2002). PAC-Bayesian generalisation error bounds for Gaussian process
  classification. JMLR 3.
- Thiemann, N., Igel, C., Wintenberger, O., & Seldin, Y. (2017). A strongly quasiconvex
  PAC-Bayesian bound. ALT.
"""

import functools
import math

import numpy as np
from scipy.special import gammaln

from ._validation import (
    as_float_array,
    check_count,
    check_delta,
    check_nonnegative,
    check_open_interval,
    check_positive,
    check_probability,
    scalar_or_array,
)
from .bernoulli import kl_inv_upper

__all__ = [
    "log_maurer_xi",
    "kl_bound",
    "mcallester_bound",
    "quad_bound",
    "lambda_bound",
    "catoni_bound",
    "catoni_grid_bound",
    "sample_bound",
    "optimal_lambda",
]

_EPS = np.finfo(np.float64).eps

# Upward relative margin for closed-form bounds. Each formula takes at most about ten correctly
# rounded operations (log, sqrt, expm1, products, sums of non-negative terms, one division).
# Each adds at most half an ulp of relative error to non-negative quantities, so 16 ulps covers
# the accumulated error.
CLOSED_FORM_REL_SLACK = 16 * _EPS

# Below this size the Stirling remainder is taken from gammaln directly, with an absolute error of
# about 1e-14. From here on the asymptotic series is used, whose first omitted term
# 1/(1188 m^9) is below 1e-16.
_STIRLING_SERIES_FROM = 30

# Terms of the xi(n) sum evaluated per numpy batch, which bounds memory for large n.
_XI_CHUNK = 1 << 20


def _round_up(value):
    """Raise non-negative closed-form results by CLOSED_FORM_REL_SLACK (inf stays inf)."""
    return value * (1.0 + CLOSED_FORM_REL_SLACK)


def _stirling_remainder(m):
    r"""Evaluate :math:`s(m) = \ln m! - (m \ln m - m + \tfrac12 \ln(2\pi m))` for integers m >= 1."""
    m = np.asarray(m, dtype=np.float64)
    small = m < _STIRLING_SERIES_FROM
    m_small = np.where(small, m, 1.0)
    direct = gammaln(m_small + 1.0) - (m_small * np.log(m_small) - m_small + 0.5 * np.log(2.0 * np.pi * m_small))

    # 1/(12m) - 1/(360m^3) + 1/(1260m^5) - 1/(1680m^7), the Stirling series.
    m_large = np.where(small, _STIRLING_SERIES_FROM, m)
    inverse_square = 1.0 / (m_large * m_large)
    series = (1.0 / 12.0 - inverse_square * (1.0 / 360.0 - inverse_square * (1.0 / 1260.0 - inverse_square / 1680.0))) / m_large
    return np.where(small, direct, series)


@functools.lru_cache(maxsize=256)
def _log_maurer_xi_int(n):
    """Exact ln xi(n) for one integer n >= 1 (cached: xi depends on n alone)."""
    # The k = 0 and k = n terms equal 1 (0^0 = 1).
    if n == 1:
        return math.log(2.0)

    # ln of the term k is 0.5 ln(n / (2 pi k (n - k))) + s(n) - s(k) - s(n - k). The Stirling
    # main parts of ln C(n, k) cancel k ln(k/n) + (n - k) ln((n - k)/n) exactly, so no
    # difference of numbers near n ln n is left to lose digits.
    stirling_n = float(_stirling_remainder(n))
    half = n // 2
    partial_sums = [2.0]
    for start in range(1, half + 1, _XI_CHUNK):
        k = np.arange(start, min(start + _XI_CHUNK, half + 1), dtype=np.float64)
        log_term = 0.5 * np.log(n / (2.0 * np.pi * k * (n - k))) + stirling_n - _stirling_remainder(k) - _stirling_remainder(n - k)
        term = np.exp(log_term)

        # The terms for k and n - k are equal; k = n / 2 (n even) is its own mirror image.
        weight = np.where(2.0 * k == n, 1.0, 2.0)
        partial_sums.append(float(np.sum(weight * term)))
    return math.log(math.fsum(partial_sums))


def log_maurer_xi(n):
    r"""Compute :math:`\ln \xi(n)` with Maurer's :math:`\xi(n) = \sum_{k=0}^{n} \binom{n}{k}
    (k/n)^k (1 - k/n)^{n-k}`.

    For :math:`\hat p` the mean of :math:`n` Bernoulli(:math:`p`) variables,
    :math:`\mathbb{E}\,e^{n\,\mathrm{kl}(\hat p\|p)} = \xi(n)` whatever :math:`p` (the factors
    :math:`p^k (1 - p)^{n - k}` cancel). Maurer (2004) shows that the expectation is at most
    :math:`\xi(n)` for any [0, 1]-valued variables and that :math:`\sqrt{n} \le \xi(n) \le 2\sqrt{n}`,
    so :math:`\ln \xi(n)` may replace :math:`\ln(2\sqrt{n})` in every kl-family bound.

    Each term is evaluated in log space through the Stirling remainder, without the cancellation
    of ``gammaln`` differences, so the result has a relative error of about 1e-13 at most (from the
    ``gammaln`` path for k < 30). Results are cached per n.

    Parameters
    ----------
    n : int or array_like of int
        Number of examples, >= 1.

    Returns
    -------
    float or numpy.ndarray

    Examples
    --------
    >>> round(math.exp(log_maurer_xi(2)), 12)  # 1 + 2 * (1/2)^2 + 1
    2.5
    """
    n = check_count(n, "n")
    values = np.vectorize(lambda count: _log_maurer_xi_int(int(count)), otypes=[np.float64])(n)
    return scalar_or_array(values)


def _complexity(kl, n, delta, maurer_xi):
    r"""Compute :math:`B = (\mathrm{KL} + \ln(2\sqrt{n}/\delta)) / n`, or with :math:`\xi(n)`."""
    if maurer_xi:
        log_xi = np.asarray(log_maurer_xi(n), dtype=np.float64)
    else:
        log_xi = math.log(2.0) + 0.5 * np.log(n)
    return (kl + (log_xi - np.log(delta))) / n


def _check_kl_family(risk, kl, n, delta):
    """Check the common arguments of the kl-family bounds and broadcast them."""
    risk = check_probability(risk, "risk")
    kl = check_nonnegative(kl, "kl")
    n = check_count(n, "n")
    delta = check_delta(delta)
    return np.broadcast_arrays(risk, kl, n, delta)


def kl_bound(risk, kl, n, delta, *, maurer_xi=False):
    r"""Compute the PAC-Bayes-kl bound (Seeger 2002; Maurer 2004) on the true risk.

    .. math::

        L_D(Q) \le \mathrm{kl}^{-1}_{+}\Big(\hat L_S(Q),\;
            \frac{\mathrm{KL}(Q\|P) + \ln(2\sqrt{n}/\delta)}{n}\Big)

    with probability at least :math:`1 - \delta` over the sample, for all posteriors at once. With
    ``maurer_xi=True``, the exact :math:`\xi(n)` (:func:`log_maurer_xi`) replaces
    :math:`2\sqrt{n}`, which tightens the bound slightly. This is the tightest bound of the kl
    family: the others relax the kl inverse.

    Parameters
    ----------
    risk : float or array_like
        Empirical risk :math:`\hat L_S(Q)` in [0, 1] over the ``n`` examples (round-off of at most
        1e-12 outside the interval is clipped).
    kl : float or array_like
        :math:`\mathrm{KL}(Q\|P)` in nats, >= 0 (``inf`` gives the trivial bound 1).
    n : int or array_like
        Number of examples the empirical risk averages over, >= 1. These examples must not have
        been used to choose the prior.
    delta : float or array_like
        Failure probability in (0, 1).
    maurer_xi : bool
        Use :math:`\ln \xi(n)` in place of :math:`\ln(2\sqrt{n})`.

    Returns
    -------
    float or numpy.ndarray
        The bound, in [0, 1]; a float for scalar input.

    Raises
    ------
    ValueError
        If an argument breaks the rule stated above; the message names the value.

    Examples
    --------
    >>> value = kl_bound(0.05, 1000.0, 60000, 0.05)
    >>> 0.05 < value < mcallester_bound(0.05, 1000.0, 60000, 0.05)
    True
    """
    risk, kl, n, delta = _check_kl_family(risk, kl, n, delta)
    budget = _complexity(kl, n, delta, maurer_xi)
    return kl_inv_upper(risk, budget)


def mcallester_bound(risk, kl, n, delta, *, maurer_xi=False):
    r"""Compute the square-root (McAllester-type) PAC-Bayes bound in Maurer's form.

    .. math::

        L_D(Q) \le \hat L_S(Q) + \sqrt{\frac{\mathrm{KL}(Q\|P) + \ln(2\sqrt{n}/\delta)}{2n}}

    It follows from the kl bound through Pinsker's inequality
    :math:`\mathrm{kl}(\hat L\|L) \ge 2(L - \hat L)^2`, so it is never below :func:`kl_bound`.
    McAllester (1999) proved the original form with a larger logarithmic term; the
    :math:`\ln(2\sqrt{n}/\delta)` form is due to Maurer (2004).

    Arguments, errors and return value are those of :func:`kl_bound`, except that the value is
    not clipped to 1.
    """
    risk, kl, n, delta = _check_kl_family(risk, kl, n, delta)
    budget = _complexity(kl, n, delta, maurer_xi)
    return scalar_or_array(_round_up(risk + np.sqrt(budget / 2.0)))


def quad_bound(risk, kl, n, delta, *, maurer_xi=False):
    r"""Compute the PAC-Bayes-quadratic bound (Perez-Ortiz et al. 2021).

    .. math::

        L_D(Q) \le \Big(\sqrt{\hat L_S(Q) + B/2} + \sqrt{B/2}\Big)^2, \qquad
        B = \frac{\mathrm{KL}(Q\|P) + \ln(2\sqrt{n}/\delta)}{n}.

    It solves the relaxation :math:`\mathrm{kl}(\hat L\|L) \ge (L - \hat L)^2 / (2L)` (valid for
    :math:`L \ge \hat L`) of the kl bound for :math:`L`, so it is never below :func:`kl_bound`.
    It equals the minimum over ``lam`` of :func:`lambda_bound`, reached at
    :func:`optimal_lambda` (derived in :func:`crsam.theory.symbolic.optimal_lambda_expression`).
    Perez-Ortiz et al. (2021) state it with :math:`(\mathrm{KL} + \ln(2\sqrt{n}/\delta)) / (2n)` in place of :math:`B/2`.

    Arguments, errors and return value are those of :func:`kl_bound`, except that the value is
    not clipped to 1.
    """
    risk, kl, n, delta = _check_kl_family(risk, kl, n, delta)
    half_budget = _complexity(kl, n, delta, maurer_xi) / 2.0
    value = (np.sqrt(risk + half_budget) + np.sqrt(half_budget)) ** 2
    return scalar_or_array(_round_up(value))


def lambda_bound(risk, kl, n, delta, lam, *, maurer_xi=False):
    r"""Compute the PAC-Bayes-lambda bound of Thiemann et al. (2017).

    .. math::

        L_D(Q) \le \frac{\hat L_S(Q)}{1 - \lambda/2}
            + \frac{\mathrm{KL}(Q\|P) + \ln(2\sqrt{n}/\delta)}{n\,\lambda\,(1 - \lambda/2)},
        \qquad \lambda \in (0, 2).

    It holds for all :math:`\lambda \in (0, 2)` on the event of the kl bound (it relaxes the same
    inequality), so :math:`\lambda` may be chosen after seeing the data at no confidence cost. Its
    minimum over :math:`\lambda`, at
    :math:`\lambda^* = 2 / (\sqrt{2\hat L / B + 1} + 1)`, equals :func:`quad_bound`.

    Parameters
    ----------
    lam : float or array_like
        :math:`\lambda` in the open interval (0, 2).

    The other arguments, errors and the return value are those of :func:`kl_bound`, except that
    the value is not clipped to 1.
    """
    risk, kl, n, delta = _check_kl_family(risk, kl, n, delta)
    lam = check_open_interval(lam, "lam", 0.0, 2.0)
    budget = _complexity(kl, n, delta, maurer_xi)
    shrink = 1.0 - lam / 2.0
    value = risk / shrink + budget / (lam * shrink)
    return scalar_or_array(_round_up(value))


def catoni_bound(risk, kl, n, delta, C):
    r"""Compute Catoni's PAC-Bayes bound for one constant :math:`C > 0` fixed before the data.

    .. math::

        L_D(Q) \le \frac{1 - \exp\!\big(-C \hat L_S(Q) - (\mathrm{KL}(Q\|P) + \ln(1/\delta)) / n\big)}
                        {1 - e^{-C}}

    with probability at least :math:`1 - \delta`, for all posteriors at once (Catoni 2007). Each :math:`C` is its own event: choosing :math:`C` from the data needs a union
    bound, as in :func:`catoni_grid_bound`. The infimum over :math:`C > 0` of the right-hand side
    equals :math:`\mathrm{kl}^{-1}_{+}(\hat L, (\mathrm{KL} + \ln(1/\delta))/n)`, since
    :math:`\mathrm{kl}(q\|p) = \sup_{C} [-Cq - \ln(1 - p(1 - e^{-C}))]`.

    Parameters
    ----------
    C : float or array_like
        Catoni's constant, finite and > 0.

    The other arguments and errors are those of :func:`kl_bound`. The value is not clipped to 1.
    """
    risk, kl, n, delta = _check_kl_family(risk, kl, n, delta)
    C = check_positive(C, "C")
    exponent = C * risk + (kl - np.log(delta)) / n
    value = -np.expm1(-exponent) / -np.expm1(-C)
    return scalar_or_array(_round_up(value))


def catoni_grid_bound(risk, kl, n, delta, grid):
    r"""Compute the minimum of Catoni's bound over a grid of :math:`C` fixed in advance.

    Each of the :math:`K` grid points gets failure probability :math:`\delta / K`, so by the union
    bound the minimum is valid with probability at least :math:`1 - \delta`:

    .. math::

        L_D(Q) \le \min_{C \in \mathcal{G}} \frac{1 - \exp(-C \hat L - (\mathrm{KL} + \ln(K/\delta))/n)}
                                                  {1 - e^{-C}}.

    The grid must not depend on the sample of the bound.

    Parameters
    ----------
    grid : sequence of float
        Non-empty one-dimensional grid of constants, each finite and > 0.

    The other arguments and errors are those of :func:`kl_bound`. The value is not clipped to 1.
    """
    grid = as_float_array(grid, "grid")
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(
            f"grid must be a non-empty one-dimensional sequence of constants C > 0, got shape {grid.shape}."
        )
    grid = check_positive(grid, "grid")
    delta = check_delta(delta)

    # One event per grid point, each at delta / K; the grid runs along a new last axis.
    per_point = catoni_bound(
        np.expand_dims(risk, -1), np.expand_dims(kl, -1), np.expand_dims(n, -1),
        np.expand_dims(delta / grid.size, -1), grid,
    )
    return scalar_or_array(np.min(per_point, axis=-1))


def sample_bound(mean, m, delta):
    r"""Compute the Langford-Caruana upper bound on an expectation from Monte-Carlo samples.

    Given the mean :math:`\hat q` of :math:`m` independent [0, 1]-valued draws whose expectations
    average to :math:`q`, with probability at least :math:`1 - \delta`

    .. math::

        q \le \mathrm{kl}^{-1}_{+}\big(\hat q, \ln(1/\delta) / m\big).

    The draws need not be identically distributed. Theorem 1 of Hoeffding (1963) bounds the upper
    tail of the average of independent [0, 1]-valued variables by
    :math:`\Pr(\hat q \ge q + t) \le e^{-m\,\mathrm{kl}(q + t\|q)}`, with :math:`q` the average
    of their means. Applied to :math:`1 - X_i` it gives the lower tail
    :math:`\Pr(\hat q \le q - t) \le e^{-m\,\mathrm{kl}(q - t\|q)}`, and the event
    :math:`q > \mathrm{kl}^{-1}_{+}(\hat q, c)` implies :math:`\hat q < q` with
    :math:`\mathrm{kl}(\hat q\|q) > c`. Two cases use this:

    - i.i.d. draws, for example the empirical risks of :math:`m` weight samples from :math:`Q`,
      each evaluated on the whole bound set (Langford and Caruana 2001);
    - independent draws with different means, for example one 0-1 loss per example, each at its
      own fresh weight sample, whose means are the per-example errors and average to the
      posterior's empirical risk.

    The budget uses :math:`\ln(1/\delta)`, not the :math:`\ln(2/\delta)` of Langford and Caruana
    (2001), because only the upper side of :math:`q` is bounded. Call with :math:`\delta/2` to
    reproduce their two-sided budget.

    Parameters
    ----------
    mean : float or array_like
        Monte-Carlo mean in [0, 1] (round-off of at most 1e-12 outside is clipped).
    m : int or array_like
        Number of independent draws, >= 1. ``mean`` must be their plain average.
    delta : float or array_like
        Failure probability in (0, 1).

    Returns
    -------
    float or numpy.ndarray
        The upper bound, in [0, 1]; a float for scalar input.

    Examples
    --------
    >>> sample_bound(0.0, 1000, 0.01) > 0.0
    True
    """
    mean = check_probability(mean, "mean")
    m = check_count(m, "m")
    delta = check_delta(delta)
    return kl_inv_upper(mean, -np.log(delta) / m)


def optimal_lambda(empirical_risk, complexity):
    r"""Compute :math:`\lambda^* = 2 / (\sqrt{2r/B + 1} + 1)`, the minimizer of the lambda bound.

    Parameters
    ----------
    empirical_risk : float or array_like
        :math:`r` in [0, 1] (round-off up to 1e-12 outside is clipped).
    complexity : float or array_like
        :math:`B = (\mathrm{KL} + \ln(2\sqrt{n}/\delta))/n`, finite and > 0.

    Returns
    -------
    float or numpy.ndarray
        :math:`\lambda^*` in (0, 1]; equal to 1 at :math:`r = 0`.

    Examples
    --------
    >>> optimal_lambda(0.0, 0.01)
    1.0
    """
    empirical_risk = check_probability(empirical_risk, "empirical_risk")
    complexity = check_positive(complexity, "complexity")
    return scalar_or_array(2.0 / (np.sqrt(2.0 * empirical_risk / complexity + 1.0) + 1.0))
