"""Closed-form Hessians, traces and expectations to check the autograd oracles and estimators.

Linear models: ``nn.Linear(d, k)`` with weight W (k x d) and bias b (k), flattened in PyTorch's
``named_parameters`` order (W row by row, then b), and x~ = [x, 1] the input with a constant 1
appended for the bias. Writing theta_j = [W_j, b_j] for the parameters of output j, both losses
below have Hessians of Kronecker form in the order (output j, input coordinate a); the functions
permute them to PyTorch's order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import mpmath
import torch

__all__ = [
    "linear_squared_error_hessian",
    "linear_cross_entropy_hessian",
    "linear_cross_entropy_trace",
    "polynomial_value",
    "gaussian_expectation_of_polynomial",
    "kl_bernoulli_high_precision",
    "kl_inv_upper_high_precision",
    "kl_gaussians_isotropic",
]


def _with_bias_column(X: torch.Tensor) -> torch.Tensor:
    """Return x~ = [x, 1] for every row of X, in float64."""
    X = X.to(torch.float64)
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=torch.float64)], dim=1)


def _output_major_to_torch_order(k: int, d: int) -> torch.Tensor:
    """Return the permutation that maps PyTorch's flat order to the (output j, coordinate a) order.

    Position j (d + 1) + a of the (j, a) order is W[j, a] for a < d, which PyTorch stores at
    j d + a, and b[j] for a = d, stored at k d + j. Indexing a (j, a)-ordered matrix with the
    inverse of this map on both axes gives PyTorch's order.
    """
    torch_index = torch.empty(k * (d + 1), dtype=torch.long)
    for j in range(k):
        for a in range(d + 1):
            torch_index[j * (d + 1) + a] = j * d + a if a < d else k * d + j
    return torch.argsort(torch_index)


def linear_squared_error_hessian(X: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Return the Hessian of L(W, b) = (1/n) sum_i ||W x_i + b - y_i||^2 in PyTorch's order.

    The loss sums the squared error over the k outputs and averages over the n examples (so it
    is k times ``F.mse_loss(..., reduction="mean")``). It is quadratic, and its Hessian is
    constant and independent of the targets: H = I_k (x) (2/n) X~^T X~ in the (j, a) order.
    """
    X1 = _with_bias_column(X)
    n, d1 = X1.shape
    H_output_major = torch.kron(torch.eye(num_outputs, dtype=torch.float64), 2.0 * X1.T @ X1 / n)
    order = _output_major_to_torch_order(num_outputs, d1 - 1)
    return H_output_major[order][:, order]


def _softmax_probabilities(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    logits = X.detach().to(torch.float64) @ W.detach().to(torch.float64).T + b.detach().to(torch.float64)
    return torch.softmax(logits, dim=1)


def linear_cross_entropy_hessian(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Return the Hessian of the mean softmax cross-entropy of a linear model in PyTorch's order.

    With p_i = softmax(W x_i + b), the Hessian of (1/n) sum_i CE(W x_i + b, y_i) is
    H = (1/n) sum_i (diag(p_i) - p_i p_i^T) (x) x~_i x~_i^T in the (j, a) order: the logits are
    linear in the parameters, and the Hessian of CE in the logits is diag(p) - p p^T whatever
    the label, so H does not depend on the targets.
    """
    P = _softmax_probabilities(W, b, X)
    X1 = _with_bias_column(X)
    n, d1 = X1.shape
    k = P.shape[1]
    H_output_major = torch.zeros(k * d1, k * d1, dtype=torch.float64)
    for p_i, x_i in zip(P, X1):
        H_output_major += torch.kron(torch.diag(p_i) - torch.outer(p_i, p_i), torch.outer(x_i, x_i))
    H_output_major /= n
    order = _output_major_to_torch_order(k, d1 - 1)
    return H_output_major[order][:, order]


def linear_cross_entropy_trace(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> float:
    """Return Tr H = (1/n) sum_i (sum_j p_ij (1 - p_ij)) ||x~_i||^2 for the linear softmax model.

    It follows from Tr(A (x) B) = Tr(A) Tr(B) applied to each term of
    :func:`linear_cross_entropy_hessian`, with Tr(diag(p) - p p^T) = sum_j p_j (1 - p_j).
    """
    P = _softmax_probabilities(W, b, X)
    X1 = _with_bias_column(X)
    per_example = (P * (1.0 - P)).sum(dim=1) * (X1 * X1).sum(dim=1)
    return float(per_example.mean())


def polynomial_value(coefficients: Mapping[tuple[int, ...], float], w: torch.Tensor) -> torch.Tensor:
    """Evaluate p(w) = sum_alpha c_alpha prod_i w_i^alpha_i, differentiably in ``w``.

    ``coefficients`` maps exponent tuples alpha (one non-negative integer per coordinate of
    ``w``) to coefficients c_alpha.
    """
    total = torch.zeros((), dtype=w.dtype)
    for alpha, c in coefficients.items():
        if len(alpha) != w.numel():
            raise ValueError(
                f"exponent tuple {alpha} has {len(alpha)} entries but w has {w.numel()} coordinates; "
                "give one exponent per coordinate"
            )
        term = torch.ones((), dtype=w.dtype)
        for w_i, a_i in zip(w, alpha):
            term = term * w_i**a_i
        total = total + c * term
    return total


def _gaussian_moment(order: int, sigma: mpmath.mpf) -> mpmath.mpf:
    """E[e^order] for e ~ N(0, sigma^2): sigma^order (order - 1)!! for even order, 0 for odd."""
    if order % 2:
        return mpmath.mpf(0)
    return sigma**order * mpmath.fac2(order - 1) if order else mpmath.mpf(1)


def gaussian_expectation_of_polynomial(
    coefficients: Mapping[tuple[int, ...], float],
    mean: torch.Tensor,
    sigma: float,
    *,
    dps: int = 50,
) -> float:
    """Return E_{e ~ N(0, sigma^2 I)} p(mean + e) exactly, evaluated with ``dps`` decimal digits.

    Each monomial factorizes over independent coordinates, and by the binomial theorem
    E[(m + e)^a] = sum_{j=0}^{a} C(a, j) m^(a - j) E[e^j] with the Gaussian moments
    E[e^j] = sigma^j (j - 1)!! for even j and 0 for odd j. For a polynomial of degree at most 3
    this gives E p(m + e) = p(m) + (sigma^2 / 2) Tr H_p(m) with no remainder.
    """
    if sigma < 0:
        raise ValueError(f"sigma={sigma} is negative; pass the standard deviation, sigma >= 0")
    with mpmath.workdps(dps):
        s = mpmath.mpf(sigma)
        m = [mpmath.mpf(float(x)) for x in mean.reshape(-1)]
        total = mpmath.mpf(0)
        for alpha, c in coefficients.items():
            if len(alpha) != len(m):
                raise ValueError(
                    f"exponent tuple {alpha} has {len(alpha)} entries but mean has {len(m)} "
                    "coordinates; give one exponent per coordinate"
                )
            term = mpmath.mpf(c)
            for m_i, a_i in zip(m, alpha):
                term *= mpmath.fsum(
                    mpmath.binomial(a_i, j) * m_i ** (a_i - j) * _gaussian_moment(j, s)
                    for j in range(a_i + 1)
                )
            total += term
        return float(total)


def kl_bernoulli_high_precision(q: float, p: float, *, dps: int = 60) -> float:
    """Return kl(q || p) = q ln(q/p) + (1-q) ln((1-q)/(1-p)) in nats, computed with ``dps`` digits.

    Uses 0 ln 0 = 0; returns +inf when p is 0 or 1 and q differs from it.
    """
    for name, value in (("q", q), ("p", p)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} is outside [0, 1]; pass a probability")
    with mpmath.workdps(dps):
        q_, p_ = mpmath.mpf(q), mpmath.mpf(p)
        total = mpmath.mpf(0)
        for a, b in ((q_, p_), (1 - q_, 1 - p_)):
            if a == 0:
                continue
            if b == 0:
                return float("inf")
            total += a * mpmath.log(a / b)
        return float(total)


def kl_inv_upper_high_precision(q: float, c: float, *, dps: int = 60) -> float:
    """Return sup {p in [q, 1] : kl(q || p) <= c}, rounded up to the next float64.

    kl(q || p) increases in p on [q, 1], so bisection on that interval converges to the
    boundary p*; it runs with ``dps`` digits until the bracket is narrower than 2^-110 of its
    upper end, far below one float64 ulp. The result is the smallest float64 at or above the
    bracket's upper end, so it is never below p* and at most one ulp above it. c = 0 gives q.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q={q} is outside [0, 1]; pass an empirical risk in [0, 1]")
    if c < 0:
        raise ValueError(f"c={c} is negative; the kl budget must be >= 0")
    if c == 0:
        return q
    with mpmath.workdps(dps):
        q_, c_ = mpmath.mpf(q), mpmath.mpf(c)

        def kl(p: mpmath.mpf) -> mpmath.mpf:
            total = mpmath.mpf(0)
            for a, b in ((q_, p), (1 - q_, 1 - p)):
                if a == 0:
                    continue
                if b == 0:
                    return mpmath.inf
                total += a * mpmath.log(a / b)
            return total

        if kl(mpmath.mpf(1)) <= c_:
            return 1.0
        # Bisection keeps kl(low) <= c < kl(high).
        low, high = q_, mpmath.mpf(1)
        while high - low > high * mpmath.mpf(2) ** -110:
            middle = (low + high) / 2
            if kl(middle) <= c_:
                low = middle
            else:
                high = middle
        rounded = float(high)
        if mpmath.mpf(rounded) < high:
            rounded = math.nextafter(rounded, 2.0)
        return min(1.0, rounded)


def kl_gaussians_isotropic(
    mean_q: torch.Tensor, sigma_q: float, mean_p: torch.Tensor, sigma_p: float, *, dps: int = 50
) -> float:
    """Return KL(N(mean_q, sigma_q^2 I) || N(mean_p, sigma_p^2 I)) in nats with ``dps`` digits.

    KL = (1/2) [k sigma_q^2 / sigma_p^2 + ||mean_q - mean_p||^2 / sigma_p^2 - k
    + 2 k ln(sigma_p / sigma_q)] for k = dim.
    """
    if sigma_q <= 0 or sigma_p <= 0:
        raise ValueError(
            f"sigma_q={sigma_q} and sigma_p={sigma_p} must both be > 0; pass standard deviations"
        )
    with mpmath.workdps(dps):
        difference = [
            mpmath.mpf(float(a)) - mpmath.mpf(float(b))
            for a, b in zip(mean_q.reshape(-1), mean_p.reshape(-1))
        ]
        k = len(difference)
        s_q, s_p = mpmath.mpf(sigma_q), mpmath.mpf(sigma_p)
        squared_distance = mpmath.fsum(x * x for x in difference)
        kl = (
            k * s_q**2 / s_p**2 + squared_distance / s_p**2 - k + 2 * k * mpmath.log(s_p / s_q)
        ) / 2
        return float(kl)
