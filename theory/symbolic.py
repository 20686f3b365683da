r"""Symbolic derivations (sympy) behind the numeric functions of :mod:`crsam.theory`.

Each function derives its result from a definition, not from the closed form used in the
numeric code, so that tests can compare the two:

- :func:`gaussian_kl_expression`: the KL divergence of two univariate Gaussians, by integrating
  :math:`q(x) \ln(q(x)/p(x))` over the real line.
- :func:`gaussian_smoothing_series` and :func:`gaussian_expectation`: the Gaussian-smoothed loss
  :math:`\mathbb{E}_{z \sim \mathcal{N}(0, I)} L(w + \sigma z)`, as the heat-kernel series
  :math:`\sum_k (\sigma^2/2)^k \Delta^k L / k!` and, independently, by Gaussian moments. For a
  polynomial the series ends, so the expansion is exact, and for a cubic it stops after
  :math:`L + (\sigma^2/2)\,\mathrm{Tr}\,H`.
- :func:`finite_difference_error`: the truncation error of central and forward difference
  quotients along a direction, by Taylor expansion, with the mean-value bounds
  :func:`central_second_difference_error_bound` and :func:`central_first_difference_error_bound`.
- :func:`optimal_lambda_expression`: the minimizer of the PAC-Bayes-lambda bound (evaluated
  numerically by :func:`crsam.theory.optimal_lambda`) and the proof that its minimum is the
  PAC-Bayes-quadratic bound.
- :func:`catoni_optimal_constant_expression`: the constant :math:`C` at which Catoni's bound
  touches the kl inverse.

References
----------
- Catoni, O. (2007). PAC-Bayesian supervised classification: the thermodynamics of statistical
  learning. IMS Lecture Notes Monograph Series 56.
- Thiemann, N., Igel, C., Wintenberger, O., & Seldin, Y. (2017). A strongly quasiconvex
  PAC-Bayesian bound. ALT.
"""

import functools

import sympy

from ._validation import check_nonnegative, check_positive, scalar_or_array

__all__ = [
    "gaussian_kl_expression",
    "gaussian_smoothing_series",
    "gaussian_expectation",
    "finite_difference_error",
    "central_second_difference_error_bound",
    "central_first_difference_error_bound",
    "optimal_lambda_expression",
    "catoni_optimal_constant_expression",
]

# Symbols shared by the derivations; the returned expressions are in these.
mu_q, mu_p = sympy.symbols("mu_q mu_p", real=True)
sigma_q, sigma_p = sympy.symbols("sigma_q sigma_p", positive=True)
risk, budget, lam = sympy.symbols("r B lam", positive=True)
h = sympy.symbols("h", positive=True)


@functools.lru_cache(maxsize=None)
def gaussian_kl_expression():
    r"""Derive :math:`\mathrm{KL}(\mathcal{N}(\mu_q, \sigma_q^2) \| \mathcal{N}(\mu_p, \sigma_p^2))`
    by integrating :math:`q(x)\,[\ln q(x) - \ln p(x)]` over :math:`\mathbb{R}`.

    Returns
    -------
    sympy.Expr
        An expression in the module symbols ``mu_q, sigma_q, mu_p, sigma_p``; it simplifies to
        :math:`\ln(\sigma_p/\sigma_q) + (\sigma_q^2 + (\mu_q - \mu_p)^2)/(2\sigma_p^2) - 1/2`.
        A diagonal Gaussian's KL is the sum of this over coordinates. The integration takes a
        few seconds, so the result is cached.
    """
    x = sympy.symbols("x", real=True)
    log_q = -((x - mu_q) ** 2) / (2 * sigma_q**2) - sympy.log(sigma_q) - sympy.log(2 * sympy.pi) / 2
    log_p = -((x - mu_p) ** 2) / (2 * sigma_p**2) - sympy.log(sigma_p) - sympy.log(2 * sympy.pi) / 2
    integrand = sympy.exp(log_q) * sympy.expand(log_q - log_p)
    return sympy.simplify(sympy.integrate(integrand, (x, -sympy.oo, sympy.oo)))


def _check_polynomial(expression, variables):
    """Raise ``ValueError`` unless ``expression`` is a polynomial in ``variables``."""
    if not sympy.sympify(expression).is_polynomial(*variables):
        raise ValueError(
            f"expression must be a polynomial in {tuple(variables)}, got {expression}. "
            "Pass a polynomial, or give order= to truncate the series for other functions."
        )


def gaussian_smoothing_series(expression, variables, sigma, order=None):
    r"""Expand :math:`\mathbb{E}_{z \sim \mathcal{N}(0, I)}\, L(w + \sigma z)` in powers of :math:`\sigma^2`.

    Gaussian smoothing is the heat semigroup, :math:`\mathbb{E}\,L(w + \sigma z) =
    e^{(\sigma^2/2)\Delta} L(w)`, so

    .. math::

        \mathbb{E}\,L(w + \sigma z) = \sum_{k \ge 0} \frac{(\sigma^2 / 2)^k}{k!}\,\Delta^k L(w)
        = L(w) + \frac{\sigma^2}{2}\,\mathrm{Tr}\,H(w) + \frac{\sigma^4}{8}\,\Delta^2 L(w) + \dots

    with :math:`\Delta` the Laplacian in ``variables``. For a polynomial of degree :math:`d` the
    series ends at :math:`k = \lfloor d/2 \rfloor` and is exact; a cubic gives exactly
    :math:`L + (\sigma^2/2)\,\mathrm{Tr}\,H`, the second-order value of
    :func:`crsam.theory.second_order_bound`.

    Parameters
    ----------
    expression : sympy.Expr
        The loss :math:`L` in ``variables``.
    variables : sequence of sympy.Symbol
        The weights :math:`w`.
    sigma : sympy.Expr or number
        Standard deviation of the isotropic Gaussian perturbation.
    order : int, optional
        Highest power :math:`k` to keep. ``None`` keeps every non-zero term and requires a
        polynomial.

    Returns
    -------
    sympy.Expr

    Raises
    ------
    ValueError
        If ``order`` is None and ``expression`` is not a polynomial in ``variables``, or
        ``order`` is negative.
    """
    variables = tuple(variables)
    if order is None:
        _check_polynomial(expression, variables)
    elif order < 0:
        raise ValueError(f"order must be >= 0 or None, got {order}.")

    # Sum (sigma^2 / 2)^k / k! Laplacian^k L until the Laplacian vanishes or order is reached.
    total = sympy.Integer(0)
    term = sympy.sympify(expression)
    k = 0
    while term != 0 and (order is None or k <= order):
        total += (sympy.sympify(sigma) ** 2 / 2) ** k / sympy.factorial(k) * term
        term = sympy.expand(sum(sympy.diff(term, variable, 2) for variable in variables))
        k += 1
    return sympy.expand(total)


def gaussian_expectation(expression, variables, sigma):
    r"""Compute :math:`\mathbb{E}_{z \sim \mathcal{N}(0, I)}\, L(w + \sigma z)` exactly for a polynomial.

    Independent of :func:`gaussian_smoothing_series`: the perturbed polynomial is expanded in
    :math:`z` and each monomial :math:`\prod_i z_i^{a_i}` is replaced by its Gaussian moment
    :math:`\prod_i \mathbb{E}\,z_i^{a_i}`, where :math:`\mathbb{E}\,z^{a} = (a - 1)!!` for even
    :math:`a` and 0 for odd :math:`a`.

    Raises
    ------
    ValueError
        If ``expression`` is not a polynomial in ``variables``.
    """
    variables = tuple(variables)
    _check_polynomial(expression, variables)
    noise = sympy.symbols(f"z_0:{len(variables)}", real=True)

    # L(w + sigma z) as a polynomial in z with coefficients in w and sigma.
    perturbed = sympy.sympify(expression).subs(
        {variable: variable + sympy.sympify(sigma) * z for variable, z in zip(variables, noise)},
        simultaneous=True,
    )
    polynomial = sympy.Poly(sympy.expand(perturbed), *noise)

    # Replace each monomial by its moment: odd powers vanish, even powers give (a - 1)!!.
    total = sympy.Integer(0)
    for exponents, coefficient in polynomial.terms():
        if any(a % 2 for a in exponents):
            continue
        moment = sympy.prod([sympy.factorial2(a - 1) for a in exponents])
        total += coefficient * moment
    return sympy.expand(total)


_FINITE_DIFFERENCES = {
    # name: (difference quotient of f at t = 0 with step h, derivative order it estimates)
    "central_second": (lambda f: (f(h) + f(-h) - 2 * f(0)) / h**2, 2),
    "central_first": (lambda f: (f(h) - f(-h)) / (2 * h), 1),
    "forward_first": (lambda f: (f(h) - f(0)) / h, 1),
}


def finite_difference_error(kind, order):
    r"""Derive the truncation error of a difference quotient of :math:`f(t) = L(w + t v)` at 0.

    :math:`f` is replaced by its Taylor polynomial :math:`\sum_{k \le K} f_k t^k / k!` with
    derivative symbols :math:`f_k = f^{(k)}(0)` (named ``f0, f1, ...``), and the exact derivative
    is subtracted. Kinds and their leading terms:

    - ``"central_second"``: :math:`(f(h) + f(-h) - 2f(0))/h^2 - f''(0) = h^2 f_4/12 + h^4 f_6/360 + \dots`;
      with :math:`f = L(w + t v)` this is the curvature :math:`v^\top H v` from three losses, and
      applied to gradients, :math:`(g_+ + g_- - 2 g_0)/h^2` estimates
      :math:`\nabla_w (v^\top H v)` with the same error series.
    - ``"central_first"``: :math:`(f(h) - f(-h))/(2h) - f'(0) = h^2 f_3/6 + h^4 f_5/120 + \dots`;
      applied to gradients, :math:`(g_+ - g_-)/(2h)` estimates :math:`H v`.
    - ``"forward_first"``: :math:`(f(h) - f(0))/h - f'(0) = h f_2/2 + h^2 f_3/6 + \dots`.

    Parameters
    ----------
    kind : str
        One of the kinds above.
    order : int
        Keep error terms up to :math:`h^{\mathrm{order}}` (>= 1).

    Returns
    -------
    sympy.Expr
        A polynomial in ``h`` and ``f0, f1, ...``.
    """
    if kind not in _FINITE_DIFFERENCES:
        raise ValueError(f"kind must be one of {sorted(_FINITE_DIFFERENCES)}, got {kind!r}.")
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}.")
    quotient, derivative_order = _FINITE_DIFFERENCES[kind]

    # Taylor polynomial long enough that every kept power of h is exact.
    degree = order + derivative_order + 1
    derivatives = sympy.symbols(f"f0:{degree + 1}")

    def taylor(t):
        return sum(derivatives[k] * sympy.sympify(t) ** k / sympy.factorial(k) for k in range(degree + 1))

    error = sympy.expand(quotient(taylor) - derivatives[derivative_order])
    return sum(error.coeff(h, power) * h**power for power in range(1, order + 1))


def central_second_difference_error_bound(step, fourth_derivative_bound):
    r"""Bound the error of the central second difference by :math:`h^2 M_4 / 12`.

    By the mean-value form of Taylor's theorem,
    :math:`(f(h) + f(-h) - 2f(0))/h^2 - f''(0) = h^2 f^{(4)}(\xi)/12` for some
    :math:`\xi \in (-h, h)`, so the error is at most :math:`h^2 M_4/12` when
    :math:`|f^{(4)}| \le M_4` on :math:`[-h, h]`. The constant 1/12 is the leading coefficient
    derived by :func:`finite_difference_error`. Not valid across kinks (ReLU networks), where
    :math:`f` is not four times differentiable.
    """
    step = check_positive(step, "step")
    fourth_derivative_bound = check_nonnegative(fourth_derivative_bound, "fourth_derivative_bound")
    return scalar_or_array(step**2 * fourth_derivative_bound / 12.0)


def central_first_difference_error_bound(step, third_derivative_bound):
    r"""Bound the error of the central first difference by :math:`h^2 M_3 / 6`.

    :math:`(f(h) - f(-h))/(2h) - f'(0) = h^2 (f'''(\xi_1) + f'''(\xi_2))/12` for some
    :math:`\xi_1, \xi_2 \in (-h, h)`, so the error is at most :math:`h^2 M_3/6` when
    :math:`|f'''| \le M_3` on :math:`[-h, h]`.
    """
    step = check_positive(step, "step")
    third_derivative_bound = check_nonnegative(third_derivative_bound, "third_derivative_bound")
    return scalar_or_array(step**2 * third_derivative_bound / 6.0)


@functools.lru_cache(maxsize=None)
def optimal_lambda_expression():
    r"""Derive the minimizer of the PAC-Bayes-lambda bound and its minimum.

    The bound is :math:`f(\lambda) = r/(1 - \lambda/2) + B/(\lambda(1 - \lambda/2))` with
    :math:`r` the empirical risk and :math:`B = (\mathrm{KL} + \ln(2\sqrt{n}/\delta))/n`.
    Setting :math:`f'(\lambda) = 0` gives the quadratic
    :math:`r\lambda^2 + 2B\lambda - 2B = 0`, whose root in :math:`(0, 2)` is

    .. math::

        \lambda^* = \frac{2}{\sqrt{2r/B + 1} + 1}, \qquad
        f(\lambda^*) = \Big(\sqrt{r + B/2} + \sqrt{B/2}\Big)^2,

    the PAC-Bayes-quadratic bound. :math:`f` is convex on :math:`(0, 2)`, so this is the minimum.

    Returns
    -------
    tuple of sympy.Expr
        ``(objective, lam_star, minimum)`` in the module symbols ``r, B, lam``; ``lam_star`` is
        the root of :math:`f'` that sympy's ``solve`` returns in :math:`(0, 2)`, and ``minimum``
        is ``objective`` at ``lam_star``, simplified.
    """
    objective = risk / (1 - lam / 2) + budget / (lam * (1 - lam / 2))
    stationary = sympy.solve(sympy.numer(sympy.together(sympy.diff(objective, lam))), lam)

    # The numerator is a quadratic in lam with one positive root (the product of roots is -2B/r).
    positive_roots = [root for root in stationary if sympy.simplify(root.subs({risk: 1, budget: 1})) > 0]
    if len(positive_roots) != 1:
        raise RuntimeError(f"expected one positive stationary point, sympy returned {stationary}")
    lam_star = sympy.simplify(positive_roots[0])
    minimum = sympy.simplify(objective.subs(lam, lam_star))
    return objective, lam_star, minimum


@functools.lru_cache(maxsize=None)
def catoni_optimal_constant_expression():
    r"""Derive the constant :math:`C` at which Catoni's bound equals the kl inverse.

    For :math:`p > q`, :math:`g(C) = -Cq - \ln(1 - p(1 - e^{-C}))` is concave with maximum at

    .. math::

        C^* = \ln\frac{p(1 - q)}{q(1 - p)}, \qquad g(C^*) = \mathrm{kl}(q\|p).

    So :math:`\mathrm{kl}(q\|p) \le B` exactly when Catoni's bound at every :math:`C > 0` is at
    least :math:`p`, and the infimum over :math:`C` of Catoni's bound is
    :math:`\mathrm{kl}^{-1}_{+}(q, B)`.

    Returns
    -------
    tuple of sympy.Expr
        ``(g, C_star, g_at_C_star)`` in symbols ``q, p, C``.
    """
    q, p, C = sympy.symbols("q p C", positive=True)
    g = -C * q - sympy.log(1 - p * (1 - sympy.exp(-C)))
    C_star = sympy.log(p * (1 - q) / (q * (1 - p)))
    return g, C_star, sympy.simplify(g.subs(C, C_star))
