"""Prior-variance grid, its union-bound cost and the Dziugaite-Roy bound."""

import math

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crsam.theory import (
    dziugaite_roy_bound,
    kl_bound,
    prior_grid,
    prior_variance_grid,
    prior_variance_union_cost,
    round_prior_variance,
)

EPS = np.finfo(np.float64).eps

# Any positive finite float64 variance, subnormals and huge values included, next to the usual
# range of prior variances.
variances = st.one_of(
    st.floats(min_value=5e-324, max_value=1.7e308, allow_nan=False, allow_infinity=False),
    st.floats(1e-8, 1.0),
)


def test_grid_values_and_costs():
    grid = prior_variance_grid(100, 0.1, 5)
    for j in range(1, 6):
        # c exp(-j / b): one exp and two products, a few ulps.
        assert grid[j - 1] == pytest.approx(0.1 * math.exp(-j / 100), rel=4 * EPS)
        exact_cost = mpmath.log(mpmath.pi**2 * j**2 / 6)
        assert prior_variance_union_cost(j) == pytest.approx(float(exact_cost), rel=4 * EPS, abs=4 * EPS)


def test_union_cost_weights_sum_to_one():
    # exp(-cost_j) = 6 / (pi^2 j^2), whose sum over j >= 1 is 1: the partial sums stay below 1
    # and the tail after J terms is below 6 / (pi^2 J).
    j = np.arange(1, 200001)
    weights = np.exp(-np.asarray(prior_variance_union_cost(j)))
    total = math.fsum(weights)
    assert total <= 1.0
    assert total >= 1.0 - 6 / (math.pi**2 * 200000) - 1e-12


@given(variance=variances, direction=st.sampled_from(["nearest", "larger_variance", "smaller_variance"]))
def test_rounding_never_nan(variance, direction):
    try:
        point = round_prior_variance(variance, b=100, c=0.1, direction=direction)
    except ValueError as error:
        # Only the documented underflow: a variance so small that its grid point is 0 in float64.
        assert "underflows float64" in str(error)
        assert variance < 1e-300
        return
    assert point.index >= 1
    assert math.isfinite(point.union_cost)
    assert 0.0 < point.variance <= 0.1 * math.exp(-1 / 100)
    # An index below 1 needs a continuous index b ln(c / variance) below 1 (for any rounding),
    # and an index of at least 1 needs it above 0.
    continuous = 100 * (math.log(0.1) - math.log(variance))
    if point.at_edge:
        assert continuous < 1
    else:
        assert continuous > 0


@given(variance=st.floats(1e-8, 0.09))
def test_rounding_directions_bracket_variance(variance):
    larger = round_prior_variance(variance, 100, 0.1, "larger_variance")
    smaller = round_prior_variance(variance, 100, 0.1, "smaller_variance")
    nearest = round_prior_variance(variance, 100, 0.1, "nearest")
    # The grid variance is c exp(-j / b) with j rounded from b ln(c / variance), so the requested
    # variance lies between the two neighbours (up to a few ulps of the exp).
    assert larger.variance >= variance * (1 - 8 * EPS)
    assert smaller.variance <= variance * (1 + 8 * EPS)
    assert smaller.index - larger.index in (0, 1)
    assert nearest.index in (larger.index, smaller.index)


@pytest.mark.parametrize("j", [1, 2, 17, 461, 5000])
def test_grid_point_round_trips(j):
    variance = prior_variance_grid(100, 0.1, j)[-1]
    for direction in ["nearest", "larger_variance", "smaller_variance"]:
        point = round_prior_variance(variance, 100, 0.1, direction)
        # b ln(c / variance) is j up to round-off of about 100 * 1e-16 * j, far from the next
        # integer, except that floor/ceil may land on either side of j by that round-off.
        assert abs(point.index - j) <= (0 if direction == "nearest" else 1)


def test_variance_above_scale_goes_to_edge():
    for variance in [0.0999, 0.1, 1.0, 1e300]:
        point = round_prior_variance(variance, 100, 0.1)
        assert point.index == 1
        assert point.at_edge
        assert point.union_cost == pytest.approx(math.log(math.pi**2 / 6), rel=4 * EPS)


@given(
    risk=st.floats(0.0, 1.0),
    kl_value=st.floats(0.0, 1e4),
    n=st.integers(2, 10**6),
    delta=st.floats(1e-6, 0.5),
    j=st.integers(1, 10**5),
)
def test_dziugaite_roy_bound_forms(risk, kl_value, n, delta, j):
    # Maurer form: the kl bound with the union cost added to the KL (same event, delta_j).
    cost = prior_variance_union_cost(j)
    expected = kl_bound(risk, kl_value + cost, n, delta)
    # Both budgets are the same sum in another order: a few ulps of c, which moves the inverse
    # by at most 3 ulps plus the 1e-13 slack bound derived in the Bernoulli tests.
    assert dziugaite_roy_bound(risk, kl_value, n, delta, j) == pytest.approx(expected, abs=3 * EPS + 1e-13)

    # Released-code form: the budget (KL + 2 ln j + ln(pi^2 n / (6 delta))) / (n - 1), checked on
    # the safe side against its 50-digit value.
    value = dziugaite_roy_bound(risk, kl_value, n, delta, j, form="dziugaite-roy-code")
    budget = (mpmath.mpf(kl_value) + 2 * mpmath.log(j) + mpmath.log(mpmath.pi**2 * n / (6 * mpmath.mpf(delta)))) / (n - 1)
    if value < 1.0:
        q, p = mpmath.mpf(risk), mpmath.mpf(value)
        divergence = (q * mpmath.log(q / p) if q > 0 else 0) + (1 - q) * mpmath.log((1 - q) / (1 - p))
        assert divergence >= budget


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: round_prior_variance(0.0, 100, 0.1), r"variance must be a finite number > 0, got 0\.0"),
        (lambda: round_prior_variance(math.nan, 100, 0.1), r"variance must be a finite number > 0, got nan"),
        (lambda: round_prior_variance(math.inf, 100, 0.1), r"variance must be a finite number > 0, got inf"),
        (lambda: round_prior_variance(-1e-3, 100, 0.1), r"variance must be a finite number > 0, got -0\.001"),
        (lambda: round_prior_variance(1e-3, 0, 0.1), r"b must be a finite number > 0, got 0"),
        (lambda: round_prior_variance(1e-3, 100, math.nan), r"c must be a finite number > 0, got nan"),
        (lambda: round_prior_variance(1e-3, 1e308, 0.1), r"overflows for b = 1e\+308"),
        (lambda: round_prior_variance(1e-3, 100, 0.1, "up"), r"direction must be one of"),
        (lambda: round_prior_variance(5e-324, 1, 0.1, "smaller_variance"), r"underflows float64"),
        (lambda: prior_variance_grid(100, 0.1, 0), r"size must be an integer >= 1, got 0\.0"),
        (lambda: prior_variance_union_cost(0), r"index must be an integer >= 1, got 0\.0"),
        (lambda: dziugaite_roy_bound(0.1, 10.0, 100, 0.05, 0), r"index must be an integer >= 1, got 0\.0"),
        (lambda: dziugaite_roy_bound(0.1, 10.0, 100, 0.05, 1, form="other"), r"form must be 'maurer' or"),
        (lambda: dziugaite_roy_bound(0.1, 10.0, 1, 0.05, 1, form="dziugaite-roy-code"), r"n must be >= 2"),
        (lambda: dziugaite_roy_bound(0.1, 10.0, 100, 1.5, 1), r"delta must be in \(0, 1\), got 1\.5"),
    ],
)
def test_prior_grid_invalid_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_prior_grid_doctests():
    import doctest

    failures, attempted = doctest.testmod(prior_grid)
    assert attempted > 0
    assert failures == 0
