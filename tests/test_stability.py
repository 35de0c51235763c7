"""Linear stability of SGD (SPEC.md section 3) against enumerated batches, the parameter-space
Kronecker operator and Monte Carlo runs of linearised SGD."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from reference import (
    all_data,
    assert_matches,
    dense_gauss_newton,
    dense_gram,
    dense_worst_case_alignment,
    kronecker_second_moment,
    kronecker_threshold,
    largest_crossing,
    per_sample_curvatures,
    spectral_radius,
)
from sgdstab import DataError, InputError, Problem, ProblemError
from sgdstab.sample_space import gram_spectrum
from sgdstab.stability import (
    CRITERIA,
    KINDS,
    STABILITY_CRITERIA,
    SecondMomentMap,
    batch_noise_factor,
    criteria_of_kind,
    escape_factor,
    escape_learning_rate,
    frobenius_bound,
    frobenius_criterion,
    gd_threshold,
    second_moment,
    simulate_linearized_sgd,
    stability,
    trace_threshold,
)

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


def test_batch_noise_factor():
    assert batch_noise_factor(10, 4, "with_replacement") == pytest.approx(0.25)
    assert batch_noise_factor(10, 4, "without_replacement") == pytest.approx(6 / 36)
    assert batch_noise_factor(10, 1, "without_replacement") == pytest.approx(1.0)
    assert batch_noise_factor(10, 10, "without_replacement") == 0.0
    assert batch_noise_factor(10, 10, "with_replacement") == pytest.approx(0.1)


@pytest.mark.parametrize("kernel_dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("num_outputs", [1, 2, 3])
def test_second_moment_map_equals_expectation_over_every_batch(sampling, num_outputs, kernel_dtype, rtol):
    n, batch, lr = 4, 2, 0.3
    problem = _minimum(0, n, num_outputs, hidden=4)  # p = 12 + 5C > nC: K is full rank
    gram = dense_gram(problem)
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
    second_moment = SecondMomentMap(
        gram_spectrum(gram, num_outputs), batch_noise_factor(n, batch, sampling), kernel_dtype=kernel_dtype
    )
    scale = expected.abs().max().item()
    assert_matches(second_moment.sample_space_step(moment, lr), expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("num_outputs,n", [(1, 9), (2, 6)])
def test_products_in_single_precision_keep_threshold_and_growth(num_outputs, n):
    # float32 products of D (its cost) on a float64 spectrum, against the float64 Kronecker
    # truth: measured errors up to 7e-8 relative.
    problem = _minimum(2, n, num_outputs, hidden=5 - 2 * num_outputs)
    batch_noise = batch_noise_factor(n, 2, "with_replacement")
    second_moment = SecondMomentMap(
        gram_spectrum(dense_gram(problem), num_outputs), batch_noise, kernel_dtype=torch.float32
    )
    kronecker = kronecker_second_moment(problem, batch_noise)
    expected = kronecker_threshold(problem, batch_noise)
    assert_matches(second_moment.threshold(), expected, rtol=1e-6)
    for fraction in (0.2, 0.9, 1.1):
        lr = fraction * expected
        assert_matches(second_moment.spectral_radius(lr), spectral_radius(kronecker(lr)), rtol=1e-6)


def test_products_default_to_the_precision_k_was_computed_in():
    gram = dense_gram(_minimum(2, 5, 1))
    for dtype in (torch.float32, torch.float64):
        spectrum = gram_spectrum(gram.to(dtype), 1)
        assert spectrum.source_dtype == dtype and spectrum.values.dtype == torch.float64
        assert SecondMomentMap(spectrum, 0.5)._kernel_factors.dtype == dtype


@pytest.mark.parametrize("solver", ["dense", "lanczos"])
@pytest.mark.parametrize("sampling,batch", [("with_replacement", 2), ("without_replacement", 3)])
@pytest.mark.parametrize("num_outputs,n", [(1, 9), (2, 6)])
def test_threshold_and_growth_equal_the_parameter_space_kronecker_operator(
    solver, sampling, batch, num_outputs, n
):
    # p = 13 (C=1) or 12 (C=2): p^2 x p^2 stays small.
    problem = _minimum(2, n, num_outputs, hidden=5 - 2 * num_outputs)
    batch_noise = batch_noise_factor(n, batch, sampling)
    second_moment = SecondMomentMap(
        gram_spectrum(dense_gram(problem), num_outputs), batch_noise, solver=solver
    )
    kronecker = kronecker_second_moment(problem, batch_noise)
    expected = kronecker_threshold(problem, batch_noise)
    assert_matches(second_moment.threshold(), expected, rtol=1e-9)
    for fraction in (0.2, 0.9, 1.1, 3.0):
        lr = fraction * expected
        assert_matches(second_moment.spectral_radius(lr), spectral_radius(kronecker(lr)), rtol=1e-10)
    result = stability(problem, lr=0.1, batch_size=batch, sampling=sampling)
    assert_matches(result.thresholds["exact"], expected, rtol=1e-9)
    assert_matches(result.growth_factor, spectral_radius(kronecker(0.1)), rtol=1e-10)


def test_svec_is_an_isometry_of_symmetric_matrices():
    torch.manual_seed(4)
    space = second_moment._SymmetricMatrixSpace(5, torch.float64, torch.device("cpu"))
    first, second = torch.randn(2, 5, 5, dtype=torch.float64)
    first, second = first + first.T, second + second.T
    assert space.pack(first).shape == (15,)
    assert_matches(space.unpack(space.pack(first)), first, rtol=0, atol=1e-15)
    assert_matches(space.pack(first) @ space.pack(second), (first * second).sum(), rtol=1e-14)


@pytest.mark.parametrize("basis", [3, 12])
def test_lanczos_with_restarts_matches_the_dense_solver(monkeypatch, basis):
    # r = 16: the Lanczos path runs on 136 free entries; a basis of 3 forces explicit restarts.
    monkeypatch.setattr(second_moment, "_LANCZOS_BASIS", basis)
    problem = _minimum(5, 8, 2, hidden=5)
    spectrum = gram_spectrum(dense_gram(problem), 2)
    batch_noise = batch_noise_factor(8, 3, "with_replacement")
    lanczos = SecondMomentMap(spectrum, batch_noise, solver="lanczos")
    dense = SecondMomentMap(spectrum, batch_noise, solver="dense")
    assert lanczos.rank == 16
    assert_matches(lanczos.threshold(), dense.threshold(), rtol=1e-10)
    for fraction in (0.5, 0.99, 1.5):
        lr = fraction * dense.threshold()
        assert_matches(lanczos.spectral_radius(lr), dense.spectral_radius(lr), rtol=1e-10)


def test_an_unknown_eigen_solver_is_refused():
    spectrum = gram_spectrum(dense_gram(_minimum(2, 5, 1)), 1)
    with pytest.raises(InputError, match="solver must be one of"):
        SecondMomentMap(spectrum, 0.5, solver="arpack")


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

    # The chain averages follow tr(T^t(N_0)) / (2n) with N_0 = E[u_0 u_0^T] = K. SecondMomentMap is
    # the truth here because it is checked against every batch enumerated above.
    gram = dense_gram(problem)
    second_moment = SecondMomentMap(gram_spectrum(gram, 1), 0.5)
    for simulation in (decaying, growing):
        moment = gram
        for step in range(1, 9):
            moment = second_moment.sample_space_step(moment, simulation.lr)
            predicted = moment.trace().item() / (2 * 8)
            assert (
                abs(simulation.loss_mean[step].item() - predicted) <= 4 * simulation.loss_stderr[step].item()
            )


@pytest.fixture(scope="module")
def random_minima_results():
    """stability() on a few random interpolating minima, for both samplings."""
    cases = [(10, 1, 1), (10, 1, 3), (6, 2, 2), (8, 3, 4), (12, 1, 6)]
    return {
        sampling: [
            stability(_minimum(seed, n, outputs, hidden=5), lr=0.01, batch_size=batch, sampling=sampling)
            for seed, (n, outputs, batch) in enumerate(cases)
        ]
        for sampling in SAMPLINGS
    }


def test_the_registry_describes_every_threshold(random_minima_results):
    assert CRITERIA == tuple(STABILITY_CRITERIA) and criteria_of_kind("exact") == ("exact",)
    for name, criterion in STABILITY_CRITERIA.items():
        assert criterion.name == name and criterion.kind in KINDS and criterion.citation
    for results in random_minima_results.values():
        assert all(tuple(result.thresholds) == CRITERIA for result in results)
    with pytest.raises(ValueError, match="kind must be one of"):
        criteria_of_kind("optional")


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("name", criteria_of_kind("necessary"))
def test_the_exact_threshold_lies_below_every_necessary_criterion(random_minima_results, sampling, name):
    for result in random_minima_results[sampling]:
        assert result.thresholds["exact"] <= result.thresholds[name] * (1 + 1e-9)


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("name", criteria_of_kind("sufficient"))
def test_every_sufficient_criterion_lies_below_the_exact_threshold(random_minima_results, sampling, name):
    for result in random_minima_results[sampling]:
        assert result.thresholds[name] <= result.thresholds["exact"] * (1 + 1e-9)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_mulayoff24_refines_15_which_refines_gd(random_minima_results, sampling):
    for result in random_minima_results[sampling]:
        thresholds = result.thresholds
        assert thresholds["mulayoff24"] <= thresholds["mulayoff15"] * (1 + 1e-9)
        assert thresholds["mulayoff15"] <= thresholds["gd"] * (1 + 1e-9)


def test_frobenius_bound_criterion_and_escape_factor_are_one_inequality_read_three_ways():
    # Wu, Wang & Su (2022): eta^2 p_B mu ||H||_F^2 = 1 on the edge, read as a bound on ||H||_F
    # (the paper's sqrt(B/mu)/eta with replacement) or on eta.
    lr, batch, mu, frobenius = 0.05, 8, 0.7, 12.0
    assert frobenius_bound(lr, 1 / batch, mu) == pytest.approx(math.sqrt(batch / mu) / lr, rel=1e-14)
    edge = frobenius_criterion(frobenius, 1 / batch, mu)
    assert escape_factor(edge, frobenius, 1 / batch, mu) == pytest.approx(1.0, rel=1e-14)
    assert frobenius_bound(edge, 1 / batch, mu) == pytest.approx(frobenius, rel=1e-14)
    assert escape_learning_rate(4.0, frobenius, 1 / batch, mu) == pytest.approx(2 * edge, rel=1e-14)
    assert frobenius_bound(lr, 0.0, mu) == frobenius_criterion(frobenius, 1 / batch, 0.0) == math.inf
    assert gd_threshold(4.0) == 0.5 and trace_threshold(10.0, 0.25) == 0.8
    assert trace_threshold(10.0, 0.0) == math.inf


def test_escape_factor_bounds_the_one_step_growth_of_the_linearised_loss():
    problem = _minimum(4, 10, 2, hidden=6)
    lr, batch = 5.0, 2
    result = stability(problem, lr=lr, batch_size=batch)
    curvature_frobenius = torch.linalg.matrix_norm(dense_gauss_newton(problem)).item()
    expected = lr**2 * (1 / batch) * dense_worst_case_alignment(problem) * curvature_frobenius**2
    assert_matches(result.escape_factor, expected, rtol=1e-9)
    assert_matches(result.log_escape_rate, math.log(expected), rtol=1e-9)
    # SecondMomentMap is checked against every batch enumerated above: here it is the truth for T.
    gram = dense_gram(problem)
    second_moment = SecondMomentMap(gram_spectrum(gram, 2), result.batch_noise)
    torch.manual_seed(5)
    for _ in range(20):
        residual = gram @ torch.randn(20, dtype=torch.float64)  # in range(K)
        after = second_moment.sample_space_step(torch.outer(residual, residual), lr).trace()
        assert after >= result.escape_factor * residual.pow(2).sum() * (1 - 1e-9)


def test_ingredients_match_dense_curvature():
    problem = _minimum(5, 7, 2, hidden=4)
    result = stability(problem, lr=0.2, batch_size=3, sampling="without_replacement")
    curvature = dense_gauss_newton(problem)
    eigenvalues = torch.linalg.eigvalsh(curvature)
    assert result.lambda_max == pytest.approx(eigenvalues[-1].item(), rel=1e-10)
    assert result.trace == pytest.approx(eigenvalues.sum().item(), rel=1e-10)
    assert result.hessian_frobenius == pytest.approx(torch.linalg.matrix_norm(curvature).item(), rel=1e-10)
    assert result.thresholds["gd"] == pytest.approx(2 / eigenvalues[-1].item(), rel=1e-10)
    assert result.batch_noise == pytest.approx(4 / 18)
    noise, n = 4 / 18, 7
    assert result.thresholds["trace"] == pytest.approx(2 / (noise * eigenvalues.sum().item()), rel=1e-10)
    # Mulayoff & Michaeli (2023) (15), (16) and Wu, Ma & E (2018) from dense per-sample H_i = J_i^T J_i.
    per_sample = per_sample_curvatures(problem)
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
    mu_min = dense_worst_case_alignment(problem)
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
        largest_crossing(one_step_excess, 2 / sharpness), rel=1e-8
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


def _with_data(problem: Problem, inputs: torch.Tensor, targets: torch.Tensor) -> Problem:
    return Problem(problem.model, inputs, targets)


def test_nan_targets_get_no_verdict():
    # Reliability review #76: a NaN target gave growth_factor 125.2, stable False, loss nan.
    problem = _minimum(11, 8, 1)
    inputs, targets = all_data(problem)
    targets[7] = math.nan
    corrupted = _with_data(problem, inputs, targets)
    with pytest.raises(DataError, match="targets hold NaN or inf.*sample 7"):
        stability(corrupted, lr=0.1, batch_size=4)
    with pytest.raises(DataError, match="targets"):
        simulate_linearized_sgd(corrupted, 0.1, 4, num_steps=2, num_chains=4)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_inputs_are_named_not_diagnosed_as_a_zero_ntk(value):
    # Reliability review #75: NaN/inf inputs were reported as "K = J J^T is zero".
    problem = _minimum(12, 6, 1)
    inputs, targets = all_data(problem)
    inputs[2, 1] = value
    with pytest.raises(DataError, match="inputs hold NaN or inf.*sample 2"):
        stability(_with_data(problem, inputs, targets), lr=0.1, batch_size=2)


def test_diverged_weights_are_named_not_diagnosed_as_a_zero_ntk():
    # Reliability review #46: the NaN weights of a diverged run gave "K = J J^T is zero".
    problem = _minimum(13, 6, 1)
    with torch.no_grad():
        problem.model[0].weight[0, 0] = math.nan
    with pytest.raises(DataError, match="1 of the 13 parameters are NaN or inf: the weights diverged"):
        stability(problem, lr=0.1, batch_size=2)
    with pytest.raises(DataError, match="parameters are NaN"):
        simulate_linearized_sgd(problem, 0.1, 2, num_steps=2, num_chains=4)


def test_one_precomputed_spectrum_serves_stability_simulation_and_alignment():
    # The callers that analyse one point several times (experiments, the monitor) build K once.
    from sgdstab.alignment import alignment
    from sgdstab.sample_space import build_gram_spectrum

    problem = _minimum(12, 7, 2)
    spectrum = build_gram_spectrum(problem)
    assert stability(problem, lr=0.3, batch_size=3, spectrum=spectrum) == stability(
        problem, lr=0.3, batch_size=3
    )
    given = simulate_linearized_sgd(problem, 0.3, 3, num_steps=4, num_chains=20, spectrum=spectrum)
    rebuilt = simulate_linearized_sgd(problem, 0.3, 3, num_steps=4, num_chains=20)
    torch.testing.assert_close(given.loss_mean, rebuilt.loss_mean, rtol=0, atol=0)
    noisy = Problem(problem.model, all_data(problem)[0], all_data(problem)[1] + 0.1)
    assert alignment(noisy, hessian=False, spectrum=spectrum) == alignment(noisy, hessian=False)
    with pytest.raises(InputError, match="n=7 samples x C=2 outputs"):
        stability(_minimum(12, 6, 2), lr=0.3, batch_size=3, spectrum=spectrum)
    with pytest.raises(InputError, match='method="exact" only'):
        alignment(noisy, method="stochastic", spectrum=spectrum)
