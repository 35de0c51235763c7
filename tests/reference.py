"""Dense references: the truth the tests (and ``benchmarks/stability.py``) compare sgdstab against.

Everything here is built directly from the definitions of SPEC.md in parameter space, with
torch.func on the whole data set in float64: never through sgdstab's operators, sample-space
formulas or solvers. Square loss L = (1/(2n)) sum_i ||f(x_i) - y_i||^2 throughout. Small problems
only: the Kronecker operator is p^2 x p^2.
"""

from __future__ import annotations

from collections.abc import Callable

import scipy.optimize
import torch
from torch import Tensor

from sgdstab import Problem

#: Eigenvalues below this fraction of the largest count as zero when a range is cut.
RANGE_RTOL = 1e-10


def assert_matches(actual, expected, rtol: float, atol: float = 0.0) -> None:
    """The one comparison of the tests: numbers or tensors, |actual - expected| <= atol + rtol |expected|."""
    actual_tensor = torch.as_tensor(actual, dtype=torch.float64)
    expected_tensor = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual_tensor, expected_tensor, rtol=rtol, atol=atol)


def all_data(problem: Problem) -> tuple[Tensor, Tensor]:
    """The whole data set (inputs, targets), read through the problem's public chunks."""
    inputs, targets = (torch.cat(parts) for parts in zip(*problem.chunks(), strict=True))
    return inputs, targets


def dense_jacobian(problem: Problem, theta: Tensor | None = None) -> Tensor:
    """J (nC x p), sample-major (SPEC.md section 1), by ``torch.func.jacrev`` of all outputs."""
    inputs, _ = all_data(problem)
    theta = problem.parameters() if theta is None else theta
    return torch.func.jacrev(lambda t: problem.forward(t, inputs).reshape(-1))(theta)


def dense_residuals(problem: Problem) -> Tensor:
    """e = f(X) - Y stacked sample-major, length nC."""
    inputs, targets = all_data(problem)
    with torch.no_grad():
        return (problem.forward(problem.parameters(), inputs) - targets).reshape(-1)


def dense_loss(problem: Problem) -> Callable[[Tensor], Tensor]:
    """theta -> L(theta) = (1/(2n)) sum_i ||f(x_i) - y_i||^2 on the whole data set."""
    inputs, targets = all_data(problem)
    return lambda theta: (problem.forward(theta, inputs) - targets).pow(2).sum() / (2 * len(inputs))


def dense_hessian(problem: Problem) -> Tensor:
    """H = d^2 L / d theta^2 (p x p) by ``torch.func.hessian`` (not for LayerNorm: SPEC.md 4.2)."""
    return torch.func.hessian(dense_loss(problem))(problem.parameters())


def dense_gram(problem: Problem) -> Tensor:
    """The empirical NTK K = J J^T (nC x nC)."""
    jacobian = dense_jacobian(problem)
    return jacobian @ jacobian.T


def dense_gauss_newton(problem: Problem) -> Tensor:
    """G = J^T J / n (p x p)."""
    jacobian = dense_jacobian(problem)
    return jacobian.T @ jacobian / problem.num_samples


def per_sample_curvatures(problem: Problem) -> list[Tensor]:
    """H_i = J_i^T J_i (p x p) for every sample i; G is their mean."""
    jacobian = dense_jacobian(problem)
    outputs = problem.num_outputs
    blocks = [jacobian[i * outputs : (i + 1) * outputs] for i in range(problem.num_samples)]
    return [block.T @ block for block in blocks]


def dense_noise_covariance(problem: Problem) -> Tensor:
    """Sigma = (1/n) sum_i g_i g_i^T - g g^T with g_i = J_i^T e_i (SPEC.md section 1)."""
    jacobian, residuals = dense_jacobian(problem), dense_residuals(problem)
    n, outputs = problem.num_samples, problem.num_outputs
    gradients = torch.stack(
        [
            jacobian[i * outputs : (i + 1) * outputs].T @ residuals[i * outputs : (i + 1) * outputs]
            for i in range(n)
        ]
    )
    mean = gradients.mean(dim=0)
    return gradients.T @ gradients / n - torch.outer(mean, mean)


def mu_by_definition(problem: Problem, curvature: Tensor | None = None) -> float:
    """mu = tr(Sigma C) / (2 L ||C||_F^2) with C = G (default) or any dense curvature (SPEC.md section 2)."""
    curvature = dense_gauss_newton(problem) if curvature is None else curvature
    two_loss = dense_residuals(problem).pow(2).sum() / problem.num_samples
    sigma = dense_noise_covariance(problem)
    return (torch.trace(sigma @ curvature) / (two_loss * curvature.pow(2).sum())).item()


def dense_worst_case_alignment(problem: Problem) -> float:
    """mu_min of SPEC.md section 2 from its definition: lambda_min of n blockdiag_i (K^2)_ii - K^2
    on range(K), over ||K||_F^2.
    """
    gram = dense_gram(problem)
    n, outputs = problem.num_samples, problem.num_outputs
    squared = gram @ gram
    block_diagonal = torch.block_diag(
        *[squared[i * outputs : (i + 1) * outputs, i * outputs : (i + 1) * outputs] for i in range(n)]
    )
    values, vectors = torch.linalg.eigh(gram)
    basis = vectors[:, values > RANGE_RTOL * values[-1]]
    restricted = basis.T @ (n * block_diagonal - squared) @ basis
    return torch.linalg.eigvalsh(restricted)[0].item() / gram.pow(2).sum().item()


def kronecker_second_moment(problem: Problem, batch_noise: float) -> Callable[[float], Tensor]:
    """eta -> the p^2 x p^2 second-moment operator of delta in linearised SGD (Ma & Ying 2021),
    E[(I - eta H_batch) (x) (I - eta H_batch)], restricted to range(H) (x) range(H).
    """
    per_sample = per_sample_curvatures(problem)
    n, p = problem.num_samples, problem.num_params
    curvature = sum(per_sample) / n
    values, vectors = torch.linalg.eigh(curvature)
    kept = vectors[:, values > RANGE_RTOL * values[-1]]
    projector = torch.kron(kept @ kept.T, kept @ kept.T)
    identity = torch.eye(p, dtype=torch.float64)
    drift = torch.kron(curvature, identity) + torch.kron(identity, curvature)
    noise = batch_noise / n * sum(torch.kron(h, h) for h in per_sample)
    noise = noise + (1 - batch_noise) * torch.kron(curvature, curvature)
    return lambda lr: (
        projector @ (torch.eye(p * p, dtype=torch.float64) - lr * drift + lr**2 * noise) @ projector
    )


def spectral_radius(matrix: Tensor) -> float:
    """Largest |eigenvalue| of a symmetric matrix."""
    return torch.linalg.eigvalsh(matrix).abs().max().item()


def largest_crossing(excess: Callable[[float], float], upper: float, rtol: float = 1e-13) -> float:
    """The largest lr in (0, upper] where ``excess`` changes sign from negative to non-negative.

    Halves down to a clearly negative point first: near lr = 0 the excess of a growth factor
    shrinks to rounding level and can show a spurious root.
    """
    lower = upper / 2
    while excess(lower) >= 0:
        upper, lower = lower, lower / 2
    return scipy.optimize.brentq(excess, lower, upper, xtol=1e-15, rtol=rtol)


def kronecker_threshold(problem: Problem, batch_noise: float, rtol: float = 1e-13) -> float:
    """eta*: where the spectral radius of the Kronecker operator crosses 1 (below 2 * 2/lambda_max)."""
    operator = kronecker_second_moment(problem, batch_noise)
    upper = 4 / torch.linalg.eigvalsh(dense_gauss_newton(problem))[-1].item()
    return largest_crossing(lambda lr: spectral_radius(operator(lr)) - 1, upper, rtol)


def mlp_problem(
    num_outputs: int, n: int, inputs_dim: int, hidden: int, seed: int = 0, chunk_size: int = 1024
) -> Problem:
    """A float64 tanh MLP on Gaussian inputs with Gaussian targets (not a minimum)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(inputs_dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, num_outputs)
    ).double()
    inputs = torch.randn(n, inputs_dim, dtype=torch.float64)
    return Problem(model, inputs, torch.randn(n, num_outputs, dtype=torch.float64), chunk_size=chunk_size)
