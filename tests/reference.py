"""Dense references: the truth the tests (and ``benchmarks/stability.py``) compare sgdstab against.

Everything here is built directly from the definitions of SPEC.md in parameter space, with
torch.func on the whole data set in float64: never through sgdstab's operators, sample-space
formulas or solvers. Square loss L = (1/(2n)) sum_i ||f(x_i) - y_i||^2 unless a function says it
also takes mean cross-entropy. Small problems only: the Kronecker operator is p^2 x p^2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import scipy.optimize
import torch
from torch import Tensor, nn

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
    """theta -> L(theta) on the whole data set: (1/(2n)) sum_i ||f(x_i) - y_i||^2, or the mean
    cross-entropy of the logits f(x_i) for ``loss="cross_entropy"``.
    """
    inputs, targets = all_data(problem)
    if problem.loss_name == "cross_entropy":
        return lambda theta: nn.functional.cross_entropy(problem.forward(theta, inputs), targets)
    return lambda theta: (problem.forward(theta, inputs) - targets).pow(2).sum() / (2 * len(inputs))


def dense_hessian(problem: Problem, theta: Tensor | None = None) -> Tensor:
    """H = d^2 L / d theta^2 (p x p) by ``torch.func.hessian`` (not for LayerNorm: SPEC.md 4.2), at
    ``theta`` (default: the model's parameters); square loss or cross-entropy.
    """
    theta = problem.parameters() if theta is None else theta
    return torch.func.hessian(dense_loss(problem))(theta)


def output_gradients(problem: Problem) -> Tensor:
    """dl_i/df_i (n x C) in closed form: the residual f_i - y_i for square loss, softmax(f_i) minus
    the one-hot label for cross-entropy.
    """
    inputs, targets = all_data(problem)
    with torch.no_grad():
        outputs = problem.forward(problem.parameters(), inputs)
    if problem.loss_name == "cross_entropy":
        return torch.softmax(outputs, dim=-1) - nn.functional.one_hot(targets, outputs.shape[-1]).to(outputs)
    return outputs - targets


def output_curvatures(problem: Problem) -> Tensor:
    """d^2 l_i / df_i^2 (n x C x C) in closed form: I for square loss, diag(p_i) - p_i p_i^T with
    p_i = softmax(f_i) for cross-entropy (Schraudolph 2002).
    """
    inputs, _ = all_data(problem)
    with torch.no_grad():
        outputs = problem.forward(problem.parameters(), inputs)
    if problem.loss_name == "cross_entropy":
        probs = torch.softmax(outputs, dim=-1)
        return torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    return torch.eye(outputs.shape[-1], dtype=outputs.dtype).expand(len(outputs), -1, -1)


def dense_gram(problem: Problem) -> Tensor:
    """The empirical NTK K = J J^T (nC x nC)."""
    jacobian = dense_jacobian(problem)
    return jacobian @ jacobian.T


def dense_gauss_newton(problem: Problem) -> Tensor:
    """G = (1/n) sum_i J_i^T Lambda_i J_i (p x p): J^T J / n for square loss (Lambda_i = I), the
    generalised Gauss-Newton with ``output_curvatures`` for cross-entropy.
    """
    jacobian = dense_jacobian(problem)
    if problem.loss_name == "cross_entropy":
        per_sample = jacobian.reshape(problem.num_samples, problem.num_outputs, -1)
        curvature = output_curvatures(problem)
        return torch.einsum("ncp,ncd,ndq->pq", per_sample, curvature, per_sample) / problem.num_samples
    return jacobian.T @ jacobian / problem.num_samples


def per_sample_curvatures(problem: Problem) -> list[Tensor]:
    """H_i = J_i^T J_i (p x p) for every sample i; G is their mean."""
    jacobian = dense_jacobian(problem)
    outputs = problem.num_outputs
    blocks = [jacobian[i * outputs : (i + 1) * outputs] for i in range(problem.num_samples)]
    return [block.T @ block for block in blocks]


def dense_noise_covariance(problem: Problem) -> Tensor:
    """Sigma = (1/n) sum_i g_i g_i^T - g g^T with g_i = J_i^T dl_i/df_i (SPEC.md section 1): J_i^T e_i
    for square loss, J_i^T (p_i - y_i) for cross-entropy (``output_gradients``).
    """
    jacobian = dense_jacobian(problem)
    n, outputs = problem.num_samples, problem.num_outputs
    residuals = output_gradients(problem).reshape(-1)
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


def tiny_network_problem(architecture: str, loss: str, chunk_size: int = 3) -> Problem:
    """Seven samples through a float64 tanh MLP (3 -> 4 -> 3) or CNN (1x5x5 -> conv 2x3x3 -> 3),
    with Gaussian targets (``loss="mse"``) or class labels (``"cross_entropy"``): small enough for
    torch.func to build every dense matrix exactly.
    """
    num_samples, num_outputs = 7, 3
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if architecture == "mlp":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, num_outputs))
        inputs = torch.randn(num_samples, 3, generator=generator, dtype=torch.float64)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 2, kernel_size=3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, num_outputs)
        )
        inputs = torch.randn(num_samples, 1, 5, 5, generator=generator, dtype=torch.float64)
    if loss == "mse":
        targets = torch.randn(num_samples, num_outputs, generator=generator, dtype=torch.float64)
    else:
        targets = torch.randint(0, num_outputs, (num_samples,), generator=generator)
    return Problem(model.double(), inputs, targets, loss=loss, chunk_size=chunk_size)


def log_mean_slope(curves: Sequence[Sequence[Sequence[float]]], end: int, start: int = 0) -> float:
    """Least-squares slope per step of log(mean over runs of the loss) over points ``start..end-1``
    of ``(step, loss)`` curves, from the closed form cov(t, y) / var(t).
    """
    mean_loss = [sum(curve[t][1] for curve in curves) / len(curves) for t in range(start, end)]
    times = torch.arange(start, end, dtype=torch.float64)
    log_mean = torch.log(torch.tensor(mean_loss, dtype=torch.float64))
    centred = times - times.mean()
    return float((centred * (log_mean - log_mean.mean())).sum() / centred.pow(2).sum())


def jackknife_stderr(curves: Sequence[Sequence[Sequence[float]]], end: int, start: int = 0) -> float:
    """The jackknife standard error over runs of ``log_mean_slope`` (Efron and Stein 1981):
    sqrt((R - 1) / R * sum_r (s_(r) - mean s)^2) with s_(r) the slope without run r.
    """
    runs = len(curves)
    leave_one_out = torch.tensor(
        [log_mean_slope([c for j, c in enumerate(curves) if j != r], end, start) for r in range(runs)],
        dtype=torch.float64,
    )
    return float(((runs - 1) / runs * (leave_one_out - leave_one_out.mean()).pow(2).sum()).sqrt())
