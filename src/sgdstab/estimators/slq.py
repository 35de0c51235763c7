"""Stochastic Lanczos quadrature: the spectral density of a symmetric operator.

For a unit start vector q, ``q^T f(A) q`` is a Stieltjes integral of f against the spectral
measure of A seen from q; m Lanczos steps give its m-point Gauss quadrature rule, with the Ritz
values theta_i as nodes and the squared first components tau_i^2 of the eigenvectors of T_m as
weights (Golub and Meurant, Matrices, Moments and Quadrature, 2010). Averaging those rules over
Rademacher probes z, q = z / ||z||, estimates the density (1/d) sum_j delta(t - lambda_j), since
E[z^T f(A) z] = tr f(A) and ||z||^2 = d for Rademacher z (Ubaru, Chen and Saad, SIAM J. Matrix
Anal. Appl. 2017). Each point mass is then smoothed into a Gaussian of width sigma, as done for
neural-network Hessians by Ghorbani, Krishnan and Xiao (ICML 2019).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sgdstab._checks import check_positive_float, check_positive_int
from sgdstab.estimators._common import make_generator, many_products, rademacher
from sgdstab.estimators.lanczos import LanczosProcess
from sgdstab.estimators.results import DensityResult
from sgdstab.operators import LinearOperator

#: Default sigma as a fraction of the spread of the nodes, and grid padding in sigmas, beyond
#: which a Gaussian holds under 1e-6 of its mass, so the density integrates to 1 on the grid.
_SIGMA_FRACTION = 0.01
_GRID_PADDING = 5.0


@many_products
def spectral_density(
    op: LinearOperator,
    num_probes: int = 10,
    num_steps: int = 80,
    seed: int | None = 0,
    sigma: float | None = None,
    grid: Tensor | None = None,
    num_grid: int = 1000,
    block_size: int = 10,
    generator: torch.Generator | None = None,
) -> DensityResult:
    """Smoothed spectral density by stochastic Lanczos quadrature.

    Runs ``min(num_steps, d)`` Lanczos steps from each of ``num_probes`` Rademacher probes,
    ``block_size`` probes side by side (memory: ``num_steps * d * block_size`` numbers). The
    quadrature rule (``nodes``, ``weights``; weights sum to 1) is the average of the probes'
    rules; its first two moments are Hutchinson estimates of tr(A)/d and ||A||_F^2/d. ``sigma``
    defaults to 1% of the spread of the nodes; ``grid`` defaults to ``num_grid`` points covering
    the nodes plus five sigmas either side.

    Example:
        With three distinct eigenvalues every probe's Krylov space is exhausted after three
        steps, so the quadrature nodes are the eigenvalues themselves:

        >>> import torch
        >>> from sgdstab.estimators import spectral_density
        >>> from sgdstab.operators import DenseOperator
        >>> spectrum = torch.tensor([2.0] * 3 + [-1.0] * 2 + [0.5] * 5, dtype=torch.float64)
        >>> result = spectral_density(DenseOperator(torch.diag(spectrum)), num_probes=4, num_steps=8)
        >>> torch.unique(result.nodes.round(decimals=9))
        tensor([-1.0000,  0.5000,  2.0000], dtype=torch.float64)
        >>> round(float(result.weights.sum()), 12), round(float(torch.trapezoid(result.density, result.grid)), 3)
        (1.0, 1.0)
    """
    check_positive_int("num_probes", num_probes)
    check_positive_int("num_steps", num_steps)
    check_positive_int("block_size", block_size)
    _check_smoothing(sigma, num_grid)
    generator = make_generator(op, seed, generator)
    matvecs_before = op.num_matvecs

    num_steps = min(num_steps, op.size)
    rules = [
        _quadrature_rules(op, min(block_size, num_probes - first), num_steps, generator)
        for first in range(0, num_probes, block_size)
    ]
    nodes = torch.cat([node for node, _ in rules])
    weights = torch.cat([weight for _, weight in rules]) / num_probes
    num_matvecs = op.num_matvecs - matvecs_before
    return smoothed_density(op, nodes, weights, sigma, grid, num_grid, num_matvecs)


def _quadrature_rules(
    op: LinearOperator, num_probes: int, num_steps: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Gauss rules of ``num_probes`` Rademacher probes, concatenated; each one's weights sum to 1.

    A run whose Krylov space turned invariant restarts (see ``LanczosProcess``); the Ritz values
    of the restarted block are orthogonal to the probe, so they enter with weight 0.
    """
    process = LanczosProcess(op, rademacher(op, num_probes, generator), generator)
    for _ in range(num_steps):
        process.step()
    rules = [process.ritz(run) for run in range(num_probes)]
    nodes = torch.cat([ritz_values for ritz_values, _, _ in rules])
    weights = torch.cat([ritz_coefficients[0].pow(2) for _, ritz_coefficients, _ in rules])
    return nodes, weights


def smoothed_density(
    op: LinearOperator,
    nodes: Tensor,
    weights: Tensor,
    sigma: float | None,
    grid: Tensor | None,
    num_grid: int,
    num_matvecs: int,
) -> DensityResult:
    """Place a Gaussian of width ``sigma`` and mass ``weights[i]`` at each of ``nodes``; the
    result is in ``op``'s dtype and device.
    """
    _check_smoothing(sigma, num_grid)
    nodes, weights = nodes.to("cpu", torch.float64), weights.to("cpu", torch.float64)
    low, high = float(nodes.min()), float(nodes.max())
    if sigma is None:
        # A single-point spectrum has no spread to scale by; fall back to its magnitude, then 1.
        sigma = _SIGMA_FRACTION * ((high - low) or max(abs(low), abs(high)) or 1.0)
    if grid is None:
        padding = _GRID_PADDING * sigma
        grid = torch.linspace(low - padding, high + padding, num_grid, dtype=torch.float64)
    points = grid.to("cpu", torch.float64)
    standardized = (points[:, None] - nodes[None, :]) / sigma
    density = torch.exp(-0.5 * standardized**2) @ weights / (sigma * math.sqrt(2 * math.pi))
    return DensityResult(
        grid=points.to(dtype=op.dtype, device=op.device),
        density=density.to(dtype=op.dtype, device=op.device),
        nodes=nodes.to(dtype=op.dtype, device=op.device),
        weights=weights.to(dtype=op.dtype, device=op.device),
        sigma=sigma,
        num_matvecs=num_matvecs,
    )


def _check_smoothing(sigma: float | None, num_grid: int) -> None:
    if sigma is not None:
        check_positive_float("sigma", sigma)
    check_positive_int("num_grid", num_grid)
