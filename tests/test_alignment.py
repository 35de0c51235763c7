"""The alignment factor (SPEC.md section 2) against dense parameter-space matrices and closed forms."""

import math

import pytest
import torch

from reference import (
    assert_matches,
    dense_gauss_newton,
    dense_hessian,
    dense_noise_covariance,
    dense_residuals,
    dense_worst_case_alignment,
    mlp_problem,
    mu_by_definition,
)
from sgdstab import Problem, ProblemError
from sgdstab.alignment import alignment


def _mlp_problem(num_outputs: int, n: int = 12, seed: int = 0, chunk_size: int = 5) -> Problem:
    return mlp_problem(num_outputs, n, inputs_dim=4, hidden=5, seed=seed, chunk_size=chunk_size)


@pytest.mark.parametrize("num_outputs", [1, 3])
def test_exact_alignment_equals_parameter_space_definition(num_outputs):
    problem = _mlp_problem(num_outputs)
    sigma, gauss_newton = dense_noise_covariance(problem), dense_gauss_newton(problem)
    loss = dense_residuals(problem).pow(2).sum() / (2 * problem.num_samples)
    result = alignment(problem)
    assert_matches(result.mu, mu_by_definition(problem), rtol=1e-10)
    assert_matches(result.mu_hessian, mu_by_definition(problem, dense_hessian(problem)), rtol=1e-8)
    assert_matches(result.trace_sigma_g, torch.trace(sigma @ gauss_newton), rtol=1e-10)
    assert_matches(result.loss, loss, rtol=1e-12)
    assert_matches(result.gn_frobenius, torch.linalg.matrix_norm(gauss_newton), rtol=1e-10)
    assert (result.num_samples, result.num_outputs, result.method, result.stderr) == (
        12,
        num_outputs,
        "exact",
        0.0,
    )
    # The panel-by-panel K (J never stored) gives the same numbers.
    assert alignment(problem, max_jacobian_entries=100, hessian=False).mu == pytest.approx(
        result.mu, rel=1e-12
    )


@pytest.mark.parametrize("num_outputs", [1, 3])
def test_worst_case_alignment_equals_its_definition(num_outputs):
    problem = _mlp_problem(num_outputs, n=6)  # p = 31 + 6C > nC: K is full rank
    result = alignment(problem, hessian=False)
    assert_matches(result.mu_min, dense_worst_case_alignment(problem), rtol=1e-8, atol=1e-12)
    assert 0 <= result.mu_min <= result.mu


def test_worst_case_alignment_is_restricted_to_the_range_of_k():
    # A linear model with p = 3 < n = 8: K has rank 3, and residuals live in its range.
    torch.manual_seed(3)
    model = torch.nn.Linear(3, 1, bias=False).double()
    inputs = torch.randn(8, 3, dtype=torch.float64)
    problem = Problem(model, inputs, torch.zeros(8, 1, dtype=torch.float64))
    jacobian = inputs
    basis = torch.linalg.svd(jacobian, full_matrices=False).U  # orthonormal basis of range(K)
    gram = jacobian @ jacobian.T
    square = gram @ gram
    restricted = basis.T @ (8 * torch.diag(square.diagonal()) - square) @ basis
    expected = torch.linalg.eigvalsh(restricted)[0] / gram.pow(2).sum()
    result = alignment(problem)
    assert result.mu_min == pytest.approx(expected.item(), rel=1e-8)
    # Every residual direction in range(K) has mu >= mu_min; with targets 0 the residual is X theta.
    for seed in range(5):
        torch.manual_seed(seed)
        model.weight.data = torch.randn(1, 3, dtype=torch.float64)
        assert alignment(problem).mu >= result.mu_min - 1e-12


@pytest.mark.parametrize("sketch_size", [0, 4])
@pytest.mark.parametrize("num_outputs", [1, 3])
def test_stochastic_alignment_within_four_standard_errors_of_exact(num_outputs, sketch_size):
    problem = _mlp_problem(num_outputs, n=16, chunk_size=16)
    exact = alignment(problem)
    estimate = alignment(
        problem, method="stochastic", num_probes=200, seed=0, hessian=True, sketch_size=sketch_size
    )
    assert estimate.method == "stochastic" and estimate.mu_min is None and estimate.num_probes == 200
    assert 0 < estimate.stderr < 0.2 * exact.mu
    assert abs(estimate.mu - exact.mu) <= 4 * estimate.stderr
    assert abs(estimate.mu_hessian - exact.mu_hessian) <= 4 * estimate.mu_hessian_stderr
    assert estimate.loss == pytest.approx(exact.loss, rel=1e-12)
    again = alignment(
        problem, method="stochastic", num_probes=200, seed=0, hessian=True, sketch_size=sketch_size
    )
    assert (again.mu, again.mu_hessian) == (estimate.mu, estimate.mu_hessian)


@pytest.mark.slow
@pytest.mark.parametrize("sketch_size", [0, 3])
def test_stochastic_standard_error_matches_the_spread_over_seeds(sketch_size):
    problem = _mlp_problem(1, n=10, chunk_size=10)
    estimates = [
        alignment(problem, method="stochastic", num_probes=30, seed=s, sketch_size=sketch_size)
        for s in range(20)
    ]
    spread = torch.tensor([e.mu for e in estimates]).std().item()
    typical = sum(e.stderr for e in estimates) / len(estimates)
    assert 0.5 * spread < typical < 2 * spread


def test_a_sketch_spanning_sample_space_makes_the_stochastic_path_exact():
    problem = _mlp_problem(3, n=5, chunk_size=5)
    estimate = alignment(problem, method="stochastic", num_probes=3, sketch_size=15)
    assert estimate.mu == pytest.approx(alignment(problem).mu, rel=1e-9)
    assert estimate.stderr < 1e-9 * estimate.mu


def test_alignment_does_not_depend_on_the_scale_of_the_residuals():
    problem = _mlp_problem(3)
    outputs = problem.outputs()
    direction = outputs - problem.targets
    values = []
    for scale in (1e-3, 1.0, 1e3):
        scaled = problem.with_targets(outputs - scale * direction)
        values.append(alignment(scaled, hessian=False).mu)
    assert values == pytest.approx([values[1]] * 3, rel=1e-9)


@pytest.mark.slow
def test_alignment_of_a_linear_model_approaches_the_population_closed_form():
    # f = theta^T x, x ~ N(0, S), noiseless teacher: mu -> 1 + d^T S^3 d / (d^T S d ||S||_F^2) (SPEC.md section 2).
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([2.0, 1.0, 0.5, 0.3], dtype=torch.float64)
    covariance = torch.diag(scales**2)
    teacher = torch.randn(4, 1, generator=generator, dtype=torch.float64)
    theta = torch.randn(4, 1, generator=generator, dtype=torch.float64)
    d = (theta - teacher)[:, 0]
    population = 1 + (d @ covariance.matrix_power(3) @ d) / ((d @ covariance @ d) * covariance.pow(2).sum())
    assert 1 <= population <= 1 + scales.max() ** 4 / covariance.pow(2).sum()
    samples = []
    for _ in range(16):
        inputs = torch.randn(1000, 4, generator=generator, dtype=torch.float64) * scales
        model = torch.nn.Linear(4, 1, bias=False).double()
        model.weight.data = theta.T.clone()
        samples.append(alignment(Problem(model, inputs, inputs @ teacher), worst_case=False).mu)
    samples = torch.tensor(samples)
    stderr = samples.std() / math.sqrt(len(samples))
    assert abs(samples.mean() - population) <= 4 * stderr


def test_deep_linear_network_alignment_is_at_least_one():
    # Scalar output, Gaussian inputs: Sigma - 2 L G is PSD in the population, so mu >= 1. These draws
    # give 1.12-1.15 at n = 1000; the 0.15 slack covers the finite-sample spread (about 0.1 across
    # draws at this n). Scalar output matters: with C = 2 outputs mu ~ 0.5-0.6 even at n = 2000.
    generator = torch.Generator().manual_seed(1)
    for seed in range(3):
        torch.manual_seed(seed)
        network = torch.nn.Sequential(
            torch.nn.Linear(6, 8, bias=False),
            torch.nn.Linear(8, 8, bias=False),
            torch.nn.Linear(8, 1, bias=False),
        ).double()
        inputs = torch.randn(1000, 6, generator=generator, dtype=torch.float64)
        teacher = torch.randn(6, 1, generator=generator, dtype=torch.float64)
        result = alignment(Problem(network, inputs, inputs @ teacher), worst_case=False, hessian=False)
        assert result.mu >= 1 - 0.15


def test_random_feature_alignment_does_not_fall_as_features_grow():
    # f = a^T tanh(W x) / sqrt(m) with W fixed: only a is trained, so J = the feature matrix.
    n, seeds = 100, range(6)

    def mean_and_stderr(width):
        values = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            inputs = torch.randn(n, 10, generator=generator, dtype=torch.float64)
            weights = torch.randn(10, width, generator=generator, dtype=torch.float64) / math.sqrt(10)
            features = torch.tanh(inputs @ weights)
            readout = torch.nn.Linear(width, 1, bias=False).double()
            readout.weight.data = torch.randn(1, width, generator=generator, dtype=torch.float64) / math.sqrt(
                width
            )
            problem = Problem(readout, features, torch.sin(2 * inputs[:, :1]))
            values.append(alignment(problem, worst_case=False, hessian=False).mu)
        values = torch.tensor(values)
        return values.mean().item(), (values.std() / math.sqrt(len(values))).item()

    narrow, narrow_err = mean_and_stderr(100)
    wide, wide_err = mean_and_stderr(10000)
    assert wide >= 0.5
    assert wide >= narrow - 4 * math.hypot(narrow_err, wide_err)


def test_alignment_refuses_cross_entropy():
    model = torch.nn.Linear(3, 4).double()
    inputs, labels = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    problem = Problem(model, inputs, labels, loss="cross_entropy")
    with pytest.raises(ProblemError, match="square loss"):
        alignment(problem)


def test_alignment_refuses_bad_arguments_and_oversized_k():
    problem = _mlp_problem(3)
    with pytest.raises(ValueError, match="method must be one of"):
        alignment(problem, method="dense")
    with pytest.raises(ValueError, match="num_probes"):
        alignment(problem, method="stochastic", num_probes=1)
    with pytest.raises(ValueError, match="sketch_size"):
        alignment(problem, method="stochastic", sketch_size=-1)
    with pytest.raises(MemoryError, match='method="stochastic"'):
        alignment(problem, max_gram_entries=100)


def test_alignment_is_nan_with_zero_residuals_but_the_worst_case_stands():
    problem = _mlp_problem(1)
    interpolating = problem.with_targets(problem.outputs())
    result = alignment(interpolating, hessian=False)
    assert math.isnan(result.mu) and result.loss == 0
    assert result.mu_min > 0
    estimate = alignment(interpolating, method="stochastic", num_probes=4, hessian=True)
    assert math.isnan(estimate.mu) and math.isnan(estimate.stderr) and math.isnan(estimate.mu_hessian)
