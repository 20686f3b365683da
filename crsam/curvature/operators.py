"""A common ``matmat`` interface for symmetric matrices given densely or through products.

The trace and eigenvalue estimators accept:

- a square tensor (a dense symmetric matrix),
- an object with ``matmat(V)``, ``num_parameters``, ``dtype`` and ``device`` attributes, such as
  :class:`~crsam.curvature.functional.EmpiricalLoss` (exact Hessian-vector products) or
  :class:`~crsam.curvature.functional.FiniteDifferenceHessian`,
- a callable ``V -> A V^T`` (rows in, rows out) together with ``dim``.

Convention: ``matmat`` takes a (K, d) tensor whose rows are vectors and returns the (K, d)
tensor whose row k is A V[k].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Operator", "as_operator", "random_probes"]

_DISTRIBUTIONS = ("rademacher", "gaussian")


@dataclass
class Operator:
    """A symmetric d x d matrix A available through ``matmat``, counting the products it computes."""

    matmat_rows: Callable[[torch.Tensor], torch.Tensor]
    dim: int
    dtype: torch.dtype
    device: torch.device
    matvecs: int = 0

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return the rows A V[k] for V of shape (K, d)."""
        self.matvecs += V.shape[0]
        return self.matmat_rows(V.to(device=self.device, dtype=self.dtype))


def as_operator(operator: Any, dim: int | None = None) -> Operator:
    """Wrap a dense matrix, an object with ``matmat``, or a callable into an :class:`Operator`."""
    if isinstance(operator, Operator):
        return operator
    if isinstance(operator, torch.Tensor):
        if operator.ndim != 2 or operator.shape[0] != operator.shape[1]:
            raise ValueError(
                f"the matrix has shape {tuple(operator.shape)}; pass a square (symmetric) matrix"
            )
        A = operator
        return Operator(lambda V: V @ A.T, A.shape[0], A.dtype, A.device)
    if hasattr(operator, "matmat") and hasattr(operator, "num_parameters"):
        return Operator(operator.matmat, operator.num_parameters, operator.dtype, operator.device)
    if callable(operator):
        if dim is None or dim < 1:
            raise ValueError(f"dim={dim!r} is invalid; a callable operator needs its dimension dim >= 1")
        return Operator(operator, dim, torch.get_default_dtype(), torch.device("cpu"))
    raise TypeError(
        f"operator of type {type(operator).__name__} is not supported; pass a square tensor, an "
        "EmpiricalLoss, or a callable mapping a (K, d) tensor of rows to their products (with dim)"
    )


def random_probes(
    num_probes: int, dim: int, distribution: str, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """Draw ``num_probes`` probe vectors of length ``dim`` as rows, on the CPU from ``generator``.

    Both distributions have E[v v^T] = I, the property that makes v^T A v unbiased for Tr A:
    Rademacher entries are +1 or -1 with probability 1/2, Gaussian entries are N(0, 1).
    """
    if distribution == "rademacher":
        signs = torch.randint(0, 2, (num_probes, dim), generator=generator)
        return (2 * signs - 1).to(dtype)
    if distribution == "gaussian":
        return torch.randn(num_probes, dim, generator=generator, dtype=dtype)
    raise ValueError(f"distribution={distribution!r} is invalid; use one of {', '.join(_DISTRIBUTIONS)}")
