"""Exact counterparts of the estimators for operators small enough to form densely.

Each builds the d x d matrix (``op.to_dense()``, d operator applications for a matrix-free
operator, which is the ``num_matvecs`` reported) and reads the answer off its full symmetric
eigendecomposition (``torch.linalg.eigh``). Results have the estimators' types with zero error, so
they serve as ground truth in tests and as the fast path for small p.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sgdstab.estimators._common import check_num_eigenvalues, select_extremal
from sgdstab.estimators.results import DensityResult, EigenResult, FrobeniusResult, TraceResult
from sgdstab.estimators.slq import smoothed_density
from sgdstab.operators import LinearOperator


def _symmetric_dense(op: LinearOperator) -> Tensor:
    matrix = op.to_dense()
    # eigh reads one triangle only; symmetrising keeps rounding asymmetry from biasing it.
    return (matrix + matrix.T) / 2


def exact_eigenvalues(op: LinearOperator, k: int = 1, which: str = "largest") -> EigenResult:
    """The ``k`` extreme eigenpairs, ordered as ``top_eigenvalues`` orders them; residual norms
    are the actual ``||A v - lambda v||`` (rounding level).

    Example:
        >>> import torch
        >>> from sgdstab.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)))
        >>> from sgdstab.estimators import exact_eigenvalues, exact_trace
        >>> exact_eigenvalues(op, k=2).values
        tensor([3., 2.], dtype=torch.float64)
        >>> exact_eigenvalues(op, k=1, which="smallest").values
        tensor([1.], dtype=torch.float64)
        >>> exact_trace(op).value
        6.0
    """
    check_num_eigenvalues(op, k, which)
    matrix = _symmetric_dense(op)
    values, vectors = torch.linalg.eigh(matrix)
    chosen = select_extremal(values, k, which)
    values, vectors = values[chosen], vectors[:, chosen]
    return EigenResult(
        values=values,
        vectors=vectors,
        residual_norms=(matrix @ vectors - vectors * values).norm(dim=0),
        num_matvecs=op.size,
        converged=True,
    )


def exact_trace(op: LinearOperator) -> TraceResult:
    """Tr A from the diagonal of the dense matrix."""
    return TraceResult(value=float(op.to_dense().trace()), stderr=0.0, num_matvecs=op.size)


def exact_frobenius_norm(op: LinearOperator) -> FrobeniusResult:
    """||A||_F and its square from the dense matrix."""
    squared = float(op.to_dense().pow(2).sum())
    return FrobeniusResult(
        value=math.sqrt(squared),
        squared=squared,
        stderr=0.0,
        squared_stderr=0.0,
        num_matvecs=op.size,
    )


def exact_spectral_density(
    op: LinearOperator, sigma: float | None = None, grid: Tensor | None = None, num_grid: int = 1000
) -> DensityResult:
    """The spectral density (1/d) sum_j delta(t - lambda_j), smoothed as ``spectral_density``
    smooths it (same ``sigma`` and ``grid`` defaults).
    """
    values = torch.linalg.eigvalsh(_symmetric_dense(op))
    weights = torch.full_like(values, 1.0 / op.size)
    return smoothed_density(op, values, weights, sigma, grid, num_grid, num_matvecs=op.size)
