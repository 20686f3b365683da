"""Exact float64 derivatives of a network's loss, taken straight from the definitions.

Everything here works on the loss as a function of one flat float64 parameter vector ``w``,
built with ``torch.func.functional_call``, and differentiates it with ``torch.func`` (dense
Hessians, nested derivatives). It is slow on purpose and meant for networks with at most a few
thousand parameters. Nothing here imports crsam's estimators, so that an oracle never reuses the
code it checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, hessian

__all__ = [
    "parameter_names",
    "flatten_parameters",
    "unflatten_parameters",
    "loss_of_flat",
    "exact_gradient",
    "exact_hessian",
    "exact_trace",
    "exact_third_contraction",
    "directional_derivative",
]

LossOfFlat = Callable[[torch.Tensor], torch.Tensor]


def parameter_names(model: nn.Module) -> list[str]:
    """Return the names of the parameters that require gradients, in ``named_parameters`` order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """Return the trainable parameters as one float64 vector, in ``named_parameters`` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])


def unflatten_parameters(model: nn.Module, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a flat vector into named tensors shaped like the model's trainable parameters.

    The inverse of :func:`flatten_parameters`; the pieces are views of ``w`` so that gradients
    with respect to ``w`` flow through them.
    """
    shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    total = sum(s.numel() for s in shapes.values())
    if w.ndim != 1 or w.numel() != total:
        raise ValueError(
            f"w has shape {tuple(w.shape)} but the model has {total} trainable parameters; "
            "pass a flat vector such as flatten_parameters(model)"
        )
    pieces = torch.split(w, [s.numel() for s in shapes.values()])
    return {name: piece.view(shape) for (name, shape), piece in zip(shapes.items(), pieces)}


def loss_of_flat(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    reduction: str = "mean",
) -> LossOfFlat:
    """Build ``w -> L(w)``, the loss of ``model`` on the whole data set at flat parameters ``w``.

    ``loss_fn(outputs, targets)`` must return one loss per example (``reduction="none"`` in
    ``torch.nn.functional`` terms). With ``reduction="mean"`` the result is
    ``L(w) = (1/N) sum_i loss_fn(f(x_i; w), y_i)``; with ``"sum"`` the 1/N is left out. The model
    runs in the mode it is in (call ``model.eval()`` first for BatchNorm and dropout), with its
    buffers and floating inputs cast to float64 so that the whole evaluation is float64.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is invalid; use 'mean' or 'sum'")
    buffers = {
        name: (b.to(torch.float64) if b.is_floating_point() else b)
        for name, b in model.named_buffers()
    }
    x = inputs.to(torch.float64) if inputs.is_floating_point() else inputs
    y = targets.to(torch.float64) if targets.is_floating_point() else targets
    n = x.shape[0]

    def loss(w: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(model, {**unflatten_parameters(model, w), **buffers}, (x,))
        per_example = loss_fn(outputs, y)
        if per_example.shape != (n,):
            raise ValueError(
                f"loss_fn returned shape {tuple(per_example.shape)} for {n} examples; "
                "it must return one loss per example, e.g. F.cross_entropy(..., reduction='none')"
            )
        total = per_example.sum()
        return total / n if reduction == "mean" else total

    return loss


def exact_gradient(loss: LossOfFlat, w: torch.Tensor) -> torch.Tensor:
    """Return grad L(w) by reverse-mode automatic differentiation in float64."""
    return grad(loss)(w.to(torch.float64))


def exact_hessian(loss: LossOfFlat, w: torch.Tensor) -> torch.Tensor:
    """Return the dense Hessian H(w)_ij = d^2 L / dw_i dw_j, a (P, P) float64 matrix.

    Computed by ``torch.func.hessian`` (forward-over-reverse Jacobian of the gradient) and
    symmetrized, (H + H^T) / 2, which removes only round-off asymmetry.
    """
    H = hessian(loss)(w.to(torch.float64))
    return (H + H.T) / 2


def exact_trace(loss: LossOfFlat, w: torch.Tensor) -> float:
    """Return Tr H(w) = sum_i d^2 L / dw_i^2 from the dense Hessian."""
    return float(torch.diagonal(exact_hessian(loss, w)).sum())


def exact_third_contraction(loss: LossOfFlat, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Return grad_w (v^T H(w) v) for a fixed vector v: the third derivative contracted twice.

    Component k is sum_ij (d^3 L / dw_i dw_j dw_k) v_i v_j. This is the gradient that the
    curvature term of the CR-SAM update, g+ + g- - 2 g0 with g+- = grad L(w +- v), approximates
    to O(||v||^4). Computed by differentiating the dense Hessian, so it costs P times a Hessian.
    """
    v = v.to(torch.float64)

    def curvature_along_v(u: torch.Tensor) -> torch.Tensor:
        return v @ hessian(loss)(u) @ v

    return grad(curvature_along_v)(w.to(torch.float64))


def directional_derivative(loss: LossOfFlat, w: torch.Tensor, u: torch.Tensor, order: int) -> torch.Tensor:
    """Return D^k L(w)[u, ..., u] = d^k/dt^k L(w + t u) at t = 0, for k = ``order``.

    Differentiates the scalar function t -> L(w + t u) ``order`` times by reverse mode (on these
    small networks faster than nesting ``torch.func.jvp``). The result is a differentiable
    function of ``w``, so ``torch.func.grad`` of it gives the contraction
    D^(k+1) L(w)[u, ..., u, .] that the Taylor remainders of the CR-SAM terms need.
    """
    if order < 0:
        raise ValueError(f"order={order} is negative; pass the derivative order k >= 0")
    u = u.to(w.dtype)

    def along_u(t: torch.Tensor) -> torch.Tensor:
        return loss(w + t * u)

    derivative = along_u
    for _ in range(order):
        derivative = grad(derivative)
    return derivative(torch.zeros((), dtype=w.dtype))
