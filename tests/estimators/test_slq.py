import math

import pytest
import torch
from known_spectra import hessian_like_spectrum, hutchinson_variance, with_spectrum

from sgdstab.estimators import exact_spectral_density, spectral_density
from sgdstab.operators import DenseOperator

SPECTRUM = hessian_like_spectrum(300)
OP = with_spectrum(SPECTRUM, seed=0)


def integral(result):
    return float(torch.trapezoid(result.density, result.grid))


def test_density_integrates_to_one_and_weights_sum_to_one():
    result = spectral_density(OP, num_probes=4, num_steps=30)
    assert integral(result) == pytest.approx(1.0, abs=1e-3)
    assert float(result.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert result.num_matvecs == 4 * 30
    assert result.density.shape == result.grid.shape == (1000,)


@pytest.mark.parametrize("seed", [0, 1])
def test_moments_match_trace_and_frobenius_within_four_standard_errors(seed):
    """The rule's mean is the Hutchinson estimate of tr(A)/d and its second moment that of
    ||A||_F^2 / d, whose variances are known (Avron and Toledo 2011)."""
    num_probes, d = 8, OP.size
    result = spectral_density(OP, num_probes=num_probes, num_steps=20, seed=seed)
    mean = float((result.weights * result.nodes).sum())
    second = float((result.weights * result.nodes**2).sum())
    mean_sd = math.sqrt(hutchinson_variance(OP.matrix) / num_probes) / d
    second_sd = math.sqrt(hutchinson_variance(OP.matrix @ OP.matrix) / num_probes) / d
    assert abs(mean - float(SPECTRUM.mean())) <= 4 * mean_sd
    assert abs(second - float(SPECTRUM.pow(2).mean())) <= 4 * second_sd


def test_smoothed_moments_add_sigma_squared():
    result = spectral_density(OP, num_probes=2, num_steps=20, sigma=0.5)
    mean = float(torch.trapezoid(result.density * result.grid, result.grid))
    second = float(torch.trapezoid(result.density * result.grid**2, result.grid))
    rule_mean = float((result.weights * result.nodes).sum())
    rule_second = float((result.weights * result.nodes**2).sum())
    assert mean == pytest.approx(rule_mean, abs=1e-3)
    assert second == pytest.approx(rule_second + 0.5**2, rel=1e-3)


def test_close_to_exact_density():
    sigma = 0.1
    estimate = spectral_density(OP, num_probes=20, num_steps=40, sigma=sigma)
    exact = exact_spectral_density(OP, sigma=sigma, grid=estimate.grid)
    l1_distance = float(torch.trapezoid((estimate.density - exact.density).abs(), estimate.grid))
    assert l1_distance < 0.15


def test_few_distinct_eigenvalues_give_exact_nodes():
    """With 3 distinct eigenvalues the Krylov space is exhausted after 3 steps: the rule's nodes
    are the eigenvalues, with weights near their multiplicity over d."""
    spectrum = torch.tensor([2.0] * 10 + [-1.0] * 20 + [0.5] * 30, dtype=torch.float64)
    result = spectral_density(with_spectrum(spectrum, seed=1), num_probes=40, num_steps=8)
    for value, multiplicity in [(2.0, 10), (-1.0, 20), (0.5, 30)]:
        near = (result.nodes - value).abs() < 1e-8
        assert float(result.weights[near].sum()) == pytest.approx(multiplicity / 60, abs=0.05)
    assert float(result.weights.sum()) == pytest.approx(1.0)


def test_steps_capped_at_dimension():
    result = spectral_density(with_spectrum(torch.arange(6.0), seed=2), num_probes=3, num_steps=50)
    assert result.num_matvecs == 3 * 6


def test_grid_sigma_and_batching_are_honoured():
    grid = torch.linspace(-1, 41, 50, dtype=torch.float64)
    batched = spectral_density(OP, num_probes=5, num_steps=10, sigma=0.3, grid=grid, block_size=2)
    assert batched.sigma == 0.3 and torch.equal(batched.grid, grid)
    assert batched.num_matvecs == 50


def test_same_seed_same_density_and_float32_kept():
    assert torch.equal(
        spectral_density(OP, 2, 10, seed=3).density, spectral_density(OP, 2, 10, seed=3).density
    )
    single = spectral_density(DenseOperator(OP.matrix.float()), num_probes=2, num_steps=10)
    assert single.density.dtype == single.nodes.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_probes": 0}, "num_probes must be a positive integer"),
        ({"num_steps": 0}, "num_steps must be a positive integer"),
        ({"sigma": 0.0}, "sigma must be"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spectral_density(OP, **kwargs)
