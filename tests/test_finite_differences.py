"""The finite differences behind the CR-SAM update against exact derivatives, in float64.

With g0 = grad L(w), u = g0 / ||g0||, eps = rho u and g+- = grad L(w +- eps), Taylor expansion
of the smooth loss gives

    L(w+eps) + L(w-eps) - 2 L(w) = eps^T H eps + (rho^4 / 12) D^4 L[u^4]           + O(rho^6)
    g+ + g- - 2 g0               = grad_w(v^T H(w) v)|_{v=eps}
                                   + (rho^4 / 12) grad_w D^4 L[u^4]               + O(rho^6)
    g+ - g-                      = 2 H eps + (rho^3 / 3) grad_w D^3 L[u^3]         + O(rho^5)

(odd or even powers cancel in the symmetric sums). Each test computes the left side, the exact
target and the exact leading remainder coefficient with ``crsam.verify`` (``torch.func``). It
checks that the error equals the predicted remainder up to the next order, at rho and at rho/2,
so the error shrinks by 2^4 (or 2^3) when rho halves.
"""

import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.func import grad

from crsam.verify import (
    directional_derivative,
    exact_gradient,
    exact_hessian,
    exact_third_contraction,
    flatten_parameters,
    loss_of_flat,
    random_classification_data,
    smooth_mlp,
)

# Relative size of the next Taylor term compared with the leading remainder. At rho <= 0.02 the
# next term is smaller by a factor of about rho^2 times a ratio of derivatives that stays below
# 10^2 for these tanh/GELU/softplus networks with unit-scale weights and inputs, so it is
# below 4e-2; 0.15 leaves a margin of about 4.
NEXT_ORDER_FRACTION = 0.15

# Round-off of a float64 loss or gradient on these networks (at most ~100 parameters and 8
# examples) is a few times 1e-16 relative. The absolute floor 1e-13 covers the difference of
# three such evaluations with a margin of about 100.
ROUND_OFF = 1e-13


@st.composite
def smooth_problems(draw):
    """Draw a small smooth MLP classifier with its data (float64)."""
    input_dim = draw(st.integers(1, 4))
    hidden = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    num_classes = draw(st.integers(2, 3))
    activation = draw(st.sampled_from(["tanh", "gelu", "softplus"]))
    n = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    model = smooth_mlp([input_dim, *hidden, num_classes], activation, seed=seed)
    X, y = random_classification_data(n, input_dim, num_classes, seed=seed + 1)
    loss = loss_of_flat(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), X, y)
    return loss, flatten_parameters(model)


def _ascent_direction(loss, w):
    g0 = exact_gradient(loss, w)
    g0_norm = float(torch.linalg.vector_norm(g0))
    # A vanishing gradient has no ascent direction (the optimizer then takes no perturbation).
    assume(g0_norm > 1e-6)
    return g0, g0 / g0_norm


@given(problem=smooth_problems(), rho=st.sampled_from([0.02, 0.01]))
def test_loss_second_difference(problem, rho):
    loss, w = problem
    _, u = _ascent_direction(loss, w)
    H = exact_hessian(loss, w)
    c4 = float(directional_derivative(loss, w, u, 4)) / 12.0

    errors = []
    for r in (rho, rho / 2):
        eps = r * u
        second_difference = float(loss(w + eps) + loss(w - eps) - 2.0 * loss(w))
        error = second_difference - float(eps @ H @ eps)
        predicted = c4 * r**4

        # Error = predicted rho^4 remainder up to the rho^6 term and round-off of L (|L| ~ 1).
        tolerance = NEXT_ORDER_FRACTION * abs(predicted) + ROUND_OFF * (1.0 + abs(float(loss(w))))
        assert abs(error - predicted) <= tolerance
        errors.append(error)

    # Order 4: halving rho divides the error by 16, when the remainder dominates round-off.
    if abs(c4) * (rho / 2) ** 4 > 1e3 * ROUND_OFF:
        assert 16 / 1.4 <= errors[0] / errors[1] <= 16 * 1.4


@given(problem=smooth_problems(), rho=st.sampled_from([0.02, 0.01]))
def test_gradient_second_difference(problem, rho):
    loss, w = problem
    g0, u = _ascent_direction(loss, w)
    c4 = grad(lambda x: directional_derivative(loss, x, u, 4))(w) / 12.0

    errors = []
    for r in (rho, rho / 2):
        eps = r * u
        g_plus = exact_gradient(loss, w + eps)
        g_minus = exact_gradient(loss, w - eps)
        target = exact_third_contraction(loss, w, eps)
        error = g_plus + g_minus - 2.0 * g0 - target
        predicted = c4 * r**4

        # Error = predicted rho^4 remainder up to the rho^6 term and gradient round-off.
        tolerance = NEXT_ORDER_FRACTION * float(torch.linalg.vector_norm(predicted)) + ROUND_OFF * (
            1.0 + float(torch.linalg.vector_norm(g0))
        )
        assert float(torch.linalg.vector_norm(error - predicted)) <= tolerance
        errors.append(float(torch.linalg.vector_norm(error)))

    # Order 4: halving rho divides the error norm by 16.
    if float(torch.linalg.vector_norm(c4)) * (rho / 2) ** 4 > 1e3 * ROUND_OFF:
        assert 16 / 1.4 <= errors[0] / errors[1] <= 16 * 1.4


@given(problem=smooth_problems(), rho=st.sampled_from([0.02, 0.01]))
def test_gradient_difference(problem, rho):
    loss, w = problem
    _, u = _ascent_direction(loss, w)
    H = exact_hessian(loss, w)
    c3 = grad(lambda x: directional_derivative(loss, x, u, 3))(w) / 3.0

    errors = []
    for r in (rho, rho / 2):
        eps = r * u
        error = exact_gradient(loss, w + eps) - exact_gradient(loss, w - eps) - 2.0 * H @ eps
        predicted = c3 * r**3

        # Error = predicted rho^3 remainder up to the rho^5 term and gradient round-off.
        tolerance = NEXT_ORDER_FRACTION * float(torch.linalg.vector_norm(predicted)) + ROUND_OFF * (
            1.0 + float(torch.linalg.vector_norm(H @ eps))
        )
        assert float(torch.linalg.vector_norm(error - predicted)) <= tolerance
        errors.append(float(torch.linalg.vector_norm(error)))

    # Order 3: halving rho divides the error norm by 8.
    if float(torch.linalg.vector_norm(c3)) * (rho / 2) ** 3 > 1e3 * ROUND_OFF:
        assert 8 / 1.4 <= errors[0] / errors[1] <= 8 * 1.4

    # H u is the gradient of the gradient norm, grad ||grad L|| = H g0 / ||g0||, so g+ - g- also
    # approximates 2 rho grad ||grad L||. Exact identity, checked to float64 round-off (relative
    # 1e-10 covers sums of P * N terms with relative error 1e-16 each, with a wide margin).
    gradient_of_norm = grad(lambda x: torch.linalg.vector_norm(grad(loss)(x)))(w)
    assert torch.allclose(gradient_of_norm, H @ u, rtol=1e-10, atol=1e-12)
