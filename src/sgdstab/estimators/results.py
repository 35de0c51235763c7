"""Frozen results returned by the estimators: each carries its error estimate and its cost.

``num_matvecs`` counts operator applications (columns of ``op @ V``), the unit in which curvature
estimators are compared, since one application of a Hessian costs a few gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenpairs of a symmetric operator.

    ``values`` are descending for ``which="largest"`` and ``"both"``, ascending (most negative
    first) for ``"smallest"``; ``vectors[:, i]`` is the unit eigenvector of ``values[i]``.
    ``residual_norms[i]`` bounds ``||A v_i - lambda_i v_i||``, hence the distance from
    ``values[i]`` to the nearest true eigenvalue (the residual bound for symmetric matrices;
    Parlett, The Symmetric Eigenvalue Problem, SIAM 1998).
    """

    values: Tensor
    vectors: Tensor
    residual_norms: Tensor
    num_matvecs: int
    converged: bool


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate with its standard error (0 when exact)."""

    value: float
    stderr: float
    num_matvecs: int


@dataclass(frozen=True)
class FrobeniusResult:
    """A Frobenius norm estimate ``value = ||A||_F`` and its square, each with a standard error."""

    value: float
    squared: float
    stderr: float
    squared_stderr: float
    num_matvecs: int


@dataclass(frozen=True)
class DensityResult:
    """A spectral density smoothed by a Gaussian of width ``sigma``, evaluated on ``grid``.

    ``nodes`` and ``weights`` are the quadrature rule behind it (weights sum to 1), so moments
    ``sum(weights * nodes**j)`` can be read without the smoothing.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int
