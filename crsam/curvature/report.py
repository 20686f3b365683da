"""Curvature figures of a trained network: trace, gradient norm, normalized trace, top eigenvalue.

The normalized trace C(w) = Tr H(w) / ||grad L(w)|| compares the second-order term of the
Taylor expansion of L along the ascent direction with the first-order one; the curvature along
the gradient direction ghat^T H ghat, ghat = grad L / ||grad L||, is the quantity that the
CR-SAM update penalizes to leading order.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from crsam.curvature.eigen import top_eigenvalues
from crsam.curvature.functional import EmpiricalLoss, FiniteDifferenceHessian, LossSpec
from crsam.curvature.trace import TraceEstimate, exact_trace, hutchinson_trace, hutchpp_trace, xtrace_trace

__all__ = [
    "METHODS",
    "curvature_report",
    "format_curvature_table",
    "gradient_direction_curvature",
    "normalized_trace",
]

METHODS = ("hutchinson", "hutch++", "xtrace", "finite-difference", "exact")

# Default products of XTrace, and the probe limit of the adaptive estimators.
_DEFAULT_BUDGET = 100
_DEFAULT_MAX_PROBES = 500


def normalized_trace(trace: float, grad_norm: float) -> float | None:
    """Return Tr H / ||grad L||, or None when the gradient norm is 0 (the ratio is undefined)."""
    if grad_norm == 0:
        return None
    return trace / grad_norm


def gradient_direction_curvature(loss: EmpiricalLoss, gradient: torch.Tensor | None = None) -> float | None:
    """Return ghat^T H ghat with ghat = grad L / ||grad L||, or None when the gradient is 0.

    This is the second directional derivative of L along the SAM ascent direction: for
    eps = rho ghat, L(w + eps) + L(w - eps) - 2 L(w) = rho^2 ghat^T H ghat + O(rho^4).
    """
    g = loss.gradient() if gradient is None else gradient
    g_norm = torch.linalg.vector_norm(g)
    if g_norm == 0:
        return None
    g_hat = g / g_norm
    return float(g_hat.to(torch.float64) @ loss.hvp(g_hat).to(torch.float64))


def _finite_or_none(x: float | None) -> float | None:
    """Map NaN and infinities to None, which JSON encodes as null."""
    if x is None or not math.isfinite(x):
        return None
    return x


def _estimate_trace(
    loss: EmpiricalLoss,
    method: str,
    probes: int | None,
    max_probes: int,
    rel_tol: float,
    seed: int,
    max_exact_parameters: int,
) -> TraceEstimate:
    """Dispatch to the trace estimator that ``method`` names."""
    if method == "hutchinson":
        return hutchinson_trace(loss, probes=probes, max_probes=max_probes, rel_tol=rel_tol, seed=seed)
    if method == "finite-difference":
        return hutchinson_trace(
            FiniteDifferenceHessian(loss), probes=probes, max_probes=max_probes, rel_tol=rel_tol, seed=seed
        )
    if method == "hutch++":
        return hutchpp_trace(loss, probes=probes, max_probes=max_probes, rel_tol=rel_tol, seed=seed)
    if method == "xtrace":
        return xtrace_trace(loss, probes=probes or _DEFAULT_BUDGET, seed=seed)
    if loss.num_parameters > max_exact_parameters:
        raise ValueError(
            f"method='exact' needs one Hessian-vector product per parameter, and the model has "
            f"{loss.num_parameters} > max_exact_parameters={max_exact_parameters}; use "
            "method='hutchinson' or raise max_exact_parameters"
        )
    return exact_trace(loss)


def curvature_report(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    method: str = "hutch++",
    probes: int | None = None,
    batch_size: int | None = 512,
    seed: int = 0,
    mode: str = "eval",
    rel_tol: float = 0.01,
    max_probes: int = _DEFAULT_MAX_PROBES,
    split: str | None = None,
    loss: LossSpec = "cross_entropy",
    eigen_tol: float = 1e-4,
    max_exact_parameters: int = 50_000,
) -> dict[str, Any]:
    """Measure the curvature of the mean loss over (inputs, targets) at the model's weights.

    The loss is the mean over all N examples (by default cross-entropy, no weight decay),
    evaluated in batches of ``batch_size`` that are summed and divided by N.

    Args:
        method: trace estimator, one of ``METHODS``. ``"hutchinson"`` uses exact
            Hessian-vector products and Rademacher probes, and stops at ``rel_tol`` relative
            standard error between 10 and ``max_probes`` probes. ``"finite-difference"`` is the
            same with central-difference products. ``"hutch++"`` deflates a 20-dimensional
            sketch of the top of the spectrum first and then applies the same stopping rule
            to the rest, which needs fewer products when a few eigenvalues dominate.
            ``"xtrace"`` spends a fixed budget of ``probes`` products (default 100).
            Hutch++ is the default because it reached 1% relative standard error on the
            MNIST-1D CNN in about a tenth of Hutchinson's products (benchmarks/bench_trace.py).
            ``"exact"`` spends one product per parameter.
        probes: a fixed probe count for Hutchinson and finite differences (no stopping rule),
            or the product budget of Hutch++ and XTrace.
        split: the name of the data split, passed through to the report.
        mode: ``"eval"`` or ``"train"`` (see :class:`EmpiricalLoss`).

    Returns:
        A dict with ``trace`` (``estimate``, ``stderr``, ``probes``), ``grad_norm``,
        ``normalized_trace`` (None when ``grad_norm`` is 0) with its ``normalized_trace_stderr``,
        ``top_eigenvalue`` with ``top_eigenvalue_info`` (residual, convergence, products),
        ``gradient_direction_curvature``, ``loss_value``, ``split``, ``method``, ``loss``
        (a description), ``mode``, ``n_examples``, ``num_parameters`` and ``seconds``. Every
        number is finite or None.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid; use one of {', '.join(METHODS)}")
    if not rel_tol > 0:
        raise ValueError(f"rel_tol={rel_tol!r} is invalid; pass a relative standard error > 0, e.g. 0.01")
    empirical_loss = EmpiricalLoss(
        model, inputs, targets, loss=loss, batch_size=batch_size, mode=mode, seed=seed
    )
    seconds: dict[str, float] = {}

    # Loss value and gradient.
    start = time.perf_counter()
    loss_value, gradient = empirical_loss.value_and_gradient()
    grad_norm = float(torch.linalg.vector_norm(gradient.to(torch.float64)))
    direction_curvature = gradient_direction_curvature(empirical_loss, gradient)
    seconds["gradient"] = time.perf_counter() - start

    # Trace with its standard error.
    start = time.perf_counter()
    trace = _estimate_trace(empirical_loss, method, probes, max_probes, rel_tol, seed, max_exact_parameters)
    seconds["trace"] = time.perf_counter() - start

    # Largest eigenvalue by Lanczos.
    start = time.perf_counter()
    eigen = top_eigenvalues(empirical_loss, 1, tol=eigen_tol, seed=seed)
    seconds["top_eigenvalue"] = time.perf_counter() - start

    ratio = normalized_trace(trace.estimate, grad_norm)
    ratio_stderr = None if ratio is None or trace.stderr is None else trace.stderr / grad_norm
    return {
        "trace": {
            "estimate": _finite_or_none(trace.estimate),
            "stderr": _finite_or_none(trace.stderr),
            "probes": trace.probes,
        },
        "trace_converged": trace.converged,
        # The stopping rule of the adaptive estimators; None when a fixed --probes was given.
        "trace_stopping_rule": None if probes is not None or method in ("exact", "xtrace") else {
            "rel_tol": rel_tol, "max_probes": max_probes,
        },
        "grad_norm": _finite_or_none(grad_norm),
        "normalized_trace": _finite_or_none(ratio),
        "normalized_trace_stderr": _finite_or_none(ratio_stderr),
        "top_eigenvalue": _finite_or_none(eigen.eigenvalues[0]) if eigen.eigenvalues else None,
        "top_eigenvalue_info": {
            "residual": _finite_or_none(eigen.residuals[0]) if eigen.residuals else None,
            "converged": eigen.converged,
            "matvecs": eigen.matvecs,
            "method": eigen.method,
        },
        "gradient_direction_curvature": _finite_or_none(direction_curvature),
        "loss_value": _finite_or_none(loss_value),
        "split": split,
        "method": method,
        "estimator": trace.method,
        "loss": empirical_loss.describe(),
        "mode": mode,
        "n_examples": int(inputs.shape[0]),
        "num_parameters": empirical_loss.num_parameters,
        "batch_size": batch_size,
        "seed": seed,
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
    }


def _format_number(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def _describe_probes(report: dict[str, Any]) -> str:
    """Return the probe count, saying so when the adaptive rule stopped at its cap."""
    text = _format_number(report["trace"].get("probes"))
    rule = report.get("trace_stopping_rule")
    if rule is not None and not report.get("trace_converged", True):
        text += (
            f" (stopped at the cap of {rule['max_probes']} probes before the standard error reached "
            f"{100 * rule['rel_tol']:g} % of the estimate)"
        )
    return text


def format_curvature_table(report: dict[str, Any]) -> str:
    """Render a :func:`curvature_report` as a readable two-column table."""
    trace = report["trace"]
    stderr = trace.get("stderr")
    trace_text = _format_number(trace.get("estimate"))
    if stderr is not None:
        trace_text += f" +- {_format_number(stderr)}"
    ratio_text = _format_number(report.get("normalized_trace"))
    if report.get("normalized_trace_stderr") is not None:
        ratio_text += f" +- {_format_number(report['normalized_trace_stderr'])}"
    eigen = report.get("top_eigenvalue_info") or {}
    eigen_text = _format_number(report.get("top_eigenvalue"))
    if eigen.get("residual") is not None:
        eigen_text += f" (residual {_format_number(eigen['residual'])}"
        eigen_text += ")" if eigen.get("converged") else ", not converged)"

    rows = [
        ("split", report.get("split")),
        ("loss", f"{report.get('loss')} = {_format_number(report.get('loss_value'))}"),
        ("mode", report.get("mode")),
        ("examples", report.get("n_examples")),
        ("parameters", report.get("num_parameters")),
        ("method", report.get("estimator", report.get("method"))),
        ("trace Tr(H)", trace_text),
        ("probes", _describe_probes(report)),
        ("gradient norm", _format_number(report.get("grad_norm"))),
        ("normalized trace", ratio_text),
        ("curvature along gradient", _format_number(report.get("gradient_direction_curvature"))),
        ("top eigenvalue", eigen_text),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {_format_number(value) if not isinstance(value, str) else value}" for name, value in rows)
