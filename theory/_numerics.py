"""Floating-point helpers shared by the Bernoulli kl and the Gaussian KL."""

import numpy as np

# Number of terms of the atanh series in log1p_remainder_series; see there.
_SERIES_TERMS = 20


def log1p_remainder_series(x):
    r"""Evaluate :math:`h(x) = x - \ln(1 + x) \ge 0` for :math:`x \in [-1/2, 1]` without cancellation.

    With :math:`u = x / (2 + x)` one has :math:`\ln(1 + x) = 2\,\mathrm{atanh}(u)` and
    :math:`x = 2u / (1 - u)`, so

    .. math::

        h(x) = \frac{2u^2}{1 - u} - 2u^3 \sum_{j \ge 0} \frac{u^{2j}}{2j + 3}.

    On :math:`x \in [-1/2, 1]`, :math:`|u| \le 1/3`, so the second part is at most a ninth of the
    first, and truncating the sum after 20 terms leaves a relative error below 9^-20. The result
    is accurate to a few ulps relative to :math:`h(x)`, also where :math:`h(x) \approx x^2 / 2` is
    far below the round-off of :math:`x - \ln(1 + x)` evaluated directly.
    """
    u = x / (2.0 + x)
    t = u * u

    # Horner evaluation of sum_j t^j / (2j + 3), highest term first.
    series = np.zeros_like(t)
    for j in range(_SERIES_TERMS - 1, -1, -1):
        series = series * t + 1.0 / (2 * j + 3)

    return 2.0 * t / (1.0 - u) - 2.0 * u * t * series
