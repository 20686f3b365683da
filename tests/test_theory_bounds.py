"""PAC-Bayes bounds, Maurer's xi(n), the Monte-Carlo sample bound and the Gaussian KL.

Each bound is compared with its formula evaluated independently in mpmath (50 digits) and must
lie on the safe side of it. Relations between the bounds are checked on hypothesis-drawn inputs.
"""

import doctest
import math
import subprocess
import sys

import mpmath
import numpy as np
import pytest
import sympy
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize, stats

from crsam.theory import (
    bounds,
    catoni_bound,
    catoni_grid_bound,
    gaussian,
    gaussian_kl,
    kl_bound,
    kl_inv_upper,
    lambda_bound,
    log_maurer_xi,
    mcallester_bound,
    quad_bound,
    sample_bound,
)

EPS = np.finfo(np.float64).eps
mpmath.mp.dps = 50

# Closed-form bounds are raised by 16 ulps, which more than covers their own round-off (a few
# ulps), so they lie between the exact value and 32 ulps above it.
CLOSED_FORM_RTOL = 32 * EPS

# kl-inverse bounds lie within 3 ulps of 1 plus the slack shift (below 1e-13) above the exact
# inverse; the Bernoulli tests derive both numbers.
INVERSE_ATOL = 3 * EPS + 1e-13

risks = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 1e-9, 0.5]))
kls = st.one_of(st.floats(0.0, 1e5), st.sampled_from([0.0, 1e-12, 5000.0]))
counts = st.one_of(st.integers(1, 10**7), st.sampled_from([1, 2, 60000]))
deltas = st.one_of(st.floats(1e-10, 0.999), st.sampled_from([0.05, 0.025, 1e-10]))


def kl_mp(q, p):
    """Bernoulli kl from its definition in mpmath (0 ln 0 = 0)."""
    q, p = mpmath.mpf(q), mpmath.mpf(p)
    total = mpmath.mpf(0)
    if q > 0:
        total += q * mpmath.log(q / p) if p > 0 else mpmath.inf
    if q < 1:
        total += (1 - q) * (mpmath.log1p(-q) - mpmath.log1p(-p)) if p < 1 else mpmath.inf
    return total


def budget_mp(kl_value, n, delta):
    """(KL + ln(2 sqrt(n) / delta)) / n in mpmath."""
    return (mpmath.mpf(kl_value) + mpmath.log(2 * mpmath.sqrt(n) / mpmath.mpf(delta))) / n


def assert_closed_form(value, exact):
    """The closed form is on the safe side of ``exact`` and within CLOSED_FORM_RTOL of it."""
    assert mpmath.mpf(value) >= exact
    assert mpmath.mpf(value) <= exact * (1 + CLOSED_FORM_RTOL)


# ---------------------------------------------------------------- kl family against mpmath


@given(risk=risks, kl_value=kls, n=counts, delta=deltas)
def test_kl_bound_safe_and_tight(risk, kl_value, n, delta):
    value = kl_bound(risk, kl_value, n, delta)
    exact_budget = budget_mp(kl_value, n, delta)
    assert risk <= value <= 1.0

    # Safe side against the exactly computed budget: kl(risk, value) >= B, unless value = 1.
    assert value == 1.0 or kl_mp(risk, value) >= exact_budget

    # Tight: three ulps lower, kl is below the budget raised by the inverse's 32-ulp slack plus
    # 16 ulps for the float64 evaluation of the budget itself.
    lower_neighbour = value - 3 * np.spacing(value)
    if lower_neighbour > risk:
        assert kl_mp(risk, lower_neighbour) <= exact_budget * (1 + 48 * EPS)


@given(risk=risks, kl_value=kls, n=counts, delta=deltas)
def test_closed_form_bounds_match_mpmath(risk, kl_value, n, delta):
    half_budget = budget_mp(kl_value, n, delta) / 2
    risk_mp = mpmath.mpf(risk)
    assert_closed_form(mcallester_bound(risk, kl_value, n, delta), risk_mp + mpmath.sqrt(half_budget))
    assert_closed_form(
        quad_bound(risk, kl_value, n, delta),
        (mpmath.sqrt(risk_mp + half_budget) + mpmath.sqrt(half_budget)) ** 2,
    )
    for lam in [1e-3, 0.5, 1.0, 1.999]:
        lam_mp = mpmath.mpf(lam)
        exact = risk_mp / (1 - lam_mp / 2) + 2 * half_budget / (lam_mp * (1 - lam_mp / 2))
        assert_closed_form(lambda_bound(risk, kl_value, n, delta, lam), exact)


@given(risk=risks, kl_value=kls, n=counts, delta=deltas, C=st.floats(1e-6, 50.0))
def test_catoni_bound_matches_mpmath(risk, kl_value, n, delta, C):
    exponent = mpmath.mpf(C) * mpmath.mpf(risk) + (mpmath.mpf(kl_value) - mpmath.log(mpmath.mpf(delta))) / n
    exact = (1 - mpmath.exp(-exponent)) / (1 - mpmath.exp(-mpmath.mpf(C)))
    assert_closed_form(catoni_bound(risk, kl_value, n, delta, C), exact)


@given(risk=risks, kl_value=kls, n=counts, delta=deltas)
def test_kl_bound_below_relaxations(risk, kl_value, n, delta):
    value = kl_bound(risk, kl_value, n, delta)
    # Pinsker, kl(q, p) >= 2 (p - q)^2, makes McAllester's value a point where kl >= B, so the
    # exact kl bound is at most it; the same holds for kl(q, p) >= (p - q)^2 / (2p), p >= q, and
    # the quadratic bound. The returned kl bound may exceed its exact value by INVERSE_ATOL,
    # while the closed forms are never below theirs.
    assert value <= mcallester_bound(risk, kl_value, n, delta) + INVERSE_ATOL
    assert value <= quad_bound(risk, kl_value, n, delta) + INVERSE_ATOL
    for lam in [0.1, 1.0, 1.9]:
        assert value <= lambda_bound(risk, kl_value, n, delta, lam) + INVERSE_ATOL


# ---------------------------------------------------------------- lambda and quad


def test_lambda_minimum_is_quad_symbolically():
    # f(lam) = r / (1 - lam/2) + B / (lam (1 - lam/2)) has f'(lam*) = 0 at
    # lam* = 2 / (sqrt(2 r / B + 1) + 1), where f equals (sqrt(r + B/2) + sqrt(B/2))^2. With
    # r = a^2 - b^2 and B = 2 b^2 (a > b > 0) the radicals are rational in a, b.
    a, b, lam = sympy.symbols("a b lam", positive=True)
    r = a**2 - b**2
    budget = 2 * b**2
    objective = r / (1 - lam / 2) + budget / (lam * (1 - lam / 2))
    lam_star = 2 / (a / b + 1)
    assert sympy.simplify(lam_star - 2 / (sympy.sqrt(2 * r / budget + 1) + 1)) == 0
    assert sympy.simplify(sympy.diff(objective, lam).subs(lam, lam_star)) == 0
    assert sympy.simplify(objective.subs(lam, lam_star) - (a + b) ** 2) == 0
    assert sympy.simplify((sympy.sqrt(r + budget / 2) + sympy.sqrt(budget / 2)) ** 2 - (a + b) ** 2) == 0

    # The stationary point is the minimum: f is convex on (0, 2) (second derivative > 0).
    second = sympy.diff(objective, lam, 2).subs({a: 3, b: 1})
    for point in [sympy.Rational(1, 100), 1, sympy.Rational(199, 100)]:
        assert second.subs(lam, point) > 0


@given(risk=st.floats(0.0, 1.0), kl_value=st.floats(0.0, 1e4), n=st.integers(10, 10**6), delta=deltas)
def test_lambda_minimum_is_quad_numerically(risk, kl_value, n, delta):
    quad = quad_bound(risk, kl_value, n, delta)
    budget = (kl_value + math.log(2 * math.sqrt(n) / delta)) / n
    lam_star = 2.0 / (math.sqrt(2.0 * risk / budget + 1.0) + 1.0)

    # At the analytic optimum: both values are within 32 ulps above the same exact number.
    assert lambda_bound(risk, kl_value, n, delta, lam_star) == pytest.approx(quad, rel=2 * CLOSED_FORM_RTOL)

    # A numerical search over ln(lam) finds nothing below quad (up to its 32 ulps), and its
    # minimum agrees with quad to 1e-9: Brent's method stops within xatol = 1e-10 in ln(lam),
    # and near the minimum the value grows by f'' lam^2 x^2 / 2, far below 1e-9 relative.
    def objective(log_lam):
        return lambda_bound(risk, kl_value, n, delta, math.exp(log_lam))

    result = optimize.minimize_scalar(objective, bounds=(-30.0, math.log(1.999999)), method="bounded", options={"xatol": 1e-10})
    assert result.fun >= quad * (1 - CLOSED_FORM_RTOL)
    assert result.fun == pytest.approx(quad, rel=1e-9)


# ---------------------------------------------------------------- Catoni


@given(risk=st.floats(0.0, 0.95), kl_value=st.floats(0.0, 1e4), n=st.integers(10, 10**6), delta=deltas)
def test_catoni_minimum_is_kl_inverse(risk, kl_value, n, delta):
    inverse = kl_inv_upper(risk, (kl_value + math.log(1 / delta)) / n)

    # No C gives less than the kl inverse, since kl(q, p) = sup_C [-C q - ln(1 - p (1 - e^-C))].
    for C in [1e-3, 0.1, 1.0, 10.0, 100.0]:
        assert catoni_bound(risk, kl_value, n, delta, C) >= inverse - INVERSE_ATOL

    # The infimum over C reaches it: Brent over ln C in [-20, 40] stops within 1e-10 in ln C, and
    # the value is flat to second order there; at risk = 0 the infimum is the limit C -> inf,
    # where e^-C vanishes at C = e^40 and the value equals 1 - e^-B exactly.
    def objective(log_C):
        return catoni_bound(risk, kl_value, n, delta, math.exp(log_C))

    result = optimize.minimize_scalar(objective, bounds=(-20.0, 40.0), method="bounded", options={"xatol": 1e-10})
    assert result.fun == pytest.approx(inverse, rel=1e-8, abs=1e-12)


@given(
    risk=risks,
    kl_value=kls,
    n=counts,
    delta=deltas,
    grid=st.lists(st.floats(1e-3, 100.0), min_size=1, max_size=8),
)
def test_catoni_grid_pays_union_bound(risk, kl_value, n, delta, grid):
    value = catoni_grid_bound(risk, kl_value, n, delta, grid)
    # Each grid point is its own event at delta / K, and the reported value is their minimum.
    per_point = [catoni_bound(risk, kl_value, n, delta / len(grid), C) for C in grid]
    assert value == min(per_point)
    if len(grid) == 1:
        assert value == catoni_bound(risk, kl_value, n, delta, grid[0])


# ---------------------------------------------------------------- Maurer's xi(n)


def xi_mp(n):
    """xi(n) = sum_k C(n, k) (k/n)^k (1 - k/n)^(n-k) term by term in mpmath (0^0 = 1)."""
    n_mp = mpmath.mpf(n)
    return mpmath.fsum(
        mpmath.binomial(n, k) * mpmath.power(k / n_mp, k) * mpmath.power(1 - k / n_mp, n - k)
        for k in range(n + 1)
    )


@pytest.mark.parametrize("n", [1, 2, 3, 7, 29, 30, 31, 60, 61, 100, 1001, 4000])
def test_log_maurer_xi_matches_mpmath(n):
    # Terms with k < 30 take gammaln differences of size up to ln(30!) ~ 75, whose absolute
    # error of ~1e-14 becomes a relative error of the term; 1e-12 on ln xi leaves a factor 100.
    assert log_maurer_xi(n) == pytest.approx(float(mpmath.log(xi_mp(n))), abs=1e-12)


@given(n=st.one_of(st.integers(1, 10**6), st.just(10**7)))
def test_log_maurer_xi_between_sqrt_n_and_twice(n):
    # Maurer (2004): sqrt(n) <= xi(n) <= 2 sqrt(n); the margin 1e-12 is the accuracy above.
    value = log_maurer_xi(n)
    assert 0.5 * math.log(n) - 1e-12 <= value <= math.log(2.0) + 0.5 * math.log(n) + 1e-12


@given(risk=risks, kl_value=kls, n=st.integers(1, 10**5), delta=deltas)
def test_maurer_xi_option(risk, kl_value, n, delta):
    tight = kl_bound(risk, kl_value, n, delta, maurer_xi=True)
    expected = kl_inv_upper(risk, (kl_value + log_maurer_xi(n) - math.log(delta)) / n)
    # The budgets differ only in the order of float64 operations (a few ulps).
    assert tight == pytest.approx(expected, abs=INVERSE_ATOL)
    # xi(n) <= 2 sqrt(n), so the exact option is never looser (both inverses computed alike).
    assert tight <= kl_bound(risk, kl_value, n, delta) + INVERSE_ATOL


# ---------------------------------------------------------------- Monte-Carlo sample bound


@given(mean=risks, m=st.integers(1, 10**6), delta=deltas)
def test_sample_bound_is_one_sided_kl_inverse(mean, m, delta):
    value = sample_bound(mean, m, delta)
    # Safe side against the exact budget ln(1/delta) / m, and equal to the kl inverse at the
    # float64 budget up to the inverse's accuracy (the two budgets differ by a few ulps).
    assert value == 1.0 or kl_mp(mean, value) >= mpmath.log(1 / mpmath.mpf(delta)) / m
    assert value == pytest.approx(kl_inv_upper(mean, math.log(1 / delta) / m), abs=INVERSE_ATOL)


@given(p=st.floats(0.0, 1.0), m=st.integers(1, 300), delta=st.floats(0.001, 0.5))
def test_sample_bound_exact_coverage_for_bernoulli(p, m, delta):
    # For m Bernoulli(p) draws the failure probability Pr[bound(k/m) < p] is a finite sum over
    # k of binomial probabilities; it must not exceed delta. The relative 1e-12 covers the
    # round-off of summing at most 301 float64 probabilities.
    k = np.arange(m + 1)
    fails = np.asarray(sample_bound(k / m, m, delta)) < p
    failure_probability = float(np.sum(stats.binom.pmf(k[fails], m, p)))
    assert failure_probability <= delta * (1 + 1e-12)


@given(probabilities=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=200),
       delta=st.floats(0.001, 0.5))
def test_sample_bound_coverage_for_unequal_means(probabilities, delta):
    # Independent Bernoulli(p_i) draws with different p_i, as in the per-example scheme: the
    # count k has the Poisson-binomial law, built exactly by convolving the m two-point laws.
    # The bound must cover the average mean q with failure probability at most delta. Each
    # convolution adds round-off of a few ulps per entry, so the 1e-12 relative slack covers 200.
    m = len(probabilities)
    law = np.array([1.0])
    for p in probabilities:
        law = np.convolve(law, [1.0 - p, p])
    q = math.fsum(probabilities) / m
    k = np.arange(m + 1)
    fails = np.asarray(sample_bound(k / m, m, delta)) < q
    failure_probability = math.fsum(law[fails])
    assert failure_probability <= delta * (1 + 1e-12)


def test_sample_bound_known_zero_mean():
    # All m draws are 0: the bound solves -ln(1 - p) = ln(1/delta) / m, p = 1 - delta^(1/m).
    exact = 1 - mpmath.power(mpmath.mpf(0.01), mpmath.mpf(1) / 1000)
    value = sample_bound(0.0, 1000, 0.01)
    assert mpmath.mpf(value) >= exact
    # Three ulps plus the 32-ulp slack on c = ln(100) / 1000, times the slope 1 - p ~ 1.
    assert mpmath.mpf(value) - exact <= 3 * EPS * exact + 32 * EPS * math.log(100) / 1000


# ---------------------------------------------------------------- Gaussian KL


def gaussian_kl_mp(mu_q, sigma_q, mu_p, sigma_p):
    """Closed-form KL of diagonal Gaussians summed in 120-digit mpmath.

    The mean part is added separately from ln(sigma_p / sigma_q) + sigma_q^2 / (2 sigma_p^2) - 1/2,
    whose terms cancel to about (ratio - 1)^2 >= 1e-32 for distinct floats, so 120 digits keep
    more than 80 correct digits of each part.
    """
    with mpmath.workdps(120):
        total = mpmath.mpf(0)
        for mq, sq, mp_, sp in zip(mu_q, sigma_q, mu_p, sigma_p):
            mq, sq, mp_, sp = (mpmath.mpf(float(x)) for x in (mq, sq, mp_, sp))
            total += mpmath.log(sp / sq) + sq**2 / (2 * sp**2) - mpmath.mpf(1) / 2
            total += (mq - mp_) ** 2 / (2 * sp**2)
        return total


@given(
    data=st.lists(
        st.tuples(
            st.floats(-10.0, 10.0),
            st.floats(1e-3, 1e3),
            st.floats(-10.0, 10.0),
            st.floats(1e-3, 1e3),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_gaussian_kl_matches_mpmath(data):
    mu_q, sigma_q, mu_p, sigma_p = (np.array(column) for column in zip(*data))
    exact = gaussian_kl_mp(mu_q, sigma_q, mu_p, sigma_p)
    # Each term is accurate to about 8 ulps and summing 20 non-negative terms adds at most
    # 20 ulps, so 64 ulps relative is a safe bound. Terms below the smallest subnormal
    # (2^-1074, when the means differ by about 1e-162 or less) round to 0.
    error = abs(mpmath.mpf(gaussian_kl(mu_q, sigma_q, mu_p, sigma_p)) - exact)
    assert error <= 64 * EPS * exact + len(data) * 2.0**-1074


def test_gaussian_kl_near_equal_sigmas():
    # sigma_q = sigma_p (1 + t): KL ~ t^2 for t = 1e-9, far below the 1e-16 round-off that
    # ln(sigma_p / sigma_q) + sigma_q^2 / (2 sigma_p^2) - 1/2 would leave.
    sigma_p = np.array([0.1, 1.0, 3.0])
    sigma_q = sigma_p * (1 + 1e-9)
    mu = np.zeros(3)
    exact = gaussian_kl_mp(mu, sigma_q, mu, sigma_p)
    assert exact > 0
    assert abs(mpmath.mpf(gaussian_kl(mu, sigma_q, mu, sigma_p)) - exact) <= 64 * EPS * exact
    assert gaussian_kl(mu, sigma_p, mu, sigma_p) == 0.0


@pytest.mark.parametrize(("mu_q", "sigma_q", "mu_p", "sigma_p"), [(0.3, 0.5, -0.2, 1.5), (1.0, 2.0, 0.0, 0.7)])
def test_gaussian_kl_matches_integral(mu_q, sigma_q, mu_p, sigma_p):
    # The definition, the integral of q(x) ln(q(x) / p(x)) dx, by mpmath quadrature rather than
    # the closed form. The quadrature error at 50 digits is far below the 1e-14 relative
    # tolerance, which covers float64 round-off of the closed form.
    def log_density(x, mu, sigma):
        return -((x - mu) ** 2) / (2 * sigma**2) - mpmath.log(sigma) - mpmath.log(2 * mpmath.pi) / 2

    def integrand(x):
        log_q = log_density(x, mu_q, sigma_q)
        return mpmath.exp(log_q) * (log_q - log_density(x, mu_p, sigma_p))

    exact = mpmath.quad(integrand, [-mpmath.inf, mu_q, mpmath.inf])
    assert gaussian_kl(mu_q, sigma_q, mu_p, sigma_p) == pytest.approx(float(exact), rel=1e-14)


def test_gaussian_kl_broadcasts():
    mu_q = np.arange(6.0).reshape(2, 3)
    expected = sum(gaussian_kl(float(x), 0.5, 0.0, 2.0) for x in mu_q.ravel())
    # Same terms summed in another order: a few ulps of the total.
    assert gaussian_kl(mu_q, 0.5, 0.0, 2.0) == pytest.approx(expected, rel=8 * EPS)
    assert isinstance(gaussian_kl(0.0, 1.0, 0.0, 1.0), float)


# ---------------------------------------------------------------- shapes, errors, docs


def test_bounds_broadcast_and_return_float():
    risk = np.array([0.0, 0.1, 0.5])
    for function in (kl_bound, mcallester_bound, quad_bound):
        values = function(risk, 100.0, 1000, 0.05)
        assert values.shape == (3,)
        for i in range(3):
            assert values[i] == function(float(risk[i]), 100.0, 1000, 0.05)
        assert isinstance(function(0.1, 100.0, 1000, 0.05), float)
    assert lambda_bound(risk, 100.0, 1000, 0.05, np.array([[0.5], [1.0]])).shape == (2, 3)
    assert catoni_grid_bound(risk, 100.0, 1000, 0.05, [1.0, 2.0]).shape == (3,)
    assert isinstance(catoni_grid_bound(0.1, 100.0, 1000, 0.05, [1.0, 2.0]), float)
    assert isinstance(sample_bound(0.1, 100, 0.05), float)


def test_risk_rounding_is_clipped():
    # An excess of at most 1e-12 is round-off of a mean of [0, 1] values, clipped to [0, 1].
    assert kl_bound(1.0 + 1e-13, 10.0, 100, 0.05) == kl_bound(1.0, 10.0, 100, 0.05)
    assert mcallester_bound(-1e-13, 10.0, 100, 0.05) == mcallester_bound(0.0, 10.0, 100, 0.05)
    assert sample_bound(1.0 + 5e-13, 100, 0.05) == 1.0


def test_infinite_kl_gives_trivial_bound():
    assert kl_bound(0.1, math.inf, 100, 0.05) == 1.0
    assert mcallester_bound(0.1, math.inf, 100, 0.05) == math.inf


ARGS = dict(risk=0.1, kl=10.0, n=100, delta=0.05)


def _call(function, **overrides):
    arguments = {**ARGS, **overrides}
    return lambda: function(arguments["risk"], arguments["kl"], arguments["n"], arguments["delta"])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (_call(kl_bound, delta=1.5), r"delta must be in \(0, 1\), got 1\.5"),
        (_call(kl_bound, delta=0.0), r"delta must be in \(0, 1\), got 0\.0"),
        (_call(mcallester_bound, delta=math.nan), r"delta must be in \(0, 1\), got nan"),
        (_call(quad_bound, n=0), r"n must be an integer >= 1, got 0\.0"),
        (_call(kl_bound, n=2.5), r"n must be an integer >= 1, got 2\.5"),
        (_call(kl_bound, n=math.inf), r"n must be an integer >= 1, got inf"),
        (_call(kl_bound, risk=1.1), r"risk must be in \[0, 1\], got 1\.1"),
        (_call(kl_bound, risk=1.0 + 1e-9), r"risk must be in \[0, 1\], got 1\.000000001"),
        (_call(quad_bound, risk=math.nan), r"risk must be in \[0, 1\], got nan"),
        (_call(kl_bound, kl=-1.0), r"kl must be >= 0 and not NaN, got -1\.0"),
        (_call(mcallester_bound, kl=math.nan), r"kl must be >= 0 and not NaN, got nan"),
        (_call(kl_bound, kl=np.array([1.0, -2.0])), r"kl must be >= 0 and not NaN, got -2\.0 at index \(1,\)"),
        (lambda: lambda_bound(0.1, 10.0, 100, 0.05, 0.0), r"lam must be in \(0, 2\), got 0\.0"),
        (lambda: lambda_bound(0.1, 10.0, 100, 0.05, 2.0), r"lam must be in \(0, 2\), got 2\.0"),
        (lambda: catoni_bound(0.1, 10.0, 100, 0.05, 0.0), r"C must be finite and > 0, got 0\.0"),
        (lambda: catoni_bound(0.1, 10.0, 100, 0.05, math.inf), r"C must be finite and > 0, got inf"),
        (lambda: catoni_grid_bound(0.1, 10.0, 100, 0.05, []), r"grid must be a non-empty one-dimensional"),
        (lambda: catoni_grid_bound(0.1, 10.0, 100, 0.05, [[1.0]]), r"grid must be a non-empty one-dimensional"),
        (lambda: catoni_grid_bound(0.1, 10.0, 100, 0.05, [1.0, -1.0]), r"grid must be finite and > 0, got -1\.0 at index \(1,\)"),
        (lambda: catoni_grid_bound(0.1, 10.0, 100, 2.0, [1.0]), r"delta must be in \(0, 1\), got 2\.0"),
        (lambda: sample_bound(0.1, 0, 0.05), r"m must be an integer >= 1, got 0\.0"),
        (lambda: sample_bound(-0.5, 10, 0.05), r"mean must be in \[0, 1\], got -0\.5"),
        (lambda: sample_bound(0.5, 10, 1.0), r"delta must be in \(0, 1\), got 1\.0"),
        (lambda: log_maurer_xi(0), r"n must be an integer >= 1, got 0\.0"),
        (lambda: gaussian_kl(0.0, 0.0, 0.0, 1.0), r"sigma_q must be finite and > 0, got 0\.0"),
        (lambda: gaussian_kl(0.0, 1.0, 0.0, -1.0), r"sigma_p must be finite and > 0, got -1\.0"),
        (lambda: gaussian_kl(np.array([0.0, math.inf]), 1.0, 0.0, 1.0), r"mu_q must be finite, got inf"),
        (lambda: gaussian_kl(0.0, 1.0, math.nan, 1.0), r"mu_p must be finite, got nan"),
    ],
)
def test_bounds_invalid_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("module", [bounds, gaussian])
def test_bounds_doctests(module):
    failures, attempted = doctest.testmod(module)
    assert attempted > 0
    assert failures == 0


def test_theory_import_leaves_torch_unloaded():
    # crsam.theory must work without torch: importing it in a fresh interpreter loads no torch.
    code = "import sys, crsam.theory; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

