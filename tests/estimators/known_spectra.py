"""Test matrices with known spectra, Q diag(eigenvalues) Q^T with Q Haar-random orthogonal.

Imported by the estimator tests as their ground truth; the truth is the eigenvalue list itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sgdstab.operators import DenseOperator


def random_orthogonal(d: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=generator))
    # Fixing the signs of diag(R) makes Q Haar-distributed (Mezzadri, Notices AMS 2007).
    return q * torch.sign(torch.diagonal(r))


def with_spectrum(eigenvalues, seed: int = 0) -> DenseOperator:
    eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    q = random_orthogonal(eigenvalues.numel(), seed)
    matrix = (q * eigenvalues) @ q.T
    return DenseOperator((matrix + matrix.T) / 2)


def hessian_like_spectrum(
    d: int, outliers=(40.0, 36.0, 30.0, 22.0, 15.0, 11.0, 8.0, 6.0, 4.0), seed: int = 0
) -> Tensor:
    """A few large outliers over a bulk piled up near zero with a small negative tail, the shape
    reported for neural-network Hessians (Sagun et al. 2017; Ghorbani et al. 2019)."""
    generator = torch.Generator().manual_seed(seed)
    rest = d - len(outliers)
    bulk = 2.0 * torch.rand(rest, dtype=torch.float64, generator=generator) ** 4
    bulk = bulk - 0.05 * torch.rand(rest, dtype=torch.float64, generator=generator)
    return torch.cat([torch.tensor(outliers, dtype=torch.float64), bulk])


def hutchinson_variance(matrix: Tensor) -> float:
    """Variance of z^T A z for one Rademacher z (Avron and Toledo, J. ACM 2011)."""
    return float(2 * (matrix.pow(2).sum() - torch.diagonal(matrix).pow(2).sum()))
