"""Trace estimators for symmetric matrices available through matrix-vector products.

Every estimator returns a :class:`TraceEstimate` with its standard error, so that a figure is
never reported without its uncertainty.

References:
    Hutchinson, M. F. (1990). A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines. Communications in Statistics - Simulation and Computation.
    Meyer, R. A., Musco, C., Musco, C., Woodruff, D. P. (2021). Hutch++: Optimal stochastic trace
    estimation. Symposium on Simplicity in Algorithms (SOSA).
    Epperly, E. N., Tropp, J. A., Webber, R. J. (2024). XTrace: Making the most of every sample in
    stochastic trace estimation. SIAM Journal on Matrix Analysis and Applications.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from crsam.curvature.operators import Operator, as_operator, random_probes

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace", "xtrace_trace", "exact_trace"]


@dataclass
class TraceEstimate:
    """A trace estimate with its standard error.

    Attributes:
        estimate: the estimate of Tr A.
        stderr: its standard error (0 for the exact trace; None when fewer than two samples
            give no variance estimate).
        probes: the number of matrix-vector products spent.
        method: the estimator's name.
        converged: whether the requested relative standard error was reached (always True for
            fixed-budget estimators).
        samples: the individual samples whose mean is the estimate (Hutchinson's v^T A v).
    """

    estimate: float
    stderr: float | None
    probes: int
    method: str
    converged: bool = True
    samples: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Return ``{"estimate", "stderr", "probes"}``, the trace object of the JSON report."""
        return {"estimate": self.estimate, "stderr": self.stderr, "probes": self.probes}


def _standard_error(samples: torch.Tensor) -> float | None:
    """Return the sample standard deviation over sqrt(m), or None for m < 2."""
    m = samples.numel()
    if m < 2:
        return None
    return float(samples.std(correction=1) / math.sqrt(m))


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; pass an integer >= {minimum}")
    return value


def _check_stopping_rule(min_probes: int, max_probes: int, rel_tol: float, block_size: int) -> None:
    _check_count("min_probes", min_probes, 1)
    _check_count("max_probes", max_probes, 1)
    _check_count("block_size", block_size, 1)
    if min_probes > max_probes:
        raise ValueError(f"min_probes={min_probes} exceeds max_probes={max_probes}; raise max_probes")
    if not rel_tol > 0:
        raise ValueError(f"rel_tol={rel_tol!r} is invalid; pass a relative standard error > 0, e.g. 0.01")


def _matmat_in_blocks(A: Operator, V: torch.Tensor, block_size: int) -> torch.Tensor:
    """Return the rows A V[k], computed ``block_size`` rows at a time to bound peak memory."""
    return torch.cat([A.matmat(V[start : start + block_size]) for start in range(0, V.shape[0], block_size)])


def _sample_until_precise(
    draw_samples: Callable[[int], torch.Tensor],
    offset: float,
    *,
    min_probes: int,
    max_probes: int,
    rel_tol: float,
    block_size: int,
) -> tuple[torch.Tensor, bool]:
    """Draw blocks of i.i.d. samples until their mean is precise enough, or ``max_probes`` are drawn.

    ``draw_samples(k)`` returns k new samples. After each block, once ``min_probes`` (and at least
    two) samples are in, sampling stops when stderr <= rel_tol * |offset + mean|, where stderr is
    the sample standard deviation over sqrt(m). Returns the samples and whether the rule held.
    """
    samples = torch.empty(0, dtype=torch.float64)
    while samples.numel() < max_probes:
        k = min(block_size, max_probes - samples.numel())
        samples = torch.cat([samples, draw_samples(k).to(torch.float64).cpu()])
        if samples.numel() >= max(min_probes, 2):
            if _standard_error(samples) <= rel_tol * abs(offset + float(samples.mean())):
                return samples, True
    return samples, False


def hutchinson_trace(
    operator: Any,
    *,
    dim: int | None = None,
    distribution: str = "rademacher",
    probes: int | None = None,
    min_probes: int = 10,
    max_probes: int = 1000,
    rel_tol: float = 0.01,
    block_size: int = 8,
    seed: int = 0,
) -> TraceEstimate:
    """Estimate Tr A by Hutchinson's estimator, stopping at a relative standard error.

    For probes v with E[v v^T] = I, E[v^T A v] = Tr(A E[v v^T]) = Tr A, so the mean of m
    independent samples v_k^T A v_k is unbiased, with variance Var(v^T A v) / m:

    - Rademacher probes: Var(v^T A v) = 2 (||A||_F^2 - sum_i A_ii^2), exact on diagonal A;
    - Gaussian probes: Var(v^T A v) = 2 ||A||_F^2.

    The standard error is the sample standard deviation over sqrt(m). Probes are drawn in
    blocks of ``block_size`` (one batched product per data batch). After each block, once
    ``min_probes`` samples are in, the estimator stops when stderr <= rel_tol * |estimate|,
    and in any case at ``max_probes``. ``probes=m`` fixes the count instead (m = min = max).

    Args:
        operator: a square tensor, an :class:`~crsam.curvature.functional.EmpiricalLoss`, or a
            callable on (K, d) rows with ``dim``.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        seed: seed of the probe generator (a ``torch.Generator`` on the CPU).

    Returns:
        A :class:`TraceEstimate`; ``converged`` is False when ``max_probes`` stopped it first.

    Example:
        >>> import torch
        >>> from crsam.curvature import hutchinson_trace
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> hutchinson_trace(A, probes=4).estimate  # exact on diagonal matrices
        6.0
    """
    A = as_operator(operator, dim)
    if probes is not None:
        min_probes = max_probes = _check_count("probes", probes, 1)
    _check_stopping_rule(min_probes, max_probes, rel_tol, block_size)
    generator = torch.Generator().manual_seed(seed)

    def draw_samples(k: int) -> torch.Tensor:
        V = random_probes(k, A.dim, distribution, generator, A.dtype).to(A.device)
        return (V.to(torch.float64) * A.matmat(V).to(torch.float64)).sum(dim=1)

    samples, converged = _sample_until_precise(
        draw_samples, 0.0, min_probes=min_probes, max_probes=max_probes, rel_tol=rel_tol, block_size=block_size
    )
    return TraceEstimate(
        estimate=float(samples.mean()),
        stderr=_standard_error(samples),
        probes=samples.numel(),
        method=f"hutchinson ({distribution})",
        converged=converged or probes is not None,
        samples=samples.tolist(),
    )


def hutchpp_trace(
    operator: Any,
    *,
    dim: int | None = None,
    probes: int | None = None,
    sketch_size: int | None = None,
    distribution: str = "rademacher",
    min_probes: int = 10,
    max_probes: int = 1000,
    rel_tol: float = 0.01,
    block_size: int = 8,
    seed: int = 0,
) -> TraceEstimate:
    """Estimate Tr A by Hutch++: an exact trace on a sketched subspace plus Hutchinson on the rest.

    Draw S (d x k) and take Q, an orthonormal basis of A S (k products). Then

        Tr A = Tr(Q^T A Q) + Tr((I - QQ^T) A (I - QQ^T)),

    where the first term is computed exactly (k more products) and the second by Hutchinson with
    projected probes (I - QQ^T) g, g independent of S. Given Q, the residual samples are i.i.d.
    with mean Tr((I - QQ^T) A (I - QQ^T)), so the estimate is unbiased and the standard error
    of the residual samples is its standard error conditional on Q. The estimate is exact when
    rank A <= k, because then (I - QQ^T) A = 0. When a few large eigenvalues carry most of
    ||A||_F, as for network Hessians, deflating them shrinks Var(g^T (I-QQ^T) A (I-QQ^T) g)
    far below Hutchinson's 2 ||A||_F^2, so fewer products reach the same standard error.

    Two budgets:

    - ``probes=m`` (the fixed budget of Meyer et al.): k = m // 3 (or ``sketch_size``) and
      m - 2k residual probes, m products in all.
    - ``probes=None`` (adaptive): k = ``sketch_size`` (default 20, at most d), then residual
      probes in blocks until stderr <= rel_tol * |estimate|, between ``min_probes`` and
      ``max_probes`` residual probes, as in :func:`hutchinson_trace`.

    The sketch S is Gaussian whatever ``distribution`` is, and ``distribution`` sets only the
    residual probes. A Gaussian sketch spans range(A) with probability 1 when k >= rank A. A
    Rademacher sketch can be orthogonal to a structured range with positive probability, as for
    the Hessian of a two-class softmax layer, whose range is spanned by [1, -1] (x) x~.

    NOTE: S and Q are dense d x k float64 matrices, so memory grows as 8 d k bytes.
    """
    A = as_operator(operator, dim)
    if probes is not None:
        _check_count("probes", probes, 3)
        k = probes // 3 if sketch_size is None else _check_count("sketch_size", sketch_size, 1)
        if probes - 2 * k < 1:
            raise ValueError(
                f"sketch_size={k} leaves no residual probe in a budget of probes={probes}; "
                "pass sketch_size < probes / 2"
            )
        min_probes = max_probes = probes - 2 * k
    else:
        k = 20 if sketch_size is None else _check_count("sketch_size", sketch_size, 1)
    k = min(k, A.dim)
    _check_stopping_rule(min_probes, max_probes, rel_tol, block_size)
    generator = torch.Generator().manual_seed(seed)

    # Sketch the range of A (with Gaussian columns, see above) and compute the trace on it exactly.
    S = random_probes(k, A.dim, "gaussian", generator, A.dtype).to(A.device)
    Q, _ = torch.linalg.qr(_matmat_in_blocks(A, S, block_size).T.to(torch.float64))
    AQ = _matmat_in_blocks(A, Q.T.to(A.dtype), block_size).to(torch.float64)
    trace_on_range = float(torch.sum(Q.T * AQ))

    # Hutchinson on the orthogonal complement of the sketch.
    def draw_samples(num: int) -> torch.Tensor:
        G = random_probes(num, A.dim, distribution, generator, torch.float64).to(A.device)
        G_perp = G - (G @ Q) @ Q.T
        return (G_perp * A.matmat(G_perp.to(A.dtype)).to(torch.float64)).sum(dim=1)

    residual_samples, converged = _sample_until_precise(
        draw_samples,
        trace_on_range,
        min_probes=min_probes,
        max_probes=max_probes,
        rel_tol=rel_tol,
        block_size=block_size,
    )
    return TraceEstimate(
        estimate=trace_on_range + float(residual_samples.mean()),
        stderr=_standard_error(residual_samples),
        probes=2 * k + residual_samples.numel(),
        method=f"hutch++ ({distribution})",
        converged=converged or probes is not None,
        samples=(trace_on_range + residual_samples).tolist(),
    )


def xtrace_trace(
    operator: Any,
    *,
    dim: int | None = None,
    probes: int = 100,
    distribution: str = "gaussian",
    block_size: int = 8,
    seed: int = 0,
) -> TraceEstimate:
    """Estimate Tr A by XTrace, the exchangeable (leave-one-out) form of Hutch++.

    With a budget of m products and s = m // 2 probes w_1..w_s (the columns of Omega), one
    computes Y = A Omega = QR and Z = A Q (2s products). For each i, Q_i is an orthonormal basis
    of the range of Y without column i, and

        t_i = Tr(Q_i^T A Q_i) + w_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i

    is a Hutch++ estimate whose sketch (the other s - 1 probes) is independent of its probe w_i,
    hence unbiased. The estimate is the mean of the t_i, exact when rank A <= s - 1. Because
    range(Q_i) lies in range(Q), Q_i = Q U_i with U_i an orthonormal basis of the columns of R
    other than i, so every t_i follows from H = Q^T A Q, R and W = Q^T Omega in s-dimensional
    algebra, at no extra product:
    Tr(Q_i^T A Q_i) = Tr(U_i^T H U_i), and with c = U_i^T W_i,
    w_i^T (I - P_i) A (I - P_i) w_i = w_i^T y_i - 2 (R_i^T U_i) c + c^T (U_i^T H U_i) c.
    The standard error is the error estimate of Epperly, Tropp and Webber, the standard
    deviation of the t_i over sqrt(s). Because the t_i share probes, it is an estimate, not a
    bound.
    The probes serve as the sketch too, so they are Gaussian by default: Rademacher probes can
    all be orthogonal to a structured range (see :func:`hutchpp_trace`), and then XTrace is
    not exact at low rank.
    """
    A = as_operator(operator, dim)
    _check_count("probes", probes, 4)
    _check_count("block_size", block_size, 1)
    generator = torch.Generator().manual_seed(seed)
    s = probes // 2

    # Sketch: Y = A Omega = Q R, then Z = A Q and H = Q^T A Q.
    Omega = random_probes(s, A.dim, distribution, generator, A.dtype).to(A.device)
    Y = _matmat_in_blocks(A, Omega, block_size).to(torch.float64)
    Omega = Omega.to(torch.float64)
    Q, R = torch.linalg.qr(Y.T)
    Z = _matmat_in_blocks(A, Q.T.to(A.dtype), block_size).to(torch.float64)
    H = Q.T @ Z.T
    H = (H + H.T) / 2
    W = Q.T @ Omega.T

    # One leave-one-out Hutch++ estimate per probe.
    t = torch.empty(s, dtype=torch.float64)
    for i in range(s):
        others = [j for j in range(s) if j != i]
        U, _ = torch.linalg.qr(R[:, others])
        H_i = U.T @ H @ U
        c = U.T @ W[:, i]
        t[i] = (
            torch.trace(H_i)
            + Omega[i] @ Y[i]
            - 2.0 * (R[:, i] @ U) @ c
            + c @ H_i @ c
        )

    return TraceEstimate(
        estimate=float(t.mean()),
        stderr=_standard_error(t),
        probes=2 * s,
        method=f"xtrace ({distribution})",
        samples=t.tolist(),
    )


def exact_trace(operator: Any, *, dim: int | None = None, block_size: int = 64) -> TraceEstimate:
    """Compute Tr A = sum_i e_i^T A e_i with one product per basis vector e_i.

    Costs d products (one Hessian-vector product per parameter), so it suits small models; the
    basis vectors are sent in blocks of ``block_size`` rows.
    """
    A = as_operator(operator, dim)
    _check_count("block_size", block_size, 1)
    total = 0.0
    for start in range(0, A.dim, block_size):
        stop = min(start + block_size, A.dim)
        E = torch.zeros(stop - start, A.dim, dtype=A.dtype, device=A.device)
        E[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        AE = A.matmat(E)
        total += float(AE[torch.arange(stop - start), torch.arange(start, stop)].to(torch.float64).sum())
    return TraceEstimate(estimate=total, stderr=0.0, probes=A.dim, method="exact")
