"""Largest Hessian eigenvalues by the Lanczos method, with their convergence reported.

References:
    Lehoucq, R. B., Sorensen, D. C., Yang, C. (1998). ARPACK Users' Guide: Solution of
    Large-Scale Eigenvalue Problems with Implicitly Restarted Arnoldi Methods. SIAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from crsam.curvature.operators import as_operator

__all__ = ["EigenResult", "top_eigenvalues"]


@dataclass
class EigenResult:
    """Largest eigenvalues with what is known of their accuracy.

    Attributes:
        eigenvalues: the k largest (algebraic) eigenvalues found, in decreasing order.
        residuals: ||A x - lambda x|| for each unit Ritz vector x; for symmetric A some
            eigenvalue lies within this distance of lambda.
        converged: whether ARPACK met its tolerance for all k.
        matvecs: the number of matrix-vector products spent, the residual check included.
        method: ``"lanczos"`` (ARPACK) or ``"dense"`` for matrices too small for ARPACK.
    """

    eigenvalues: list[float]
    residuals: list[float]
    converged: bool
    matvecs: int
    method: str


def top_eigenvalues(
    operator: Any,
    k: int = 1,
    *,
    dim: int | None = None,
    tol: float = 1e-4,
    max_restarts: int = 30,
    num_lanczos_vectors: int | None = None,
    seed: int = 0,
) -> EigenResult:
    """Compute the k largest (algebraic, not absolute) eigenvalues of a symmetric operator.

    Runs implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``, ARPACK, ``which="LA"``) on
    a ``LinearOperator`` that wraps the operator's products, in float64, from a seeded Gaussian
    start vector. ``tol`` is ARPACK's relative accuracy of the Ritz values and ``max_restarts``
    its iteration limit. When ARPACK does not converge, the Ritz values found so far are
    returned with ``converged=False``. Afterwards one product per eigenvalue computes the residual
    ||A x - lambda x||, which bounds the distance from lambda to the spectrum. Operators of
    dimension at most 2k + 1, too small for ARPACK, are formed densely instead.
    """
    A = as_operator(operator, dim)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= A.dim:
        raise ValueError(f"k={k!r} is invalid; pass an integer with 1 <= k <= {A.dim} (the dimension)")
    if not tol >= 0:
        raise ValueError(f"tol={tol!r} is invalid; pass a relative tolerance >= 0 (0 means machine precision)")
    start = A.matvecs

    # Small operators: form the matrix and use a dense symmetric eigensolver.
    if A.dim <= 2 * k + 1:
        M = A.matmat(torch.eye(A.dim, dtype=A.dtype, device=A.device)).to(torch.float64).cpu()
        M = (M + M.T) / 2
        values, vectors = torch.linalg.eigh(M)
        values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
        residuals = torch.linalg.vector_norm(M @ vectors - vectors * values, dim=0)
        return EigenResult(values.tolist(), residuals.tolist(), True, A.matvecs - start, "dense")

    def product(x: np.ndarray) -> np.ndarray:
        row = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(1, -1))
        return A.matmat(row).to(torch.float64).cpu().numpy().reshape(-1)

    linear_operator = LinearOperator((A.dim, A.dim), matvec=product, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(A.dim)

    # Lanczos; keep the partial result when ARPACK stops before converging.
    try:
        values, vectors = eigsh(
            linear_operator, k=k, which="LA", tol=tol, maxiter=max_restarts, ncv=num_lanczos_vectors, v0=v0
        )
        converged = True
    except ArpackNoConvergence as error:
        values, vectors = error.eigenvalues, error.eigenvectors
        converged = False
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]

    # Residual ||A x - lambda x|| for each Ritz pair.
    residuals = []
    for value, vector in zip(values, vectors.T):
        residuals.append(float(np.linalg.norm(product(vector) - value * vector)))
    return EigenResult([float(v) for v in values], residuals, converged, A.matvecs - start, "lanczos")
