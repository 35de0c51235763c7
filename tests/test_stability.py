"""Linear stability of SGD (SPEC.md section 3) against enumerated batches, the parameter-space
Kronecker operator and Monte Carlo runs of linearised SGD."""

import importlib
import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

from sgdstab import Problem, ProblemError
from sgdstab.sample_space import gram_spectrum
from sgdstab.stability import (
    CRITERIA,
    SecondMomentMap,
    batch_noise_factor,
    simulate_linearized_sgd,
    stability,
)

# The package exports the function sgdstab.stability, which hides the module of that name.
stability_module = importlib.import_module("sgdstab.stability")

SAMPLINGS = ["with_replacement", "without_replacement"]


def _minimum(seed: int, n: int, num_outputs: int, hidden: int = 3, inputs_dim: int = 2) -> Problem:
    """A tiny MLP with targets equal to its outputs: an interpolating minimum, where H = G exactly."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(inputs_dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, num_outputs)
    ).double()
    inputs = torch.randn(n, inputs_dim, dtype=torch.float64)
    with torch.no_grad():
        targets = model(inputs)
    return Problem(model, inputs, targets)


def _jacobian(problem: Problem) -> torch.Tensor:
    return torch.func.jacrev(lambda t: problem.forward(t, problem.inputs).reshape(-1))(problem.parameters())


def _kronecker_map(problem: Problem, batch_noise: float):
    """eta -> the p^2 x p^2 second-moment operator of delta, restricted to range(H) x range(H)."""
    jacobian = _jacobian(problem)
    n, outputs, p = problem.num_samples, problem.num_outputs, problem.num_params
    blocks = [jacobian[i * outputs : (i + 1) * outputs] for i in range(n)]
    per_sample = [block.T @ block for block in blocks]
    curvature = sum(per_sample) / n
    values, vectors = torch.linalg.eigh(curvature)
    kept = vectors[:, values > 1e-10 * values[-1]]
    projector = torch.kron(kept @ kept.T, kept @ kept.T)
    identity = torch.eye(p, dtype=torch.float64)
    drift = torch.kron(curvature, identity) + torch.kron(identity, curvature)
    noise = batch_noise / n * sum(torch.kron(h, h) for h in per_sample)
    noise = noise + (1 - batch_noise) * torch.kron(curvature, curvature)
    return lambda lr: (
        projector @ (torch.eye(p * p, dtype=torch.float64) - lr * drift + lr**2 * noise) @ projector
    )


def _spectral_radius(matrix: torch.Tensor) -> float:
    return torch.linalg.eigvalsh(matrix).abs().max().item()


def _root_threshold(kronecker, upper: float) -> float:
    """The learning rate where the spectral radius of the Kronecker operator crosses 1."""
    return _largest_crossing(lambda lr: _spectral_radius(kronecker(lr)) - 1, upper)


def _dense_worst_case_alignment(jacobian: torch.Tensor, n: int, outputs: int) -> float:
    """mu_min of SPEC.md section 2 from its definition: lambda_min of n blockdiag_i (K^2)_ii - K^2
    on range(K), over ||K||_F^2."""
    gram = jacobian @ jacobian.T
    squared = gram @ gram
    block_diagonal = torch.block_diag(
        *[squared[i * outputs : (i + 1) * outputs, i * outputs : (i + 1) * outputs] for i in range(n)]
    )
    values, vectors = torch.linalg.eigh(gram)
    basis = vectors[:, values > 1e-10 * values[-1]]
    restricted = basis.T @ (n * block_diagonal - squared) @ basis
    return torch.linalg.eigvalsh(restricted)[0].item() / gram.pow(2).sum().item()


def _largest_crossing(excess, upper: float) -> float:
    """The largest lr in (0, upper] where ``excess`` changes sign from negative to non-negative."""
    lower = upper / 2
    while excess(lower) >= 0:
        upper, lower = lower, lower / 2
    return scipy.optimize.brentq(excess, lower, upper, xtol=1e-15, rtol=1e-13)


def test_batch_noise_factor():
    assert batch_noise_factor(10, 4, "with_replacement") == pytest.approx(0.25)
    assert batch_noise_factor(10, 4, "without_replacement") == pytest.approx(6 / 36)
    assert batch_noise_factor(10, 1, "without_replacement") == pytest.approx(1.0)
    assert batch_noise_factor(10, 10, "without_replacement") == 0.0
    assert batch_noise_factor(10, 10, "with_replacement") == pytest.approx(0.1)


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("num_outputs", [1, 2])
def test_second_moment_map_equals_expectation_over_every_batch(sampling, num_outputs):
    n, batch, lr = 4, 2, 0.3
    problem = _minimum(0, n, num_outputs, hidden=4)  # p = 12 + 5C > nC: K is full rank
    jacobian = _jacobian(problem)
    gram = jacobian @ jacobian.T
    torch.manual_seed(1)
    factor = torch.randn(n * num_outputs, n * num_outputs, dtype=torch.float64)
    moment = factor @ factor.T
    if sampling == "with_replacement":
        batches = list(itertools.product(range(n), repeat=batch))
    else:
        batches = list(itertools.combinations(range(n), batch))
    expected = torch.zeros_like(moment)
    for members in batches:
        # One linearised SGD step on the residual: u' = u - (lr/B) sum_b K[:, block i_b] u[block i_b].
        selection = torch.zeros(n * num_outputs, dtype=torch.float64)
        for i in members:
            selection[i * num_outputs : (i + 1) * num_outputs] += 1.0 / batch
        step = torch.eye(n * num_outputs, dtype=torch.float64) - lr * gram * selection[None, :]
        expected += step @ moment @ step.T / len(batches)
    second_moment = SecondMomentMap(gram_spectrum(gram, num_outputs), batch_noise_factor(n, batch, sampling))
    torch.testing.assert_close(second_moment.sample_space_step(moment, lr), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", ["dense", "lanczos"])
@pytest.mark.parametrize("sampling,batch", [("with_replacement", 2), ("without_replacement", 3)])
@pytest.mark.parametrize("num_outputs,n", [(1, 9), (2, 6)])
def test_threshold_and_growth_equal_the_parameter_space_kronecker_operator(
    monkeypatch, solver, sampling, batch, num_outputs, n
):
    monkeypatch.setattr(stability_module, "_DENSE_EIGEN_MAX_DIM", 10**6 if solver == "dense" else 0)
    problem = _minimum(
        2, n, num_outputs, hidden=5 - 2 * num_outputs
    )  # p = 13 (C=1) or 12 (C=2): p^2 x p^2 stays small
    result = stability(problem, lr=0.1, batch_size=batch, sampling=sampling)
    kronecker = _kronecker_map(problem, batch_noise_factor(n, batch, sampling))
    expected = _root_threshold(kronecker, 2 * result.thresholds["gd"])
    assert result.thresholds["exact"] == pytest.approx(expected, rel=1e-9)
    assert result.growth_factor == pytest.approx(_spectral_radius(kronecker(0.1)), rel=1e-10)
    second_moment = SecondMomentMap(
        gram_spectrum(_jacobian(problem) @ _jacobian(problem).T, num_outputs), result.batch_noise
    )
    for fraction in (0.2, 0.9, 1.1, 3.0):
        lr = fraction * expected
        assert second_moment.spectral_radius(lr) == pytest.approx(_spectral_radius(kronecker(lr)), rel=1e-10)


def test_growth_crosses_one_at_the_threshold_and_linearised_sgd_follows():
    problem = _minimum(3, 8, 1, hidden=4)
    threshold = stability(problem, lr=0.1, batch_size=2).thresholds["exact"]
    below = stability(problem, lr=0.97 * threshold, batch_size=2)
    above = stability(problem, lr=1.03 * threshold, batch_size=2)
    assert below.growth_factor < 1 < above.growth_factor
    assert below.stable and not above.stable

    # Above the threshold E L~ is carried by rare chains (heavy tails), so the chain average is only
    # trusted over a few steps.
    decaying = simulate_linearized_sgd(problem, 0.6 * threshold, 2, num_steps=30, num_chains=4000, seed=0)
    growing = simulate_linearized_sgd(problem, 1.1 * threshold, 2, num_steps=8, num_chains=4000, seed=0)
    assert decaying.loss_mean[-1] + 4 * decaying.loss_stderr[-1] < decaying.loss_mean[0]
    assert growing.loss_mean[-1] - 4 * growing.loss_stderr[-1] > growing.loss_mean[0]

    # The chain averages follow tr(T^t(N_0)) / (2n) with N_0 = E[u_0 u_0^T] = K.
    jacobian = _jacobian(problem)
    gram = jacobian @ jacobian.T
    second_moment = SecondMomentMap(gram_spectrum(gram, 1), 0.5)
    for simulation in (decaying, growing):
        moment = gram
        for step in range(1, 9):
            moment = second_moment.sample_space_step(moment, simulation.lr)
            predicted = moment.trace().item() / (2 * 8)
            assert (
                abs(simulation.loss_mean[step].item() - predicted) <= 4 * simulation.loss_stderr[step].item()
            )


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_thresholds_are_ordered_on_random_minima(sampling):
    for seed, (n, outputs, batch) in enumerate([(10, 1, 1), (10, 1, 3), (6, 2, 2), (8, 3, 4), (12, 1, 6)]):
        result = stability(_minimum(seed, n, outputs, hidden=5), lr=0.01, batch_size=batch, sampling=sampling)
        thresholds = result.thresholds
        assert set(thresholds) == set(CRITERIA)
        necessary = min(
            thresholds[name] for name in ("gd", "mulayoff15", "mulayoff16", "mulayoff24", "frobenius")
        )
        assert thresholds["wme"] <= thresholds["exact"] * (1 + 1e-9)
        assert thresholds["exact"] <= necessary * (1 + 1e-9)
        assert thresholds["mulayoff24"] <= thresholds["mulayoff15"] * (1 + 1e-9)
        assert thresholds["mulayoff15"] <= thresholds["gd"] * (1 + 1e-9)


def test_escape_factor_bounds_the_one_step_growth_of_the_linearised_loss():
    problem = _minimum(4, 10, 2, hidden=6)
    lr, batch = 5.0, 2
    result = stability(problem, lr=lr, batch_size=batch)
    jacobian = _jacobian(problem)
    curvature_frobenius = torch.linalg.matrix_norm(jacobian.T @ jacobian / 10).item()
    expected = lr**2 * (1 / batch) * _dense_worst_case_alignment(jacobian, 10, 2) * curvature_frobenius**2
    assert result.escape_factor == pytest.approx(expected, rel=1e-9)
    assert result.log_escape_rate == pytest.approx(math.log(expected), rel=1e-9)
    gram = jacobian @ jacobian.T
    second_moment = SecondMomentMap(gram_spectrum(gram, 2), result.batch_noise)
    torch.manual_seed(5)
    for _ in range(20):
        residual = gram @ torch.randn(20, dtype=torch.float64)  # in range(K)
        after = second_moment.sample_space_step(torch.outer(residual, residual), lr).trace()
        assert after >= result.escape_factor * residual.pow(2).sum() * (1 - 1e-9)


def test_ingredients_match_dense_curvature():
    problem = _minimum(5, 7, 2, hidden=4)
    result = stability(problem, lr=0.2, batch_size=3, sampling="without_replacement")
    jacobian = _jacobian(problem)
    curvature = jacobian.T @ jacobian / 7
    eigenvalues = torch.linalg.eigvalsh(curvature)
    assert result.lambda_max == pytest.approx(eigenvalues[-1].item(), rel=1e-10)
    assert result.trace == pytest.approx(eigenvalues.sum().item(), rel=1e-10)
    assert result.hessian_frobenius == pytest.approx(torch.linalg.matrix_norm(curvature).item(), rel=1e-10)
    assert result.thresholds["gd"] == pytest.approx(2 / eigenvalues[-1].item(), rel=1e-10)
    assert result.batch_noise == pytest.approx(4 / 18)
    noise, n = 4 / 18, 7
    assert result.thresholds["trace"] == pytest.approx(2 / (noise * eigenvalues.sum().item()), rel=1e-10)
    # Mulayoff & Michaeli (2023) (15), (16) and Wu, Ma & E (2018) from dense per-sample H_i = J_i^T J_i.
    per_sample = [jacobian[2 * i : 2 * i + 2].T @ jacobian[2 * i : 2 * i + 2] for i in range(n)]
    frobenius_squared = curvature.pow(2).sum().item()
    mulayoff16 = (
        2
        * eigenvalues.sum().item()
        / ((1 - noise) * frobenius_squared + noise / n * sum(h.pow(2).sum().item() for h in per_sample))
    )
    assert result.thresholds["mulayoff16"] == pytest.approx(mulayoff16, rel=1e-9)
    top = torch.linalg.eigh(curvature).eigenvectors[:, -1]
    sharpness = eigenvalues[-1].item()
    spread = sum((top @ h @ top - sharpness).item() ** 2 for h in per_sample)
    assert result.thresholds["mulayoff15"] == pytest.approx(
        2 * sharpness / (sharpness**2 + noise / n * spread), rel=1e-9
    )
    mu_min = _dense_worst_case_alignment(jacobian, n, 2)
    assert result.thresholds["frobenius"] == pytest.approx(
        1 / (frobenius_squared**0.5 * (noise * mu_min) ** 0.5), rel=1e-9
    )
    values, vectors = torch.linalg.eigh(curvature)
    basis = vectors[:, values > 1e-10 * values[-1]]  # off range(H) the one-step matrix is the identity
    sigma_h = sum(h @ h for h in per_sample) / n - curvature @ curvature
    identity = torch.eye(curvature.shape[0], dtype=torch.float64)

    def one_step_excess(lr):
        step = (identity - lr * curvature) @ (identity - lr * curvature) + lr**2 * noise * sigma_h
        return torch.linalg.eigvalsh(basis.T @ step @ basis)[-1].item() - 1

    assert result.thresholds["wme"] == pytest.approx(
        _largest_crossing(one_step_excess, 2 / sharpness), rel=1e-8
    )
    assert (result.rank, result.loss, result.gradient_norm, result.warnings) == (14, 0.0, 0.0, ())


def test_full_batch_without_replacement_is_gradient_descent():
    result = stability(_minimum(6, 6, 1, hidden=3), lr=0.1, batch_size=6, sampling="without_replacement")
    assert result.batch_noise == 0.0
    assert result.thresholds["exact"] == pytest.approx(result.thresholds["gd"], rel=1e-9)
    assert result.thresholds["wme"] == pytest.approx(result.thresholds["gd"], rel=1e-9)
    assert result.thresholds["frobenius"] == math.inf and result.thresholds["trace"] == math.inf
    assert result.escape_factor == 0.0 and result.log_escape_rate == -math.inf


def test_stability_warns_away_from_a_minimum():
    problem = _minimum(7, 8, 1)
    shifted = problem.with_targets(problem.targets + 1.0)
    with pytest.warns(UserWarning, match="not a minimum"):
        result = stability(shifted, lr=0.1, batch_size=2)
    assert len(result.warnings) == 1 and "not a minimum" in result.warnings[0]
    assert result.loss > 0 and result.gradient_norm > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stability(problem, lr=0.1, batch_size=2).warnings == ()


@pytest.mark.parametrize(
    "arguments,message",
    [
        (dict(lr=0.0), "lr must be a positive finite number"),
        (dict(lr=-1.0), "lr must be a positive finite number"),
        (dict(lr=math.nan), "lr must be a positive finite number"),
        (dict(lr=math.inf), "lr must be a positive finite number"),
        (dict(batch_size=0), "batch_size must be an integer between 1 and n=5"),
        (dict(batch_size=6), "batch_size must be an integer between 1 and n=5"),
        (dict(batch_size=2.0), "batch_size must be an integer between 1 and n=5"),
        (dict(batch_size=True), "batch_size must be an integer between 1 and n=5"),
        (dict(sampling="shuffled"), "sampling must be one of"),
    ],
)
def test_stability_and_simulation_refuse_bad_arguments(arguments, message):
    problem = _minimum(8, 5, 1)
    call = dict(lr=0.1, batch_size=2, sampling="with_replacement") | arguments
    with pytest.raises(ValueError, match=message):
        stability(problem, **call)
    with pytest.raises(ValueError, match=message):
        simulate_linearized_sgd(problem, **call)


def test_numpy_scalars_are_accepted_as_learning_rate_and_batch_size():
    problem = _minimum(8, 5, 1)
    result = stability(problem, lr=np.float32(0.1), batch_size=np.int64(2))
    assert (type(result.lr), type(result.batch_size)) == (float, int)
    assert result.thresholds == stability(problem, lr=0.1, batch_size=2).thresholds


def test_stability_refuses_cross_entropy_and_oversized_k():
    model = torch.nn.Linear(3, 4).double()
    inputs, labels = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    problem = Problem(model, inputs, labels, loss="cross_entropy")
    with pytest.raises(ProblemError, match="square loss"):
        stability(problem, lr=0.1, batch_size=2)
    with pytest.raises(MemoryError, match="max_gram_entries=10"):
        stability(_minimum(9, 5, 1), lr=0.1, batch_size=2, max_gram_entries=10)


def test_simulation_is_reproducible_and_takes_a_given_start():
    problem = _minimum(10, 6, 2)
    first = simulate_linearized_sgd(
        problem, 0.5, 2, "without_replacement", num_steps=5, num_chains=50, seed=3
    )
    second = simulate_linearized_sgd(
        problem, 0.5, 2, "without_replacement", num_steps=5, num_chains=50, seed=3
    )
    torch.testing.assert_close(first.loss_mean, second.loss_mean, rtol=0, atol=0)
    assert first.loss_mean.shape == first.loss_stderr.shape == (6,)
    start = torch.ones(12, dtype=torch.float64)
    fixed = simulate_linearized_sgd(problem, 0.5, 2, num_steps=3, num_chains=10, init=start)
    assert fixed.loss_mean[0].item() == pytest.approx(12 / 12) and fixed.loss_stderr[0].item() == 0.0
    with pytest.raises(ValueError, match="init must have shape"):
        simulate_linearized_sgd(problem, 0.5, 2, num_steps=3, num_chains=10, init=torch.ones(5))
    with pytest.raises(ValueError, match='init must be "gaussian"'):
        simulate_linearized_sgd(problem, 0.5, 2, num_steps=3, num_chains=10, init="uniform")
