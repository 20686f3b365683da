"""Numeric functions of crsam.theory against the sympy derivations of crsam.theory.symbolic."""

import functools
import math

import mpmath
import numpy as np
import pytest
import sympy
from hypothesis import given
from hypothesis import strategies as st

from crsam.theory import (
    catoni_bound,
    gaussian_kl,
    kl,
    kl_inv_upper,
    lambda_bound,
    optimal_lambda,
    quad_bound,
    second_order_bound,
    symbolic,
)

EPS = np.finfo(np.float64).eps


# ---------------------------------------------------------------- Gaussian KL


@functools.lru_cache(maxsize=None)
def _gaussian_kl_mpmath():
    """The integral-derived Gaussian KL as an mpmath function of (mu_q, sigma_q, mu_p, sigma_p)."""
    arguments = (symbolic.mu_q, symbolic.sigma_q, symbolic.mu_p, symbolic.sigma_p)
    return sympy.lambdify(arguments, symbolic.gaussian_kl_expression(), modules="mpmath")


@functools.lru_cache(maxsize=None)
def _optimal_lambda_mpmath():
    """The sympy-solved lam* as an mpmath function of (r, B)."""
    _, lam_star, _ = symbolic.optimal_lambda_expression()
    return sympy.lambdify((symbolic.risk, symbolic.budget), lam_star, modules="mpmath")


def test_gaussian_kl_integral_is_closed_form():
    expression = symbolic.gaussian_kl_expression()
    closed_form = (
        sympy.log(symbolic.sigma_p / symbolic.sigma_q)
        + (symbolic.sigma_q**2 + (symbolic.mu_q - symbolic.mu_p) ** 2) / (2 * symbolic.sigma_p**2)
        - sympy.Rational(1, 2)
    )
    assert sympy.simplify(expression - closed_form) == 0


@given(
    data=st.lists(
        st.tuples(st.floats(-5.0, 5.0), st.floats(1e-2, 1e2), st.floats(-5.0, 5.0), st.floats(1e-2, 1e2)),
        min_size=1,
        max_size=10,
    )
)
def test_gaussian_kl_matches_sympy_integral(data):
    # The integral-derived expression, evaluated in mpmath and summed over coordinates, against
    # the float64 implementation: a few ulps per term plus the sum of at most 10 non-negative
    # terms stays below 64 ulps relative. The expression adds the mean part (mu_q - mu_p)^2 to
    # terms of order sigma^2, so each row gets 120 digits plus the digits that part is smaller by.
    evaluate = _gaussian_kl_mpmath()
    terms = []
    for mu_q, sigma_q, mu_p, sigma_p in data:
        mean_gap = abs(mu_q - mu_p) / max(sigma_q, sigma_p)
        digits = 120 + (max(0, math.ceil(-2 * math.log10(mean_gap))) if mean_gap > 0 else 0)
        with mpmath.workdps(digits):
            terms.append(evaluate(*(mpmath.mpf(value) for value in (mu_q, sigma_q, mu_p, sigma_p))))
    with mpmath.workdps(120):
        exact = mpmath.fsum(terms)
    columns = [np.array(column) for column in zip(*data)]
    # Terms below the smallest subnormal, 2^-1074, round to 0 in float64.
    error = abs(mpmath.mpf(gaussian_kl(*columns)) - exact)
    assert error <= 64 * EPS * exact + len(data) * 2.0**-1074


# ---------------------------------------------------------------- Gaussian smoothing


def _random_polynomial(coefficients, variables, degree):
    """Sum of the monomials of total degree <= ``degree``, weighted by ``coefficients``."""
    monomials = sorted(sympy.itermonomials(variables, degree), key=sympy.default_sort_key)
    return sum(sympy.Rational(c) * m for c, m in zip(coefficients, monomials))


@given(coefficients=st.lists(st.integers(-5, 5), min_size=21, max_size=21), degree=st.integers(0, 5))
def test_smoothing_series_exact_for_polynomials(coefficients, degree):
    # Heat-kernel series and Gaussian moments are two derivations of E L(w + sigma z); for a
    # polynomial both are exact, so they agree symbolically. Two variables up to degree 5 (21
    # monomials) cover mixed terms and two non-zero Laplacian powers while keeping sympy fast.
    w = sympy.symbols("w0:2", real=True)
    sigma = sympy.symbols("sigma", positive=True)
    loss = _random_polynomial(coefficients, w, degree)
    series = symbolic.gaussian_smoothing_series(loss, w, sigma)
    expectation = symbolic.gaussian_expectation(loss, w, sigma)
    assert sympy.expand(series - expectation) == 0


@given(coefficients=st.lists(st.integers(-5, 5), min_size=10, max_size=10))
def test_second_order_expansion_exact_for_cubics(coefficients):
    # For a cubic, Laplacian^2 L = 0, so L + sigma^2 / 2 Tr H is the exact expectation.
    w = sympy.symbols("w0:2", real=True)
    sigma = sympy.symbols("sigma", positive=True)
    loss = _random_polynomial(coefficients, w, 3)
    trace = sum(sympy.diff(loss, variable, 2) for variable in w)
    second_order = loss + sigma**2 / 2 * trace
    assert sympy.expand(symbolic.gaussian_expectation(loss, w, sigma) - second_order) == 0
    assert sympy.expand(symbolic.gaussian_smoothing_series(loss, w, sigma, order=1) - second_order) == 0


def test_second_order_remainder_for_quartic():
    # For a quartic the first neglected term is sigma^4 / 8 Laplacian^2 L.
    w = sympy.symbols("w0:2", real=True)
    sigma = sympy.symbols("sigma", positive=True)
    loss = w[0] ** 4 + 3 * w[0] ** 2 * w[1] ** 2 - w[1] ** 3
    laplacian = lambda f: sum(sympy.diff(f, v, 2) for v in w)  # noqa: E731
    truncated = symbolic.gaussian_smoothing_series(loss, w, sigma, order=1)
    remainder = symbolic.gaussian_expectation(loss, w, sigma) - truncated
    assert sympy.expand(remainder - sigma**4 / 8 * laplacian(laplacian(loss))) == 0


def test_second_order_bound_taylor_value_exact_for_cubic():
    # A cubic loss with values in [0, 1] near w0: the numeric second-order value built from the
    # loss and Hessian trace must equal the exact Gaussian expectation. Both are a handful of
    # float64 operations on exactly representable inputs, so they agree to a few ulps.
    w = sympy.symbols("w0:2", real=True)
    sigma = sympy.Rational(1, 8)
    loss = sympy.Rational(3, 10) + w[0] / 10 + w[0] ** 2 * w[1] / 20 + w[1] ** 2 / 5 - w[1] ** 3 / 30
    point = {w[0]: sympy.Rational(1, 2), w[1]: sympy.Rational(-1, 4)}
    exact = symbolic.gaussian_expectation(loss, w, sigma).subs(point)
    loss_value = float(loss.subs(point))
    trace_value = float(sum(sympy.diff(loss, v, 2) for v in w).subs(point))
    result = second_order_bound(loss_value, trace_value, float(sigma), 10.0, 1000, 0.05)
    assert result.taylor_risk == pytest.approx(float(exact), rel=8 * EPS)
    assert result.rigorous is False


def test_smoothing_series_rejects_non_polynomial():
    w = sympy.symbols("w0:1", real=True)
    with pytest.raises(ValueError, match=r"expression must be a polynomial in \(w0,\)"):
        symbolic.gaussian_smoothing_series(sympy.exp(w[0]), w, 1)
    with pytest.raises(ValueError, match=r"expression must be a polynomial"):
        symbolic.gaussian_expectation(sympy.sin(w[0]), w, 1)
    with pytest.raises(ValueError, match=r"order must be >= 0 or None, got -1"):
        symbolic.gaussian_smoothing_series(w[0], w, 1, order=-1)
    # With an order, non-polynomials are allowed: exp(w) smoothed is exp(w) (1 + s^2/2 + ...).
    series = symbolic.gaussian_smoothing_series(sympy.exp(w[0]), w, 1, order=2)
    assert sympy.simplify(series - sympy.exp(w[0]) * (1 + sympy.Rational(1, 2) + sympy.Rational(1, 8))) == 0


# ---------------------------------------------------------------- finite differences


@pytest.mark.parametrize(
    ("kind", "quotient", "derivative"),
    [
        ("central_second", lambda f, h: (f(h) + f(-h) - 2 * f(0)) / h**2, 2),
        ("central_first", lambda f, h: (f(h) - f(-h)) / (2 * h), 1),
        ("forward_first", lambda f, h: (f(h) - f(0)) / h, 1),
    ],
)
def test_finite_difference_error_matches_exact_series(kind, quotient, derivative):
    # For f(t) = exp(a t), f^(k)(0) = a^k; the exact error of the quotient, expanded by sympy's
    # own series, must equal the derived polynomial up to h^4.
    a, h = sympy.symbols("a", real=True), symbolic.h
    f = lambda t: sympy.exp(a * t)  # noqa: E731
    exact_error = quotient(f, h) - a**derivative
    expected = sympy.series(exact_error, h, 0, 5).removeO()
    derived = symbolic.finite_difference_error(kind, 4)
    substituted = derived.subs({sympy.Symbol(f"f{k}"): a**k for k in range(12)})
    assert sympy.expand(substituted - expected) == 0


def test_finite_difference_leading_terms():
    h = symbolic.h
    f = sympy.symbols("f0:12")
    assert sympy.expand(symbolic.finite_difference_error("central_second", 2) - h**2 * f[4] / 12) == 0
    assert sympy.expand(symbolic.finite_difference_error("central_first", 2) - h**2 * f[3] / 6) == 0
    assert sympy.expand(symbolic.finite_difference_error("forward_first", 1) - h * f[2] / 2) == 0
    with pytest.raises(ValueError, match=r"kind must be one of"):
        symbolic.finite_difference_error("backward", 2)
    with pytest.raises(ValueError, match=r"order must be >= 1, got 0"):
        symbolic.finite_difference_error("central_first", 0)


@pytest.mark.parametrize("step", [1e-1, 1e-2, 1e-3])
def test_finite_difference_error_bounds_hold(step):
    # f(t) = cos(t + 0.3): every derivative is bounded by 1, so the mean-value bounds apply with
    # M = 1; the exact errors come from 50-digit mpmath.
    with mpmath.workdps(50):
        h = mpmath.mpf(step)
        f = lambda t: mpmath.cos(t + mpmath.mpf("0.3"))  # noqa: E731
        second_error = abs((f(h) + f(-h) - 2 * f(0)) / h**2 + mpmath.cos(mpmath.mpf("0.3")))
        first_error = abs((f(h) - f(-h)) / (2 * h) + mpmath.sin(mpmath.mpf("0.3")))
    second_bound = symbolic.central_second_difference_error_bound(step, 1.0)
    first_bound = symbolic.central_first_difference_error_bound(step, 1.0)
    assert second_error <= second_bound
    assert first_error <= first_bound
    # The leading terms are h^2 cos(0.3) / 12 and h^2 sin(0.3) / 6, so the bounds are tight to
    # the factors cos(0.3) ~ 0.96 and sin(0.3) ~ 0.30, up to O(h^2) corrections.
    assert second_error >= 0.9 * second_bound
    assert first_error >= 0.25 * first_bound


# ---------------------------------------------------------------- optimal lambda


def test_optimal_lambda_expression():
    objective, lam_star, minimum = symbolic.optimal_lambda_expression()
    r, B = symbolic.risk, symbolic.budget
    assert sympy.simplify(lam_star - 2 / (sympy.sqrt(2 * r / B + 1) + 1)) == 0
    assert sympy.simplify(minimum - (sympy.sqrt(r + B / 2) + sympy.sqrt(B / 2)) ** 2) == 0
    assert sympy.simplify(sympy.diff(objective, symbolic.lam).subs(symbolic.lam, lam_star)) == 0


@given(risk=st.floats(0.0, 1.0), complexity=st.floats(1e-8, 10.0))
def test_optimal_lambda_matches_symbolic(risk, complexity):
    # The symbolic form (sqrt(B (B + 2r)) - B) / r cancels to about r / B relative, so it gets
    # 60 digits plus the digits lost to that cancellation; at risk = 0 it is 0/0 and is taken at
    # r = 1e-60 instead, where lam* differs from its limit 1 by about 1e-60 / B.
    r = risk if risk > 0 else 1e-60
    digits = 60 + max(0, math.ceil(math.log10(complexity) - math.log10(r)))
    with mpmath.workdps(digits):
        exact = _optimal_lambda_mpmath()(mpmath.mpf(r), mpmath.mpf(complexity))
    # The float64 formula takes a sqrt, one division and two additions: 8 ulps relative.
    assert optimal_lambda(risk, complexity) == pytest.approx(float(exact), rel=8 * EPS)


@given(risk=st.floats(0.0, 1.0), kl_value=st.floats(0.0, 1e4), n=st.integers(10, 10**6))
def test_lambda_bound_at_optimum_is_quad(risk, kl_value, n):
    complexity = (kl_value + math.log(2 * math.sqrt(n) / 0.05)) / n
    lam = optimal_lambda(risk, complexity)
    # Both closed forms lie within 32 ulps above the same exact value.
    assert lambda_bound(risk, kl_value, n, 0.05, lam) == pytest.approx(quad_bound(risk, kl_value, n, 0.05), rel=64 * EPS)


# ---------------------------------------------------------------- Catoni


def test_catoni_constant_touches_kl():
    g, C_star, g_at_star = symbolic.catoni_optimal_constant_expression()
    q, p, C = sympy.symbols("q p C", positive=True)
    kl_expression = q * sympy.log(q / p) + (1 - q) * sympy.log((1 - q) / (1 - p))
    for q_value, p_value in [(sympy.Rational(1, 10), sympy.Rational(3, 10)), (sympy.Rational(1, 2), sympy.Rational(9, 10))]:
        point = {q: q_value, p: p_value}
        assert sympy.N(g_at_star.subs(point) - kl_expression.subs(point), 50) == pytest.approx(0.0, abs=1e-45)
        assert sympy.N(sympy.diff(g, C).subs(C, C_star).subs(point), 50) == pytest.approx(0.0, abs=1e-45)


@given(q=st.floats(0.01, 0.9), budget=st.floats(1e-4, 2.0))
def test_catoni_at_optimal_constant_is_kl_inverse(q, budget):
    # Catoni's bound with C* = ln(p (1 - q) / (q (1 - p))) at p = kl_inv_upper(q, B), with
    # kl = 0 and n = 1 so that its exponent is C q + ln(1/delta) = C q + B.
    p = kl_inv_upper(q, budget)
    C_star = math.log(p * (1 - q) / (q * (1 - p)))
    delta = math.exp(-budget)
    # kl_inv_upper is within 1e-13 of the exact p, and Catoni's value at C* is stationary in C,
    # so it equals p up to that error plus the closed form's 32 ulps. 1e-10 relative covers the
    # propagation through C*.
    assert catoni_bound(q, 0.0, 1, delta, C_star) == pytest.approx(p, rel=1e-10)
    # kl(q, p) = B up to 48 ulps of B and three ulps of p times the slope (p - q) / (p (1 - p)),
    # as derived in the Bernoulli identity test.
    slope = (p - q) / (p * (1 - p))
    assert abs(kl(q, p) - budget) <= 48 * EPS * budget + 3 * np.spacing(p) * slope
