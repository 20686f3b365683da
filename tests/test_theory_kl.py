"""Bernoulli kl and its inverses against 120-digit mpmath evaluations.

The oracle evaluates kl from its definition in mpmath and inverts it by bisection to 2^-240, far
below float64 resolution, so float64 results are compared with (effectively) exact values.
"""

import doctest
import math

import mpmath
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import crsam.theory as theory
from crsam.theory import bernoulli
from crsam.theory import kl, kl_inv_lower, kl_inv_lower_grad, kl_inv_upper, kl_inv_upper_grad

EPS = np.finfo(np.float64).eps
# The two terms of kl(q, p) cancel down to kl, which is at least (p - q)^2 / 2. For distinct
# floats p, q in [0, 1] the terms exceed kl by a factor of at most about 1e32 (|p - q| >= 1e-16
# relative, squared), so 120 digits leave more than 80 correct digits after the cancellation.
MP_DPS = 120


def ulp(x):
    """Spacing of float64 numbers at |x|, as an mpmath number."""
    return mpmath.mpf(float(np.spacing(abs(float(x)))))

# Probabilities: uniform floats, the ends of [0, 1], and values crowding them (1e-300, 1 - 1e-15)
# where float64 and the kl conventions are hardest.
probabilities = st.one_of(
    st.floats(0.0, 1.0),
    st.sampled_from([0.0, 1.0, 1e-300, 1e-12, 0.5, 1.0 - 1e-12, 1.0 - 2.0**-53]),
)

# Budgets c in nats: ordinary values, the exact special cases 0 and inf, and extremes (1e-300
# makes p - q tiny, 1e300 pushes p to within an ulp of 1).
budgets = st.one_of(
    st.floats(0.0, 50.0),
    st.floats(1e-15, 1e-3),
    st.sampled_from([0.0, 1e-300, 1e-12, 1.0, 700.0, 1e300, math.inf]),
)


def kl_mp(q, p):
    """Bernoulli kl from its definition in mpmath, with 0 ln 0 = 0 and +inf at the ends.

    ln((1 - q) / (1 - p)) is taken as log1p(-q) - log1p(-p) so that q, p below 1e-120 keep
    their digits.
    """
    with mpmath.workdps(MP_DPS):
        q, p = mpmath.mpf(q), mpmath.mpf(p)
        total = mpmath.mpf(0)
        if q > 0:
            if p == 0:
                return mpmath.inf
            total += q * mpmath.log(q / p)
        if q < 1:
            if p == 1:
                return mpmath.inf
            total += (1 - q) * (mpmath.log1p(-q) - mpmath.log1p(-p))
        return total


def _bisect_mp(q, c, near, far, to_p, iterations=260):
    """Bisect a variable x with p = to_p(x) from ``near`` (kl <= c) towards ``far`` (kl > c)."""
    for _ in range(iterations):
        mid = (near + far) / 2
        if kl_mp(q, to_p(mid)) <= c:
            near = mid
        else:
            far = mid
    return to_p(near), to_p(far)


def kl_inv_mp(q, c, upper):
    """Bracket (lo, hi) around the exact kl inverse, narrow relative to both p and |p - q|.

    The first bisection runs on ln p, the second (for p within a factor 2 of q) on ln|p - q|
    inside the first bracket. Each spans less than 2000 in its variable, so 260 halvings leave a
    relative width below 1e-74 of p and, where the second runs, of |p - q|. Inverses beyond float64 resolution (1 - p < 2^-60, or p < 2^-1100,
    below the smallest subnormal) return the bracket [1 - 2^-60, 1] or [0, 2^-1100].
    """
    with mpmath.workdps(MP_DPS):
        q, c = mpmath.mpf(q), mpmath.mpf(c)
        if c == 0:
            return q, q
        if upper and (q == 1 or mpmath.isinf(c)):
            return mpmath.mpf(1), mpmath.mpf(1)
        if not upper and (q == 0 or mpmath.isinf(c)):
            return mpmath.mpf(0), mpmath.mpf(0)

        # Beyond float64 resolution: the root lies past the last representable point.
        tiny = mpmath.mpf(2) ** -1100
        edge = 1 - mpmath.mpf(2) ** -60 if upper else tiny
        if kl_mp(q, edge) <= c:
            return (edge, mpmath.mpf(1)) if upper else (mpmath.mpf(0), edge)

        # Relative to p: ln p runs from ln q (kl = 0; ln tiny for q = 0) to ln edge.
        start = mpmath.log(max(q, tiny))
        inside, outside = _bisect_mp(q, c, start, mpmath.log(edge), mpmath.exp)

        # Relative to |p - q| inside that bracket, where p is within a factor 2 of q (further away
        # p = q -+ e^w loses the digits of p; a zero distance becomes e^-2000 times the other).
        if abs(outside - q) < q / 2:
            sign = 1 if upper else -1
            far = mpmath.log(abs(outside - q))
            near = mpmath.log(abs(inside - q)) if inside != q else far - 2000
            inside, outside = _bisect_mp(q, c, near, far, lambda w: q + sign * mpmath.exp(w))
        return (inside, outside) if upper else (outside, inside)


def inverse_tolerance(q, c, p_exact):
    """Bound on |returned - exact| for the kl inverse at (q, c), as an mpmath number.

    Bisection ends at adjacent floats, one ulp apart; the closed forms (expm1 or exp, then one
    ulp outwards) are within two ulps. Add the displacement of the root caused by the comparison
    slack: raising c by KL_REL_SLACK * c moves the root by at most that amount divided by the
    kl slope |p - q| / (p (1 - p)) at the root, doubled for the slope's change over the step.
    """
    with mpmath.workdps(MP_DPS):
        slack = mpmath.mpf(bernoulli.KL_REL_SLACK) * mpmath.mpf(c)
        q = mpmath.mpf(q)
        if p_exact == q or mpmath.isinf(slack):
            shift = mpmath.mpf(0)
        else:
            shift = slack * p_exact * (1 - p_exact) / abs(p_exact - q)
        return 3 * ulp(p_exact) + 2 * shift


# ---------------------------------------------------------------- kl


@given(q=probabilities, p=probabilities)
def test_kl_matches_mpmath(q, p):
    exact = kl_mp(q, p)
    value = kl(q, p)
    if mpmath.isinf(exact):
        assert value == math.inf
        return
    # The inverses rely on kl's relative error staying well below KL_REL_SLACK (32 ulps): each
    # of the two non-negative terms is accurate to about 6 ulps, so 16 ulps is a strict check.
    assert abs(mpmath.mpf(value) - exact) <= 16 * EPS * exact


def test_kl_conventions():
    assert kl(0.0, 0.0) == 0.0
    assert kl(1.0, 1.0) == 0.0
    assert kl(0.0, 1.0) == math.inf
    assert kl(1.0, 0.0) == math.inf
    assert kl(0.3, 0.0) == math.inf
    assert kl(0.3, 1.0) == math.inf
    assert kl(0.3, 0.3) == 0.0


def test_kl_near_equal_arguments():
    # kl(q, q + t) ~ t^2 / (2 q (1 - q)): a direct evaluation would lose all digits to
    # cancellation at t = 1e-12 (terms of size 1e-12, result 1e-24); the relative error must
    # still be a few ulps (16, as in test_kl_matches_mpmath).
    for q, t in [(0.3, 1e-12), (0.5, -1e-10), (1e-5, 1e-14), (1.0 - 1e-6, -1e-13)]:
        exact = kl_mp(q, q + t)
        assert abs(mpmath.mpf(kl(q, q + t)) - exact) <= 16 * EPS * exact


def test_kl_broadcasts_and_returns_float():
    q = np.array([[0.1], [0.2]])
    p = np.array([0.3, 0.4, 0.5])
    values = kl(q, p)
    assert values.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert values[i, j] == kl(float(q[i, 0]), float(p[j]))
    assert isinstance(kl(0.1, 0.3), float)


# ---------------------------------------------------------------- inverses


@given(q=probabilities, c=budgets)
def test_kl_inv_upper_safe_and_accurate(q, c):
    p = kl_inv_upper(q, c)
    lo, hi = kl_inv_mp(q, c, upper=True)
    assert q <= p <= 1.0

    # Safe side: p is at or above the exact inverse, which for p on [q, 1] means
    # kl(q, p) >= c exactly, or p = 1 (nothing lies above).
    assert p == 1.0 or kl_mp(q, p) >= c or p == q == float(hi)

    # Accurate: within the tolerance derived in inverse_tolerance, and always within the 1e-12
    # that callers are promised.
    tolerance = inverse_tolerance(q, c, hi)
    assert mpmath.mpf(p) - lo <= tolerance
    assert mpmath.mpf(p) - lo <= 1e-12


@given(q=probabilities, c=budgets)
def test_kl_inv_lower_safe_and_accurate(q, c):
    p = kl_inv_lower(q, c)
    lo, hi = kl_inv_mp(q, c, upper=False)
    assert 0.0 <= p <= q

    # Safe side: p is at or below the exact inverse: kl(q, p) >= c exactly, or p = 0.
    assert p == 0.0 or kl_mp(q, p) >= c or p == q == float(lo)

    tolerance = inverse_tolerance(q, c, lo)
    assert hi - mpmath.mpf(p) <= tolerance
    assert hi - mpmath.mpf(p) <= 1e-12


def test_inverse_accuracy_bound():
    # The slack term of inverse_tolerance stays below 1e-13 on a grid spanning q and c: it is
    # 32 ulps of c divided by the kl slope at the root, and the slope grows with c.
    worst = mpmath.mpf(0)
    for q in [0.0, 1e-9, 0.01, 0.3, 0.5, 0.9, 1 - 1e-9]:
        for c in [1e-12, 1e-6, 0.01, 1.0, 10.0, 100.0]:
            _, hi = kl_inv_mp(q, c, upper=True)
            worst = max(worst, inverse_tolerance(q, c, hi) - 3 * ulp(hi))
    assert worst < 1e-13


@given(q=probabilities, c=budgets)
def test_kl_identity_where_representable(q, c):
    p = kl_inv_upper(q, c)
    assume(0.0 < c < math.inf and p > q and 1.0 - p >= 1e-12)
    # kl(q, p) = c up to: kl's own relative error (16 ulps of c), the slack (32 ulps of c), and
    # three ulps of p times the slope (p - q) / (p (1 - p)), which is at most 1 / (1 - p) <= 1e12
    # and makes the tolerance about 3e-4 where 1 - p = 1e-12 (float64 cannot do better there).
    slope = (p - q) / (p * (1.0 - p))
    tolerance = 48 * EPS * c + 3 * float(ulp(p)) * slope
    assert abs(kl(q, p) - c) <= tolerance


@given(q=probabilities, c=budgets)
def test_kl_identity_lower_where_representable(q, c):
    p = kl_inv_lower(q, c)
    assume(0.0 < c < math.inf and p < q and p >= 1e-12)
    slope = (q - p) / (p * (1.0 - p))
    tolerance = 48 * EPS * c + 3 * float(ulp(p)) * slope
    assert abs(kl(q, p) - c) <= tolerance


def test_kl_inverse_special_cases():
    for c in [1e-300, 1e-8, 0.5, 3.0, 40.0]:
        exact_zero = -mpmath.expm1(-mpmath.mpf(c))
        value = kl_inv_upper(0.0, c)
        # Closed form 1 - exp(-c), rounded up: at most two ulps plus the slack shift above.
        assert mpmath.mpf(value) >= exact_zero
        assert mpmath.mpf(value) - exact_zero <= 2 * EPS * exact_zero + 2 * bernoulli.KL_REL_SLACK * c
        exact_one = mpmath.exp(-mpmath.mpf(c))
        value = kl_inv_lower(1.0, c)
        assert mpmath.mpf(value) <= exact_one
        assert exact_one - mpmath.mpf(value) <= 2 * EPS * exact_one + 2 * bernoulli.KL_REL_SLACK * c
    for q in [0.0, 0.3, 1.0]:
        assert kl_inv_upper(q, 0.0) == q
        assert kl_inv_lower(q, 0.0) == q
        assert kl_inv_upper(q, math.inf) == 1.0
        assert kl_inv_lower(q, math.inf) == 0.0
        assert kl_inv_upper(q, 1e300) == 1.0
        assert kl_inv_lower(q, 1e300) == 0.0
    assert kl_inv_upper(1.0, 0.7) == 1.0
    assert kl_inv_lower(0.0, 0.7) == 0.0


@given(q1=probabilities, q2=probabilities, c=budgets)
def test_kl_inverse_monotone_in_q(q1, q2, c):
    q1, q2 = min(q1, q2), max(q1, q2)
    # The exact inverses are non-decreasing in q. Each returned value lies within the accuracy
    # bound of its exact value (3 ulps of at most 1 plus 1e-13, by test_inverse_accuracy_bound).
    allowance = 3 * EPS + 1e-13
    assert kl_inv_upper(q1, c) <= kl_inv_upper(q2, c) + allowance
    assert kl_inv_lower(q1, c) <= kl_inv_lower(q2, c) + allowance


@given(q=probabilities, c1=budgets, c2=budgets)
def test_kl_inverse_monotone_in_c(q, c1, c2):
    c1, c2 = min(c1, c2), max(c1, c2)
    # The upper inverse grows and the lower one shrinks with c; allowance as above.
    allowance = 3 * EPS + 1e-13
    assert kl_inv_upper(q, c1) <= kl_inv_upper(q, c2) + allowance
    assert kl_inv_lower(q, c1) >= kl_inv_lower(q, c2) - allowance


def test_kl_inverse_vectorized_matches_scalar():
    q = np.array([0.0, 0.05, 0.5, 0.99, 1.0])[:, None]
    c = np.array([0.0, 1e-6, 0.1, 5.0, math.inf])[None, :]
    upper = kl_inv_upper(q, c)
    lower = kl_inv_lower(q, c)
    assert upper.shape == lower.shape == (5, 5)
    for i in range(5):
        for j in range(5):
            assert upper[i, j] == kl_inv_upper(float(q[i, 0]), float(c[0, j]))
            assert lower[i, j] == kl_inv_lower(float(q[i, 0]), float(c[0, j]))
    assert isinstance(kl_inv_upper(0.1, 0.2), float)
    assert isinstance(kl_inv_lower(0.1, 0.2), float)


# ---------------------------------------------------------------- derivatives


def _derivatives_mp(q, c, upper):
    """Implicit-function derivatives of the mpmath inverse, with kl's partial derivatives taken
    by central differences of the definition (not the closed forms under test).

    Steps of 1e-40 relative to p and q leave truncation and round-off errors of order 1e-80
    relative at 120 digits, both far below float64 resolution.
    """
    lo, hi = kl_inv_mp(q, c, upper)
    with mpmath.workdps(MP_DPS):
        p = (lo + hi) / 2
        q = mpmath.mpf(q)
        step_p = p * mpmath.mpf("1e-40")
        step_q = q * mpmath.mpf("1e-40")
        d_kl_d_p = (kl_mp(q, p + step_p) - kl_mp(q, p - step_p)) / (2 * step_p)
        d_kl_d_q = (kl_mp(q + step_q, p) - kl_mp(q - step_q, p)) / (2 * step_q)
        return -d_kl_d_q / d_kl_d_p, 1 / d_kl_d_p


@given(q=st.floats(0.01, 0.99), c=st.floats(1e-6, 10.0), upper=st.booleans())
def test_kl_inverse_grad_matches_mpmath(q, c, upper):
    grad = kl_inv_upper_grad if upper else kl_inv_lower_grad
    d_q, d_c = grad(q, c)
    exact_q, exact_c = _derivatives_mp(q, c, upper)
    p = kl_inv_upper(q, c) if upper else kl_inv_lower(q, c)
    assume(0.0 < p < 1.0)
    # p is within inverse_tolerance of the exact inverse, so p, 1 - p and p - q carry relative
    # errors of at most that divided by p, 1 - p and |p - q|; d/dc inherits their sum. d/dq adds
    # the absolute error of the log ratio, the same sum, times d/dc.
    lo, hi = kl_inv_mp(q, c, upper)
    p_error = float(inverse_tolerance(q, c, hi if upper else lo))
    relative = p_error * (1 / p + 1 / (1 - p) + 1 / abs(p - q)) + 8 * EPS
    assert abs(d_c - exact_c) <= 2 * relative * abs(exact_c)
    assert abs(d_q - exact_q) <= 2 * relative * (abs(exact_q) + abs(exact_c))


def test_kl_inverse_grad_limits():
    # c = 0: p = q, so d/dq = 1 and d/dc = +-inf.
    assert kl_inv_upper_grad(0.3, 0.0) == (1.0, math.inf)
    assert kl_inv_lower_grad(0.3, 0.0) == (1.0, -math.inf)

    # q = 0 (upper): p = 1 - exp(-c), so d/dc = exp(-c) = 1 - p; d/dq is +inf one-sided.
    d_q, d_c = kl_inv_upper_grad(0.0, 2.0)
    assert d_q == math.inf
    assert d_c == pytest.approx(math.exp(-2.0), rel=1e-14)  # 1 - p, a few ulps of exp(-2)

    # q = 1 (lower): p = exp(-c), so d/dc = -p.
    d_q, d_c = kl_inv_lower_grad(1.0, 2.0)
    assert d_q == math.inf
    assert d_c == pytest.approx(-math.exp(-2.0), rel=1e-13)  # exp(-c (1 + slack)) - 1 ulp

    # Saturated: p = 1 (upper) or p = 0 (lower) in float64, where both derivatives vanish.
    assert kl_inv_upper_grad(0.4, math.inf) == (0.0, 0.0)
    assert kl_inv_upper_grad(1.0, 3.0) == (0.0, 0.0)
    assert kl_inv_lower_grad(0.4, math.inf) == (0.0, 0.0)
    assert kl_inv_lower_grad(0.0, 3.0) == (0.0, 0.0)

    # No NaN anywhere on a grid that includes every special case.
    q = np.array([0.0, 1e-300, 0.2, 1.0 - 1e-16, 1.0])[:, None]
    c = np.array([0.0, 1e-300, 0.3, 1e300, math.inf])[None, :]
    for grad in (kl_inv_upper_grad, kl_inv_lower_grad):
        d_q, d_c = grad(q, c)
        assert not np.any(np.isnan(d_q))
        assert not np.any(np.isnan(d_c))


# ---------------------------------------------------------------- errors and docs


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kl(-0.1, 0.5), r"q must be in \[0, 1\], got -0\.1"),
        (lambda: kl(0.5, 1.5), r"p must be in \[0, 1\], got 1\.5"),
        (lambda: kl(math.nan, 0.5), r"q must be in \[0, 1\], got nan"),
        (lambda: kl(np.array([0.1, 2.0]), 0.5), r"q must be in \[0, 1\], got 2\.0 at index \(1,\)"),
        (lambda: kl_inv_upper(0.5, -1.0), r"c must be >= 0 and not NaN, got -1\.0"),
        (lambda: kl_inv_lower(0.5, math.nan), r"c must be >= 0 and not NaN, got nan"),
        (lambda: kl_inv_upper(1.0 + 1e-9, 0.1), r"q must be in \[0, 1\], got 1\.000000001"),
        (lambda: kl_inv_upper("high", 0.1), r"q must be a number or an array of numbers, got 'high'"),
        (lambda: kl_inv_upper_grad(0.5, -1.0), r"c must be >= 0 and not NaN, got -1\.0"),
    ],
)
def test_kl_invalid_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_kl_rounding_excess_is_clipped():
    # An excess of at most 1e-12 is round-off and is clipped to the interval.
    assert kl(1.0 + 1e-13, 1.0) == 0.0
    assert kl_inv_upper(-1e-13, 0.5) == kl_inv_upper(0.0, 0.5)


def test_bernoulli_doctests():
    failures, attempted = doctest.testmod(bernoulli)
    assert attempted > 0
    assert failures == 0


def test_theory_exports_contract_names():
    for name in ["kl", "kl_inv_upper", "kl_inv_lower", "kl_bound", "mcallester_bound", "quad_bound", "lambda_bound"]:
        assert callable(getattr(theory, name))
