"""The oracles of crsam.verify against closed forms, so that they can be trusted as oracles."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from crsam.verify import (
    directional_derivative,
    exact_gradient,
    exact_hessian,
    exact_third_contraction,
    exact_trace,
    flatten_parameters,
    gaussian_expectation_of_polynomial,
    kl_bernoulli_high_precision,
    kl_gaussians_isotropic,
    kl_inv_upper_high_precision,
    linear_cross_entropy_hessian,
    linear_cross_entropy_trace,
    linear_squared_error_hessian,
    loss_of_flat,
    polynomial_value,
    random_classification_data,
    smooth_mlp,
    unflatten_parameters,
)

# Two float64 computations of the same derivative over at most a few hundred terms of size ~1
# agree to ~1e-13; 1e-10 leaves a margin of 1000.
RTOL = 1e-10
ATOL = 1e-12


@st.composite
def linear_problems(draw):
    """Draw a float64 linear layer and inputs; sizes small enough for dense Hessians."""
    d = draw(st.integers(1, 4))
    k = draw(st.integers(1, 3))
    n = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = nn.Linear(d, k).double()
    X = torch.randn(n, d, dtype=torch.float64)
    return model, X, seed


@given(problem=linear_problems())
def test_linear_squared_error_hessian_closed_form(problem):
    model, X, seed = problem
    Y = torch.randn(X.shape[0], model.out_features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loss = loss_of_flat(model, lambda o, t: (o - t).pow(2).sum(dim=1), X, Y)
    H = exact_hessian(loss, flatten_parameters(model))
    assert torch.allclose(H, linear_squared_error_hessian(X, model.out_features), rtol=RTOL, atol=ATOL)


@given(problem=linear_problems())
def test_linear_cross_entropy_hessian_closed_form(problem):
    model, X, seed = problem
    k = model.out_features
    y = torch.randint(0, k, (X.shape[0],), generator=torch.Generator().manual_seed(seed))
    loss = loss_of_flat(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), X, y)
    w = flatten_parameters(model)
    H = exact_hessian(loss, w)

    assert torch.allclose(H, linear_cross_entropy_hessian(model.weight, model.bias, X), rtol=RTOL, atol=ATOL)
    closed_trace = linear_cross_entropy_trace(model.weight, model.bias, X)
    assert math.isclose(exact_trace(loss, w), closed_trace, rel_tol=RTOL, abs_tol=ATOL)


def test_linear_cross_entropy_one_class_is_flat():
    # One class: softmax is constantly 1, so the loss is 0 and every curvature vanishes.
    W = torch.randn(1, 3, dtype=torch.float64)
    b = torch.zeros(1, dtype=torch.float64)
    X = torch.randn(4, 3, dtype=torch.float64)
    assert linear_cross_entropy_trace(W, b, X) == 0.0
    assert torch.count_nonzero(linear_cross_entropy_hessian(W, b, X)) == 0


@given(
    a=st.lists(st.floats(-2, 2), min_size=1, max_size=5),
    seed=st.integers(0, 1000),
)
def test_third_contraction_of_cubic(a, seed):
    # L(w) = (a.w)^3 has H(w) = 6 (a.w) a a^T, so v^T H(w) v = 6 (a.w) (a.v)^2 and
    # grad_w (v^T H v) = 6 (a.v)^2 a; D^3 L[v, v, v] = 6 (a.v)^3.
    a = torch.tensor(a, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(a.numel(), generator=generator, dtype=torch.float64)
    v = torch.randn(a.numel(), generator=generator, dtype=torch.float64)

    def loss(x):
        return (a @ x) ** 3

    a_v = float(a @ v)
    assert torch.allclose(exact_third_contraction(loss, w, v), 6 * a_v**2 * a, rtol=RTOL, atol=ATOL)
    assert torch.allclose(exact_hessian(loss, w), 6 * float(a @ w) * torch.outer(a, a), rtol=RTOL, atol=ATOL)
    assert math.isclose(float(directional_derivative(loss, w, v, 3)), 6 * a_v**3, rel_tol=RTOL, abs_tol=ATOL)
    assert float(directional_derivative(loss, w, v, 4)) == 0.0


@given(
    seed=st.integers(0, 2**16),
    activation=st.sampled_from(["tanh", "gelu", "softplus"]),
    n=st.integers(1, 6),
)
def test_flatten_round_trip_and_reduction(seed, activation, n):
    model = smooth_mlp([3, 4, 2], activation, seed=seed)
    X, y = random_classification_data(n, 3, 2, seed=seed)
    w = flatten_parameters(model)
    pieces = unflatten_parameters(model, w)
    for name, p in model.named_parameters():
        assert torch.equal(pieces[name], p.detach())

    # The oracle's loss at the model's own weights equals the model's loss; sum = n * mean.
    mean = loss_of_flat(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), X, y)
    total = loss_of_flat(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), X, y, reduction="sum")
    assert math.isclose(float(mean(w)), float(F.cross_entropy(model(X), y).detach()), rel_tol=RTOL)
    assert math.isclose(float(total(w)), n * float(mean(w)), rel_tol=RTOL)
    assert torch.allclose(exact_gradient(total, w), n * exact_gradient(mean, w), rtol=RTOL, atol=ATOL)


@given(
    coefficients=st.dictionaries(
        st.tuples(st.integers(0, 3), st.integers(0, 3)).filter(lambda alpha: sum(alpha) <= 3),
        st.floats(-3, 3),
        max_size=6,
    ),
    mean=st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
    sigma=st.floats(0, 2),
)
def test_gaussian_expectation_of_cubic(coefficients, mean, sigma):
    # Degree <= 3: E p(m + e) = p(m) + (sigma^2 / 2) Tr H_p(m) exactly (third moments vanish).
    m = torch.tensor(mean, dtype=torch.float64)
    expected = float(polynomial_value(coefficients, m)) + sigma**2 / 2 * float(
        torch.trace(exact_hessian(lambda w: polynomial_value(coefficients, w), m))
    )
    value = gaussian_expectation_of_polynomial(coefficients, m, sigma)
    # Terms up to 3 * 2^3 * 2^2 in size: round-off of the float64 side is below 1e-13.
    assert math.isclose(value, expected, rel_tol=1e-12, abs_tol=1e-12)


@given(m=st.floats(-3, 3), sigma=st.floats(0, 3))
def test_gaussian_expectation_of_quartic(m, sigma):
    # E (m + e)^4 = m^4 + 6 m^2 sigma^2 + 3 sigma^4 for e ~ N(0, sigma^2).
    value = gaussian_expectation_of_polynomial({(4,): 1.0}, torch.tensor([m], dtype=torch.float64), sigma)
    assert math.isclose(value, m**4 + 6 * m**2 * sigma**2 + 3 * sigma**4, rel_tol=1e-14, abs_tol=1e-14)


@given(q=st.floats(0, 1), p=st.floats(1e-6, 1 - 1e-6))
def test_kl_bernoulli_matches_float_formula(q, p):
    # Float64 formula with 0 ln 0 = 0: relative round-off ~1e-15 times the condition of the sum.
    direct = sum(a * math.log(a / b) for a, b in ((q, p), (1 - q, 1 - p)) if a > 0)
    assert math.isclose(kl_bernoulli_high_precision(q, p), direct, rel_tol=1e-9, abs_tol=1e-12)


@given(q=st.floats(0, 1), c=st.floats(0, 50))
def test_kl_inv_upper_inverts_kl(q, c):
    p = kl_inv_upper_high_precision(q, c)
    assert q <= p <= 1.0
    # p is the smallest float64 at or above the boundary p*: kl(q, p) >= c (unless p reached 1),
    # and one ulp below p the kl is at most c (unless that falls below q, where kl decreases).
    if p < 1.0:
        assert kl_bernoulli_high_precision(q, p) >= c
    below = math.nextafter(p, 0.0)
    if below >= q:
        assert kl_bernoulli_high_precision(q, below) <= c


def test_kl_gaussians_matches_torch_distributions():
    generator = torch.Generator().manual_seed(18)
    mean_q = torch.randn(7, generator=generator, dtype=torch.float64)
    mean_p = torch.randn(7, generator=generator, dtype=torch.float64)
    q = torch.distributions.Normal(mean_q, 0.3)
    p = torch.distributions.Normal(mean_p, 0.7)
    expected = float(torch.distributions.kl_divergence(q, p).sum())
    assert math.isclose(kl_gaussians_isotropic(mean_q, 0.3, mean_p, 0.7), expected, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: unflatten_parameters(nn.Linear(2, 2), torch.zeros(5)), r"w has shape \(5,\) but the model has 6"),
        (lambda: loss_of_flat(nn.Linear(2, 2), F.mse_loss, torch.zeros(1, 2), torch.zeros(1, 2), reduction="avg"), r"reduction='avg' is invalid"),
        (lambda: gaussian_expectation_of_polynomial({(1,): 1.0}, torch.zeros(1), -1.0), r"sigma=-1.0 is negative"),
        (lambda: gaussian_expectation_of_polynomial({(1, 1): 1.0}, torch.zeros(1), 1.0), r"has 2 entries but mean has 1"),
        (lambda: kl_bernoulli_high_precision(1.5, 0.5), r"q=1.5 is outside \[0, 1\]"),
        (lambda: kl_inv_upper_high_precision(0.5, -1.0), r"c=-1.0 is negative"),
        (lambda: kl_gaussians_isotropic(torch.zeros(1), 0.0, torch.zeros(1), 1.0), r"must both be > 0"),
        (lambda: directional_derivative(lambda w: w.sum(), torch.zeros(1), torch.ones(1), -1), r"order=-1 is negative"),
        (lambda: smooth_mlp([3], "tanh"), r"widths=\[3\] is invalid"),
        (lambda: smooth_mlp([3, 2, 2], "relu"), r"activation='relu' is invalid"),
    ],
)
def test_invalid_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
