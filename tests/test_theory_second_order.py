"""Bounded cross-entropy surrogates and the (non-rigorous) second-order bound."""

import doctest
import math

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crsam.theory import (
    clipped_cross_entropy,
    kl_bound,
    second_order,
    second_order_bound,
    smooth_bounded_cross_entropy,
)

EPS = np.finfo(np.float64).eps

log_probabilities = st.one_of(st.floats(-800.0, 0.0), st.sampled_from([0.0, -np.inf, -1e-300, -9.21]))
p_mins = st.one_of(st.floats(1e-300, 0.999), st.sampled_from([1e-4, 1e-2]))


@given(log_probability=log_probabilities, p_min=p_mins)
def test_clipped_cross_entropy_matches_definition(log_probability, p_min):
    value = clipped_cross_entropy(log_probability, p_min)
    assert 0.0 <= value <= 1.0
    with mpmath.workdps(50):
        p = mpmath.exp(mpmath.mpf(log_probability)) if log_probability > -np.inf else mpmath.mpf(0)
        exact = mpmath.log(1 / max(p, mpmath.mpf(p_min))) / mpmath.log(1 / mpmath.mpf(p_min))
    # One max and one division of two logs, each correctly rounded: 4 ulps of the result, plus
    # the rounding of p_min's own log when the clip is active.
    assert abs(mpmath.mpf(value) - exact) <= 4 * EPS * max(exact, 1e-300) + 4 * EPS


@given(log_probability=log_probabilities, p_min=p_mins)
def test_smooth_cross_entropy_matches_definition(log_probability, p_min):
    value = smooth_bounded_cross_entropy(log_probability, p_min)
    assert 0.0 <= value <= 1.0
    with mpmath.workdps(50):
        p = mpmath.exp(mpmath.mpf(log_probability)) if log_probability > -np.inf else mpmath.mpf(0)
        p_min_mp = mpmath.mpf(p_min)
        exact = mpmath.log(1 / (p_min_mp + (1 - p_min_mp) * p)) / mpmath.log(1 / p_min_mp)
    # logaddexp, log1p and one division: a few ulps relative to the value, and an absolute
    # 8 ulps where the value is near 0 and the log of the mixture cancels towards 0.
    assert abs(mpmath.mpf(value) - exact) <= 8 * EPS * exact + 8 * EPS


def test_smooth_cross_entropy_limits():
    p_min = 1e-4
    assert smooth_bounded_cross_entropy(0.0, p_min) == 0.0
    assert smooth_bounded_cross_entropy(-np.inf, p_min) == 1.0
    # Far above p_min it approaches the plain cross-entropy over ln(1/p_min): the mixture changes
    # the log by ln(1 - p_min + p_min / p), below 2 p_min / p.
    log_p = math.log(0.3)
    plain = -log_p / math.log(1 / p_min)
    assert abs(smooth_bounded_cross_entropy(log_p, p_min) - plain) <= 2 * p_min / 0.3 / math.log(1 / p_min)
    values = smooth_bounded_cross_entropy(np.linspace(-30.0, 0.0, 50), p_min)
    assert np.all(np.diff(values) <= 0.0)


def test_second_order_bound_fields():
    result = second_order_bound(0.1, 20.0, 0.01, 500.0, 4000, 0.025, mc_risk=0.102)
    taylor = 0.1 + 0.5 * 0.01**2 * 20.0
    assert result.rigorous is False
    assert result.taylor_risk == pytest.approx(taylor, rel=4 * EPS)
    assert result.remainder_estimate == pytest.approx(0.102 - taylor, rel=1e-12)
    # Same kl inverse at the same (up to a few ulps) budget: within the inverse's accuracy.
    assert result.value == pytest.approx(kl_bound(taylor, 500.0, 4000, 0.025), abs=3 * EPS + 1e-13)
    assert result.complexity == pytest.approx((500.0 + math.log(2 * math.sqrt(4000) / 0.025)) / 4000, rel=8 * EPS)


def test_second_order_bound_clips_taylor_value():
    # A negative trace can push the Taylor value below 0 and a large one above 1; the kl inverse
    # takes the clipped value, and the raw value stays in the result.
    low = second_order_bound(0.001, -1e4, 0.1, 10.0, 1000, 0.05)
    assert low.taylor_risk < 0.0
    assert low.value == kl_bound(0.0, 10.0, 1000, 0.05)
    high = second_order_bound(0.9, 1e4, 0.1, 10.0, 1000, 0.05)
    assert high.taylor_risk > 1.0
    assert high.value == 1.0
    assert second_order_bound(0.2, 5.0, 0.0, 10.0, 1000, 0.05).taylor_risk == 0.2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: second_order_bound(1.5, 1.0, 0.1, 1.0, 10, 0.05), r"loss must be in \[0, 1\], got 1\.5"),
        (lambda: second_order_bound(0.1, math.nan, 0.1, 1.0, 10, 0.05), r"trace_hessian must be finite, got nan"),
        (lambda: second_order_bound(0.1, 1.0, -0.1, 1.0, 10, 0.05), r"sigma must be finite and >= 0, got -0\.1"),
        (lambda: second_order_bound(0.1, 1.0, 0.1, -1.0, 10, 0.05), r"kl must be >= 0 and not NaN, got -1\.0"),
        (lambda: second_order_bound(0.1, 1.0, 0.1, 1.0, 10, 0.05, mc_risk=2.0), r"mc_risk must be in \[0, 1\], got 2\.0"),
        (lambda: clipped_cross_entropy(0.5, 1e-4), r"log_probability must be <= 0 and not NaN, got 0\.5"),
        (lambda: smooth_bounded_cross_entropy(np.array([-1.0, math.nan]), 1e-4), r"got nan"),
        (lambda: smooth_bounded_cross_entropy(-1.0, 0.0), r"p_min must be in \(0, 1\), got 0\.0"),
        (lambda: clipped_cross_entropy(-1.0, 1.0), r"p_min must be in \(0, 1\), got 1\.0"),
    ],
)
def test_second_order_invalid_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_second_order_doctests():
    failures, attempted = doctest.testmod(second_order)
    assert attempted > 0
    assert failures == 0
