"""Checks of crsam's curvature estimators and CR-SAM update against exact float64 computations.

:func:`run_checks` compares, on the built-in small networks or on a user's model and data:

- the gradient and Hessian-vector products of :class:`~crsam.curvature.EmpiricalLoss` with
  ``torch.func`` derivatives from :mod:`crsam.verify`;
- finite-difference against autograd products along the same probe;
- Hutchinson's trace and the Lanczos top eigenvalue against the exact Hessian;
- the CR-SAM gradient combination of :class:`crsam.optim.CRSAM` against its Taylor target.

Networks with more than ``max_block_parameters`` parameters are checked on a block: the last
parameters in ``named_parameters`` order (the output layer), with the rest held fixed, so that
the exact Hessian stays small. Everything runs in float64 on a copy of the model in eval mode.

On networks with kinks (ReLU, max-pooling), a finite difference whose two points lie on
different sides of a kink measures no derivative. Such a check is reported with
``passed=None`` and the reason, never as a failure.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crsam.curvature import EmpiricalLoss, hutchinson_trace, top_eigenvalues
from crsam.verify import (
    directional_derivative,
    exact_gradient,
    exact_hessian,
    exact_third_contraction,
    flatten_parameters,
    loss_of_flat,
    random_classification_data,
    smooth_cnn1d,
    smooth_mlp,
)

__all__ = ["run_checks"]

# Relative agreement of two exact float64 computations: round-off of sums of at most ~10^5
# terms of relative error 1.1e-16 is ~1e-11 in the worst case, so 1e-9 leaves a margin of 100.
EXACT_RTOL = 1e-9

# Normal quantile of the Hutchinson check: a correct estimator fails with probability 2e-9
# under the normal approximation (the probe seed is fixed, so the check is deterministic).
Z = 6.0

# Modules whose output has kinks in their input, and how to read the side of each kink.
_THRESHOLD_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.Hardtanh, nn.Threshold)
_POOL_MODULES = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}


def _per_example_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _check(name: str, error: float | None, tolerance: float | None, reason: str, passed: bool | None = None) -> dict:
    """Build one row of the report, with ``passed`` set to error <= tolerance unless given."""
    if passed is None and error is not None and tolerance is not None:
        passed = bool(error <= tolerance)
    finite = lambda x: x if x is None or math.isfinite(x) else None  # noqa: E731
    return {"name": name, "error": finite(error), "tolerance": finite(tolerance), "passed": passed, "reason": reason}


def _kink_sides(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run the model and record, for every kinked module, which side of each kink its input is on."""
    sides: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0].detach()
        if isinstance(module, (nn.ReLU, nn.LeakyReLU, nn.PReLU)):
            sides.append(x > 0)
        elif isinstance(module, (nn.ReLU6, nn.Hardtanh)):
            low, high = (0.0, 6.0) if isinstance(module, nn.ReLU6) else (module.min_val, module.max_val)
            sides.append(torch.stack([x > low, x < high]))
        elif isinstance(module, nn.Threshold):
            sides.append(x > module.threshold)
        else:
            pool = _POOL_MODULES[type(module)]
            _, indices = pool(
                x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, return_indices=True
            )
            sides.append(indices)

    kinked = [m for m in model.modules() if isinstance(m, _THRESHOLD_MODULES) or type(m) in _POOL_MODULES]
    handles = [m.register_forward_hook(record) for m in kinked]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sides


def _straddled_kinks(model: nn.Module, inputs: torch.Tensor, names: list[str], points: list[torch.Tensor]) -> int:
    """Count the kink sides that differ between the parameter vectors ``points`` (0: all agree)."""
    patterns = []
    original = flatten_parameters(model).clone()
    try:
        for w in points:
            _assign(model, names, w)
            patterns.append(_kink_sides(model, inputs))
    finally:
        _assign(model, names, original)
    changed = 0
    for sides in zip(*patterns):
        for other in sides[1:]:
            changed += int((other != sides[0]).sum())
    return changed


def _assign(model: nn.Module, names: list[str], w: torch.Tensor) -> None:
    """Copy the flat vector w into the model's trainable parameters (in ``names`` order)."""
    parameters = dict(model.named_parameters())
    offset = 0
    with torch.no_grad():
        for name in names:
            p = parameters[name]
            p.copy_(w[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def _restrict_to_block(model: nn.Module, max_block_parameters: int) -> list[str]:
    """Freeze all but the last parameters (at most ``max_block_parameters``, at least one tensor)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    block: list[str] = []
    total = 0
    for name, p in reversed(named):
        if block and total + p.numel() > max_block_parameters:
            break
        block.insert(0, name)
        total += p.numel()
    for name, p in named:
        p.requires_grad_(name in block)
    return block


def _check_network(label: str, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, max_block_parameters: int, rho: float, seed: int) -> list[dict]:
    """Run all checks on one network, using a float64 copy in eval mode."""
    model = copy.deepcopy(model).to(torch.float64).eval()
    inputs = inputs.to(torch.float64) if inputs.is_floating_point() else inputs
    block = _restrict_to_block(model, max_block_parameters)
    scope = "all parameters" if all(p.requires_grad for p in model.parameters()) else f"block {', '.join(block)}"
    checks: list[dict] = []

    # Oracle: exact float64 derivatives of the same mean cross-entropy.
    loss = EmpiricalLoss(model, inputs, targets, batch_size=max(1, inputs.shape[0] // 3))
    oracle = loss_of_flat(model, _per_example_cross_entropy, inputs, targets)
    w = flatten_parameters(model)
    g = exact_gradient(oracle, w)
    H = exact_hessian(oracle, w)
    g_norm = float(g.norm())
    H_norm = float(torch.linalg.matrix_norm(H, ord=2))
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(w.numel(), generator=generator, dtype=torch.float64)
    v /= v.norm()

    # Gradient and Hessian-vector product of the estimator code against the oracle.
    error = float((loss.gradient() - g).norm()) / max(g_norm, 1e-300)
    checks.append(_check(f"{label}: gradient ({scope})", error, EXACT_RTOL, "relative error; float64 round-off only"))
    Hv = H @ v
    error = float((loss.hvp(v) - Hv).norm()) / max(float(Hv.norm()), H_norm * 1e-12, 1e-300)
    checks.append(_check(f"{label}: Hessian-vector product", error, EXACT_RTOL, "relative error; float64 round-off only"))

    # Finite-difference against autograd product along the same unit probe.
    fd_name = f"{label}: finite-difference product"
    step = 6e-6 * max(1.0, float(w.norm()) / math.sqrt(w.numel()))
    kinks = _straddled_kinks(model, inputs, loss.parameter_names, [w - step * v, w, w + step * v])
    if kinks:
        checks.append(_check(fd_name, None, None, f"not applicable: {kinks} kink sides (ReLU or max-pooling) change within the finite-difference step", passed=None))
    else:
        error = float((loss.hvp_finite_difference(v, step=step) - loss.hvp(v)).norm()) / (float(Hv.norm()) + g_norm + 1e-300)
        checks.append(_check(fd_name, error, 1e-6, "relative to ||Hv|| + ||g||; central differences with h ~ eps^(1/3) err by ~eps^(2/3) = 4e-11 times derivative ratios, margin 10^4"))

    # Hutchinson trace against the exact trace, within Z standard deviations of the formula.
    num_probes = 100
    trace = float(torch.trace(H))
    variance = 2.0 * float((H * H).sum() - (torch.diagonal(H) ** 2).sum())
    estimate = hutchinson_trace(loss, probes=num_probes, seed=seed)
    tolerance = Z * math.sqrt(variance / num_probes) + EXACT_RTOL * abs(trace)
    checks.append(_check(f"{label}: Hutchinson trace", abs(estimate.estimate - trace), tolerance, f"absolute error; {Z:g} standard deviations of {num_probes} Rademacher probes, 2 (||H||_F^2 - sum H_ii^2) / m"))

    # Top eigenvalue by Lanczos against the dense symmetric eigensolver.
    top = float(torch.linalg.eigvalsh(H)[-1])
    eigen = top_eigenvalues(loss, 1, tol=1e-10, max_restarts=300, seed=seed)
    error = abs(eigen.eigenvalues[0] - top) if eigen.eigenvalues else math.inf
    checks.append(_check(f"{label}: top eigenvalue", error, 1e-6 * (1.0 + H_norm), "absolute error; ARPACK at tol 1e-10 (relative), margin 10^4"))

    checks.append(_check_cr_sam_combination(label, model, inputs, targets, oracle, loss.parameter_names, w, g, H, rho))
    return checks


def _check_cr_sam_combination(label, model, inputs, targets, oracle, names, w, g, H, rho) -> dict:
    """Compare one CR-SAM step with SGD(lr=1) with d = g+ + alpha grad(eps^T H eps) + 2 beta H eps."""
    from crsam.optim import CRSAM

    name = f"{label}: CR-SAM gradient combination"
    g_norm = float(g.norm())
    if g_norm == 0:
        return _check(name, None, None, "not applicable: the gradient is 0, so there is no ascent direction", passed=None)
    u = g / g_norm
    eps = rho * u
    kinks = _straddled_kinks(model, inputs, names, [w - eps, w, w + eps])
    if kinks:
        return _check(name, None, None, f"not applicable: {kinks} kink sides (ReLU or max-pooling) change between w - eps and w + eps", passed=None)

    # One optimizer step with lr = 1 and no momentum moves w by exactly -d.
    alpha, beta = 1.0, 1.0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = CRSAM(params, torch.optim.SGD, rho=rho, alpha=alpha, beta=beta, lr=1.0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(model(inputs), targets)
        value.backward()
        return value

    try:
        optimizer.step(closure)
        d = w - flatten_parameters(model)
    finally:
        _assign(model, names, w)

    # Target and its Taylor remainder: alpha rho^4 ||grad D^4 L[u^4]|| / 12 + beta rho^3 ||grad D^3 L[u^3]|| / 3.
    target = exact_gradient(oracle, w + eps) + alpha * exact_third_contraction(oracle, w, eps) + 2 * beta * (H @ eps)
    c4 = float(torch.func.grad(lambda x: directional_derivative(oracle, x, u, 4))(w).norm()) / 12
    c3 = float(torch.func.grad(lambda x: directional_derivative(oracle, x, u, 3))(w).norm()) / 3
    remainder = alpha * c4 * rho**4 + beta * c3 * rho**3
    tolerance = 2.0 * remainder + 1e-12 * (1.0 + g_norm)
    return _check(name, float((d - target).norm()), tolerance, f"absolute error; twice the leading Taylor remainder at rho={rho:g} (alpha=beta=1) plus round-off")


def run_checks(
    model: nn.Module | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    max_examples: int = 128,
    max_block_parameters: int = 1500,
    rho: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare crsam's estimators with exact computations and return the ``crsam verify`` report.

    Args:
        model: a classifier to check, with ``data = (inputs, targets)``, of which the first
            ``max_examples`` are used. With ``None``, the built-in small networks are checked
            on random data instead: a tanh MLP, a GELU 1-D CNN and a ReLU MLP.
        max_block_parameters: size of the parameter block whose exact Hessian is formed.
        rho: perturbation radius of the CR-SAM check.

    Returns:
        ``{"checks": [...], "passed": bool}``. Each check has ``name``, ``error``,
        ``tolerance``, ``passed`` (True, False, or None when it does not apply) and ``reason``.
        The overall ``passed`` is False when any check failed.

    NOTE: kinks are found through forward hooks on ReLU-type and max-pooling modules; a kink
    written as a function call inside ``forward`` (``torch.relu(x)``) is not seen.
    """
    if model is not None and data is None:
        raise ValueError("data is missing; pass data=(inputs, targets) with the model, or neither for the built-in networks")
    if not rho > 0:
        raise ValueError(f"rho={rho!r} is invalid; pass a perturbation radius > 0, e.g. 0.01")

    if model is None:
        inputs, targets = random_classification_data(48, 12, 3, seed=seed)
        networks = [
            ("tanh MLP", smooth_mlp([12, 10, 10, 3], "tanh", seed=seed), inputs, targets),
            ("GELU CNN", smooth_cnn1d(12, 4, 3, "gelu", seed=seed), inputs, targets),
            ("ReLU MLP", _relu_mlp(seed), inputs, targets),
        ]
    else:
        inputs, targets = data
        networks = [("model", model, inputs[:max_examples], targets[:max_examples])]

    checks: list[dict] = []
    for label, network, x, y in networks:
        checks += _check_network(label, network, x, y, max_block_parameters=max_block_parameters, rho=rho, seed=seed)
    return {"checks": checks, "passed": not any(check["passed"] is False for check in checks)}


def _relu_mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).double()
