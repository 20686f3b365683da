r"""Bounded surrogate losses and the second-order (Hessian-trace) approximation of the bound.

The Gaussian posterior :math:`Q = \mathcal{N}(w, \sigma^2 I)` has the smoothed empirical loss

.. math::

    \mathbb{E}_{\epsilon \sim \mathcal{N}(0, \sigma^2 I)} L_S(w + \epsilon)
        = L_S(w) + \frac{\sigma^2}{2}\,\mathrm{Tr}\,H(w) + O(\sigma^4)

for a smooth loss :math:`L_S` with Hessian :math:`H` (exact up to the :math:`\sigma^2` term for
cubic losses, see :func:`crsam.theory.symbolic.gaussian_smoothing_series`). Plugging the
truncated value into a PAC-Bayes bound shows how the curvature a CR-SAM step penalizes enters
the generalization bound. It is **not a certificate**: the remainder is neither signed nor
bounded (it grows with the number of parameters), and the 0-1 error, whose Hessian is zero almost
everywhere, needs the Monte-Carlo route of :func:`crsam.theory.sample_bound`. The loss must be a
smooth surrogate bounded in [0, 1], such as :func:`smooth_bounded_cross_entropy`.

References
----------
- Perez-Ortiz, M., Rivasplata, O., Shawe-Taylor, J., & Szepesvari, C. (2021). Tighter risk
  certificates for neural networks. JMLR 22.
"""

import dataclasses
import math

import numpy as np

from ._validation import as_float_array, check_open_interval, check_probability, scalar_or_array
from .bounds import _check_kl_family, _complexity
from .bernoulli import kl_inv_upper

__all__ = [
    "clipped_cross_entropy",
    "smooth_bounded_cross_entropy",
    "SecondOrderBound",
    "second_order_bound",
]


def _check_log_probability(log_probability):
    """Return log-probabilities as an array of entries <= 0 (``-inf`` allowed, NaN not)."""
    array = as_float_array(log_probability, "log_probability")
    if not np.all(array <= 0.0):
        bad = array if array.ndim == 0 else array[tuple(np.argwhere(~(array <= 0.0))[0])]
        raise ValueError(
            f"log_probability must be <= 0 and not NaN, got {bad.item()!r}. "
            "Pass the log-softmax output of the correct class."
        )
    return array


def clipped_cross_entropy(log_probability, p_min):
    r"""Compute the cross-entropy clipped at :math:`p_{\min}` and rescaled to [0, 1].

    .. math::

        \ell = \frac{\ln(1 / \max(p, p_{\min}))}{\ln(1 / p_{\min})} \in [0, 1],

    with :math:`p` the predicted probability of the correct class (Perez-Ortiz et al. 2021 clamp
    the probabilities at :math:`p_{\min}` the same way). The clip makes :math:`\ell` bounded but
    leaves a kink at :math:`p = p_{\min}`, so use :func:`smooth_bounded_cross_entropy` where a
    Hessian is needed.

    Parameters
    ----------
    log_probability : float or array_like
        :math:`\ln p`, <= 0 (log-softmax of the correct class).
    p_min : float
        Clipping level in (0, 1).

    Returns
    -------
    float or numpy.ndarray
        Losses in [0, 1].
    """
    log_probability = _check_log_probability(log_probability)
    p_min = float(check_open_interval(p_min, "p_min", 0.0, 1.0))
    log_p_min = math.log(p_min)
    return scalar_or_array(-np.maximum(log_probability, log_p_min) / -log_p_min)


def smooth_bounded_cross_entropy(log_probability, p_min):
    r"""Compute a smooth cross-entropy bounded in [0, 1] by mixing in :math:`p_{\min}`.

    .. math::

        \ell = \frac{\ln\big(1 / (p_{\min} + (1 - p_{\min})\,p)\big)}{\ln(1 / p_{\min})} \in [0, 1],

    which is 0 at :math:`p = 1`, 1 at :math:`p = 0`, infinitely differentiable in the logits,
    and close to the plain cross-entropy divided by :math:`\ln(1/p_{\min})` while
    :math:`p \gg p_{\min}`. The log is evaluated as
    ``logaddexp(ln p_min, ln(1 - p_min) + ln p)``, stable for any :math:`\ln p`.

    Parameters and return value are those of :func:`clipped_cross_entropy`.

    Examples
    --------
    >>> smooth_bounded_cross_entropy(0.0, 1e-4), smooth_bounded_cross_entropy(-np.inf, 1e-4)
    (0.0, 1.0)
    """
    log_probability = _check_log_probability(log_probability)
    p_min = float(check_open_interval(p_min, "p_min", 0.0, 1.0))
    log_p_min = math.log(p_min)
    log_mixture = np.logaddexp(log_p_min, math.log1p(-p_min) + log_probability)

    # Round-off can push the ratio a few ulps outside [0, 1], where the exact value never lies.
    return scalar_or_array(np.clip(log_mixture / log_p_min, 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class SecondOrderBound:
    """Second-order approximation of a PAC-Bayes-kl bound; an approximation, not a certificate.

    Attributes
    ----------
    value : float
        ``kl_inv_upper(clip(taylor_risk, 0, 1), complexity)``.
    taylor_risk : float
        ``loss + sigma^2 / 2 * trace_hessian``, before clipping.
    loss, trace_hessian, sigma : float
        The inputs.
    complexity : float
        ``(KL + ln(2 sqrt(n) / delta)) / n`` (or with Maurer's xi(n)).
    kl, n, delta : float
        The inputs of the complexity term.
    remainder_estimate : float or None
        ``mc_risk - taylor_risk`` when a Monte-Carlo estimate of the smoothed loss was given:
        an estimate of the neglected O(sigma^4) terms, with the Monte-Carlo noise in it.
    rigorous : bool
        Always False.
    """

    value: float
    taylor_risk: float
    loss: float
    trace_hessian: float
    sigma: float
    complexity: float
    kl: float
    n: float
    delta: float
    remainder_estimate: float | None
    rigorous: bool = False


def second_order_bound(loss, trace_hessian, sigma, kl, n, delta, *, mc_risk=None, maurer_xi=False):
    r"""Approximate the PAC-Bayes-kl bound of :math:`\mathcal{N}(w, \sigma^2 I)` from the Hessian trace.

    .. math::

        \widetilde{L}_S = L_S(w) + \frac{\sigma^2}{2}\,\mathrm{Tr}\,H(w), \qquad
        \text{value} = \mathrm{kl}^{-1}_{+}\Big(\mathrm{clip}(\widetilde{L}_S, 0, 1),\;
            \frac{\mathrm{KL}(Q\|P) + \ln(2\sqrt{n}/\delta)}{n}\Big).

    .. warning::

        Not rigorous: :math:`\widetilde{L}_S` drops the :math:`O(\sigma^4)` remainder, which can
        have either sign. Report it with ``rigorous: false`` and never as a certificate.

    Parameters
    ----------
    loss : float
        :math:`L_S(w)` of a smooth surrogate bounded in [0, 1] (for example
        :func:`smooth_bounded_cross_entropy`), averaged over the ``n`` examples.
    trace_hessian : float
        :math:`\mathrm{Tr}\,H(w)` of that same loss (finite; may be negative away from a minimum).
    sigma : float
        Posterior standard deviation, finite and >= 0.
    kl, n, delta : float
        As in :func:`crsam.theory.kl_bound`.
    mc_risk : float, optional
        Monte-Carlo estimate of :math:`\mathbb{E}\,L_S(w + \epsilon)` for the same loss, used for
        ``remainder_estimate``.
    maurer_xi : bool
        Use Maurer's :math:`\xi(n)` in place of :math:`2\sqrt{n}`.

    Returns
    -------
    SecondOrderBound
    """
    loss = float(check_probability(loss, "loss"))
    trace_hessian = float(as_float_array(trace_hessian, "trace_hessian"))
    if not math.isfinite(trace_hessian):
        raise ValueError(f"trace_hessian must be finite, got {trace_hessian!r}.")
    sigma = float(as_float_array(sigma, "sigma"))
    if not (math.isfinite(sigma) and sigma >= 0.0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}.")
    risk_checked, kl_checked, n_checked, delta_checked = _check_kl_family(loss, kl, n, delta)

    # Second-order value of the smoothed loss, then the kl inverse at its clipped value.
    taylor_risk = loss + 0.5 * sigma**2 * trace_hessian
    complexity = float(_complexity(kl_checked, n_checked, delta_checked, maurer_xi))
    value = kl_inv_upper(min(max(taylor_risk, 0.0), 1.0), complexity)

    remainder_estimate = None
    if mc_risk is not None:
        remainder_estimate = float(check_probability(mc_risk, "mc_risk")) - taylor_risk
    return SecondOrderBound(
        value=float(value),
        taylor_risk=taylor_risk,
        loss=loss,
        trace_hessian=trace_hessian,
        sigma=sigma,
        complexity=complexity,
        kl=float(kl_checked),
        n=float(n_checked),
        delta=float(delta_checked),
        remainder_estimate=remainder_estimate,
    )
