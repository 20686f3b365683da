r"""Bernoulli kl divergence, its upper and lower inverses, and their derivatives.

The binary kl divergence in nats is

.. math::

    \mathrm{kl}(q \,\|\, p) = q \ln\frac{q}{p} + (1 - q) \ln\frac{1 - q}{1 - p},

with :math:`0 \ln 0 = 0`, and :math:`+\infty` when :math:`p \in \{0, 1\}` differs from
:math:`q`. It is evaluated as a sum of two non-negative terms,
:math:`q\,\varphi(p/q) + (1-q)\,\varphi((1-p)/(1-q))` with :math:`\varphi(r) = r - 1 - \ln r`
(the linear parts cancel), so that no cancellation occurs when :math:`p` is close to :math:`q`
and the relative error stays at a few units in the last place (ulps) everywhere.

The inverses are the ends of the set :math:`\{p : \mathrm{kl}(q\|p) \le c\}`, an interval around
:math:`q` because :math:`\mathrm{kl}(q\|\cdot)` is convex with its minimum 0 at :math:`q`:

.. math::

    \mathrm{kl}^{-1}_{+}(q, c) = \sup\{p \in [q, 1] : \mathrm{kl}(q\|p) \le c\}, \qquad
    \mathrm{kl}^{-1}_{-}(q, c) = \inf\{p \in [0, q] : \mathrm{kl}(q\|p) \le c\}.

Both are computed by bisection over the float64 numbers of the bracket (on their bit patterns,
which are ordered like the values for non-negative floats), until the bracket ends are adjacent
floats. The end on the safe side is returned (the upper end for :math:`\mathrm{kl}^{-1}_{+}`, the
lower end for :math:`\mathrm{kl}^{-1}_{-}`), never the midpoint, and the comparison counts a point
as inside the set whenever round-off could hide that it is. The returned upper value is therefore
never below the exact one, and the lower value never above it. Both lie within one ulp of the
exact inverse at a budget raised by the round-off slack (32 ulps of c), for any magnitude.

References
----------
- Langford, J. (2005). Tutorial on practical prediction theory for classification. JMLR 6.
- Maurer, A. (2004). A note on the PAC Bayesian theorem. arXiv:cs/0411099.
- Seeger, M. (2002). PAC-Bayesian generalisation error bounds for Gaussian process
  classification. JMLR 3.
"""

import numpy as np

from ._numerics import log1p_remainder_series
from ._validation import check_nonnegative, check_probability, scalar_or_array

__all__ = ["kl", "kl_inv_upper", "kl_inv_lower", "kl_inv_upper_grad", "kl_inv_lower_grad"]

_EPS = np.finfo(np.float64).eps

# Relative slack of the bisection comparison "kl(q, p) <= c". The computed kl has a relative
# error below about 10 ulps: each phi term is within 6 ulps (see _bregman_term), plus the product
# with q and the sum. The budget c is usually computed too, as (KL + log term) / n, with a
# relative error of a few ulps. A slack of 32 ulps covers both, so every p with exact
# kl(q, p) <= c is counted inside and the bracket never crosses the exact inverse.
KL_REL_SLACK = 32 * _EPS

# Bisection halves the number of floats in the bracket, and [0, 1] contains fewer than 2^62 of
# them, so 64 iterations always reach adjacent ends.
_MAX_BISECTIONS = 64


def _bregman_term(a, b, b_minus_a):
    r"""Evaluate :math:`a \ln(a / b) - a + b = a\,\varphi(b / a) \ge 0` elementwise.

    ``b_minus_a`` must be the correctly rounded difference ``b - a``. The term is 0 at ``b == a``,
    equals ``b`` at ``a == 0`` and is ``+inf`` at ``b == 0 < a``.

    Within :math:`a/2 \le b \le 2a` the term is :math:`a\,h((b - a)/a)`, with
    :math:`h(x) = x - \ln(1 + x)` from an atanh series (``log1p_remainder_series``), and
    ``b - a`` is exact there (Sterbenz's lemma). Outside that range
    :math:`\varphi(r) = r - 1 - \ln r \ge 0.19`, and the direct formula loses at most a factor
    of 6 of relative accuracy to the subtraction, so the term is accurate to about 6 ulps.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # 2b >= a rather than b >= a/2, which underflows to 0 for the smallest subnormal a.
        near = (2.0 * b >= a) & (b <= 2.0 * a) & (a > 0.0)
        x = np.where(near, b_minus_a / np.where(near, a, 1.0), 0.0)
        series_value = a * log1p_remainder_series(x)
        # a / b overflows for b below about a * 2^-1024; there ln a - ln b > 709 is accurate to
        # about 2 ulps because |ln a| + |ln b| <= 1490.
        ratio = a / b
        log_ratio = np.where(np.isinf(ratio) & (b > 0.0), np.log(a) - np.log(b), np.log(ratio))
        direct_value = a * log_ratio + b_minus_a
    value = np.where(near, series_value, direct_value)

    # The limit a ln(a / b) -> 0 as a -> 0 leaves the term equal to b.
    return np.where(a == 0.0, b, value)


def _kl_unchecked(q, p):
    """Bernoulli kl on float64 arrays already checked to lie in [0, 1]."""
    # q ln(q/p) + (1-q) ln((1-q)/(1-p)) = A + B with the linear parts p - q and q - p cancelled.
    a_term = _bregman_term(q, p, p - q)
    b_term = _bregman_term(1.0 - q, 1.0 - p, q - p)
    return a_term + b_term


def kl(q, p):
    r"""Compute the Bernoulli kl divergence :math:`\mathrm{kl}(q \| p)` in nats.

    .. math::

        \mathrm{kl}(q \| p) = q \ln\frac{q}{p} + (1 - q) \ln\frac{1 - q}{1 - p}

    with :math:`0 \ln 0 = 0` and :math:`+\infty` where :math:`p \in \{0, 1\}` and :math:`q \ne p`.

    Parameters
    ----------
    q, p : float or array_like
        Probabilities in [0, 1], broadcast against each other. Entries at most 1e-12 outside the
        interval are clipped as round-off.

    Returns
    -------
    float or numpy.ndarray
        A float for scalar input, otherwise an array of the broadcast shape.

    Raises
    ------
    ValueError
        If an entry is NaN or outside [0, 1] by more than 1e-12.

    Examples
    --------
    >>> round(kl(0.1, 0.3), 12)
    0.116321756586
    >>> kl(0.0, 1.0)
    inf
    """
    q = check_probability(q, "q")
    p = check_probability(p, "p")
    q, p = np.broadcast_arrays(q, p)
    return scalar_or_array(_kl_unchecked(q, p))


def _prepare_inverse(q, c):
    """Check and broadcast the arguments of the kl inverses."""
    q = check_probability(q, "q")
    c = check_nonnegative(c, "c")
    q, c = np.broadcast_arrays(q, c)
    return q.astype(np.float64, copy=True), c.astype(np.float64, copy=True)


def _bisect(q, c, lo, hi, inside_moves_lo):
    """Shrink the brackets [lo, hi] around the kl inverse until their ends are adjacent floats.

    The midpoint is taken on the int64 bit patterns, which for non-negative float64 numbers are
    ordered like the values, so each step halves the number of floats in the bracket whatever the
    magnitude. A midpoint counted inside {p : kl(q, p) <= c} replaces ``lo`` when
    ``inside_moves_lo`` (upper inverse) and ``hi`` otherwise (lower inverse). Returns the final
    ``(lo, hi)``.
    """
    # Counting a point inside when kl <= c (1 + slack) means that a point counted outside is
    # certainly outside, so the bracket end on the safe side never crosses the exact inverse.
    threshold = c * (1.0 + KL_REL_SLACK)
    lo_bits = np.ascontiguousarray(lo, dtype=np.float64).view(np.int64).copy()
    hi_bits = np.ascontiguousarray(hi, dtype=np.float64).view(np.int64).copy()
    for _ in range(_MAX_BISECTIONS):
        active = hi_bits - lo_bits > 1
        if not np.any(active):
            break
        mid_bits = lo_bits + (hi_bits - lo_bits) // 2
        inside = _kl_unchecked(q, mid_bits.view(np.float64)) <= threshold
        moves_lo = inside if inside_moves_lo else ~inside
        lo_bits = np.where(active & moves_lo, mid_bits, lo_bits)
        hi_bits = np.where(active & ~moves_lo, mid_bits, hi_bits)
    return lo_bits.view(np.float64), hi_bits.view(np.float64)


def kl_inv_upper(q, c):
    r"""Compute the upper kl inverse :math:`\sup\{p \in [q, 1] : \mathrm{kl}(q\|p) \le c\}`.

    This is the PAC-Bayes-kl upper bound on a true risk :math:`p` given an empirical risk :math:`q`
    and a budget :math:`c`. The result is conservative: never below the exact value, and above it
    by at most one ulp plus the effect of the round-off slack described in the module docstring.

    Special cases are computed in closed form:

    - :math:`c = 0` returns :math:`q`, and :math:`q = 1` or :math:`c = \infty` returns 1;
    - :math:`q = 0` returns :math:`1 - e^{-c}`, the solution of :math:`-\ln(1 - p) = c`,
      rounded up by one ulp (and with c raised by the round-off slack);
    - a budget so large that the exact value lies within half an ulp of 1 returns 1.

    Parameters
    ----------
    q : float or array_like
        Empirical risk in [0, 1] (round-off up to 1e-12 outside is clipped).
    c : float or array_like
        Budget in nats, >= 0 (``inf`` allowed). Broadcast against ``q``.

    Returns
    -------
    float or numpy.ndarray
        A float for scalar input, otherwise an array of the broadcast shape.

    Raises
    ------
    ValueError
        If ``q`` is NaN or outside [0, 1] beyond round-off, or ``c`` is negative or NaN.

    Examples
    --------
    >>> p = kl_inv_upper(0.1, 0.05)
    >>> round(p, 10)
    0.2200786011
    >>> abs(kl(0.1, p) - 0.05) < 1e-12
    True
    """
    return _kl_inverse(q, c, upper=True)


def kl_inv_lower(q, c):
    r"""Compute the lower kl inverse :math:`\inf\{p \in [0, q] : \mathrm{kl}(q\|p) \le c\}`.

    This is the PAC-Bayes-kl lower bound on a true risk. The result is conservative: never above
    the exact value, and below it by at most one ulp plus the effect of the round-off slack.

    Special cases are computed in closed form:

    - :math:`c = 0` returns :math:`q`, and :math:`q = 0` or :math:`c = \infty` returns 0;
    - :math:`q = 1` returns :math:`e^{-c}`, the solution of :math:`-\ln p = c`, rounded down by
      one ulp (and with c raised by the round-off slack).

    Parameters and errors are those of :func:`kl_inv_upper`.

    Examples
    --------
    >>> p = kl_inv_lower(0.1, 0.05)
    >>> round(p, 10)
    0.0312783963
    >>> abs(kl(0.1, p) - 0.05) < 1e-12
    True
    """
    return _kl_inverse(q, c, upper=False)


def _kl_inverse(q, c, *, upper):
    """Compute the upper (``upper=True``) or lower kl inverse; see :func:`kl_inv_upper`."""
    q, c = _prepare_inverse(q, c)
    p = np.empty_like(q)

    # Closed forms: no budget, no room on the searched side of q (q = 1 for the upper inverse,
    # q = 0 for the lower), an infinite budget, and q at the other end.
    limit, other_end = (1.0, 0.0) if upper else (0.0, 1.0)
    no_budget = c == 0.0
    saturated = ~no_budget & ((q == limit) | np.isinf(c))
    at_other_end = ~no_budget & ~saturated & (q == other_end)
    general = ~(no_budget | saturated | at_other_end)
    p[no_budget] = q[no_budget]
    p[saturated] = limit
    if upper:
        # q = 0: -ln(1 - p) = c, so p = 1 - e^{-c}, rounded up.
        zero_risk_value = -np.expm1(-c[at_other_end] * (1.0 + KL_REL_SLACK))
        p[at_other_end] = np.nextafter(zero_risk_value, 1.0)
    else:
        # q = 1: -ln p = c, so p = e^{-c}, rounded down.
        full_risk_value = np.exp(-c[at_other_end] * (1.0 + KL_REL_SLACK))
        p[at_other_end] = np.nextafter(full_risk_value, 0.0)

    # Bisection on [q, 1] (upper) or [0, q] (lower): kl(q, q) = 0 <= c, and kl(q, 1) and
    # kl(q, 0) are infinite, so above c, for 0 < q < 1.
    if np.any(general):
        q_general = q[general]
        if upper:
            _, hi = _bisect(q_general, c[general], q_general.copy(), np.ones_like(q_general), True)
            p[general] = hi
        else:
            lo, _ = _bisect(q_general, c[general], np.zeros_like(q_general), q_general.copy(), False)
            p[general] = lo
    return scalar_or_array(p)


def _implicit_grad(q, p):
    r"""Evaluate the implicit-function derivatives of :math:`p` solving :math:`\mathrm{kl}(q\|p) = c`.

    With :math:`F(q, p, c) = \mathrm{kl}(q\|p) - c`,
    :math:`\partial_p F = (p - q) / (p(1 - p))`,
    :math:`\partial_q F = \ln\frac{q(1 - p)}{p(1 - q)}` and :math:`\partial_c F = -1`, so

    .. math::

        \frac{\partial p}{\partial c} = \frac{p(1 - p)}{p - q}, \qquad
        \frac{\partial p}{\partial q} = \frac{\partial p}{\partial c}\,
            \ln\frac{p(1 - q)}{q(1 - p)}.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d_c = p * (1.0 - p) / (p - q)
        log_odds_ratio = (np.log(p) - np.log(q)) + (np.log1p(-q) - np.log1p(-p))
        d_q = d_c * log_odds_ratio
    return d_q, d_c


def kl_inv_upper_grad(q, c):
    r"""Compute the partial derivatives of :func:`kl_inv_upper` with respect to ``q`` and ``c``.

    By the implicit function theorem applied to :math:`\mathrm{kl}(q\|p) = c` at
    :math:`p = \mathrm{kl}^{-1}_{+}(q, c)`:

    .. math::

        \frac{\partial p}{\partial c} = \frac{p(1 - p)}{p - q}, \qquad
        \frac{\partial p}{\partial q} = \frac{p(1 - p)}{p - q}\,\ln\frac{p(1 - q)}{q(1 - p)}.

    Limits where the formula is 0/0 or infinite:

    - :math:`c = 0` and :math:`0 < q < 1`: :math:`p = q`, so :math:`\partial p/\partial q = 1` and
      :math:`\partial p/\partial c = +\infty` (as :math:`p - q \approx \sqrt{2q(1-q)c}`);
    - :math:`p = 1` in float64 (including :math:`q = 1` and :math:`c = \infty`): both are 0, the
      limit of :math:`(1 - p)\ln(1 / (1 - p))` and :math:`1 - p`;
    - :math:`q = 0 < c`: :math:`\partial p/\partial c = 1 - p = e^{-c}` and
      :math:`\partial p/\partial q = +\infty` (a one-sided derivative);
    - :math:`q = 0 = c`: :math:`\partial p/\partial c = 1`, :math:`\partial p/\partial q = +\infty`.

    Returns
    -------
    tuple of (float or numpy.ndarray)
        ``(d_q, d_c)``, each a float for scalar input.

    Examples
    --------
    >>> d_q, d_c = kl_inv_upper_grad(0.1, 0.05)
    >>> step = 1e-6
    >>> finite_difference = (kl_inv_upper(0.1, 0.05 + step) - kl_inv_upper(0.1, 0.05 - step)) / (2 * step)
    >>> abs(d_c - finite_difference) < 1e-6
    True
    """
    q, c = _prepare_inverse(q, c)
    p = np.asarray(kl_inv_upper(q, c), dtype=np.float64)
    d_q, d_c = _implicit_grad(q, p)

    # Limits of the 0/0 and infinite cases listed in the docstring.
    zero_risk = q == 0.0
    d_q = np.where(zero_risk, np.inf, d_q)
    d_c = np.where(zero_risk, 1.0 - p, d_c)
    no_budget = (c == 0.0) & (q > 0.0) & (q < 1.0)
    d_q = np.where(no_budget, 1.0, d_q)
    d_c = np.where(no_budget, np.inf, d_c)
    saturated = p == 1.0
    d_q = np.where(saturated, 0.0, d_q)
    d_c = np.where(saturated, 0.0, d_c)
    return scalar_or_array(d_q), scalar_or_array(d_c)


def kl_inv_lower_grad(q, c):
    r"""Compute the partial derivatives of :func:`kl_inv_lower` with respect to ``q`` and ``c``.

    The implicit-function formulas are those of :func:`kl_inv_upper_grad`, evaluated at
    :math:`p = \mathrm{kl}^{-1}_{-}(q, c)`, where :math:`p < q` makes :math:`\partial p/\partial c`
    negative. Limits:

    - :math:`c = 0` and :math:`0 < q < 1`: :math:`\partial p/\partial q = 1`,
      :math:`\partial p/\partial c = -\infty`;
    - :math:`p = 0` in float64 (including :math:`q = 0` and :math:`c = \infty`): both are 0;
    - :math:`q = 1`: :math:`p = e^{-c}`, :math:`\partial p/\partial c = -p` and
      :math:`\partial p/\partial q = +\infty` (a one-sided derivative).

    Returns
    -------
    tuple of (float or numpy.ndarray)
        ``(d_q, d_c)``, each a float for scalar input.
    """
    q, c = _prepare_inverse(q, c)
    p = np.asarray(kl_inv_lower(q, c), dtype=np.float64)
    d_q, d_c = _implicit_grad(q, p)

    # Limits of the 0/0 and infinite cases listed in the docstring.
    full_risk = q == 1.0
    d_q = np.where(full_risk, np.inf, d_q)
    d_c = np.where(full_risk, -p, d_c)
    no_budget = (c == 0.0) & (q > 0.0) & (q < 1.0)
    d_q = np.where(no_budget, 1.0, d_q)
    d_c = np.where(no_budget, -np.inf, d_c)
    saturated = p == 0.0
    d_q = np.where(saturated, 0.0, d_q)
    d_c = np.where(saturated, 0.0, d_c)
    return scalar_or_array(d_q), scalar_or_array(d_c)
