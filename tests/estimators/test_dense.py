import math

import pytest
import torch
from known_spectra import with_spectrum

from sgdstab.estimators import exact_eigenvalues, exact_frobenius_norm, exact_spectral_density, exact_trace

SPECTRUM = torch.tensor([4.0, -2.5, 1.0, 1.0, 0.0, 3.0, -0.5, 2.0], dtype=torch.float64)
OP = with_spectrum(SPECTRUM, seed=0)


@pytest.mark.parametrize(
    "k, which, expected",
    [
        (3, "largest", [4.0, 3.0, 2.0]),
        (2, "smallest", [-2.5, -0.5]),
        (2, "both", [4.0, 3.0, -0.5, -2.5]),
        (8, "largest", [4.0, 3.0, 2.0, 1.0, 1.0, 0.0, -0.5, -2.5]),
    ],
)
def test_eigenvalues_are_the_known_spectrum_in_documented_order(k, which, expected):
    result = exact_eigenvalues(OP, k=k, which=which)
    assert torch.allclose(result.values, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    actual = (OP.matrix @ result.vectors - result.vectors * result.values).norm(dim=0)
    assert torch.all(actual < 1e-12) and torch.allclose(result.residual_norms, actual)
    assert result.converged and result.num_matvecs == 8


def test_trace_and_frobenius_norm_are_exact():
    trace = exact_trace(OP)
    assert trace.value == pytest.approx(float(SPECTRUM.sum()), abs=1e-12)
    assert (trace.stderr, trace.num_matvecs) == (0.0, 8)
    frobenius = exact_frobenius_norm(OP)
    assert frobenius.squared == pytest.approx(float(SPECTRUM.pow(2).sum()), abs=1e-12)
    assert frobenius.value == pytest.approx(math.sqrt(float(SPECTRUM.pow(2).sum())), abs=1e-12)
    assert (frobenius.stderr, frobenius.squared_stderr, frobenius.num_matvecs) == (0.0, 0.0, 8)


def test_spectral_density_has_unit_mass_and_the_spectrum_moments():
    sigma = 0.2
    result = exact_spectral_density(OP, sigma=sigma, num_grid=2000)
    assert float(torch.trapezoid(result.density, result.grid)) == pytest.approx(1.0, abs=1e-6)
    mean = float(torch.trapezoid(result.density * result.grid, result.grid))
    second = float(torch.trapezoid(result.density * result.grid**2, result.grid))
    assert mean == pytest.approx(float(SPECTRUM.mean()), abs=1e-6)
    assert second == pytest.approx(float(SPECTRUM.pow(2).mean()) + sigma**2, abs=1e-5)
    assert torch.allclose(result.nodes.sort().values, SPECTRUM.sort().values, atol=1e-12)
    assert torch.allclose(result.weights, torch.full((8,), 1 / 8, dtype=torch.float64))


@pytest.mark.parametrize("k, which", [(0, "largest"), (9, "largest"), (5, "both"), (1, "top")])
def test_bad_input_raises_value_error(k, which):
    with pytest.raises(ValueError):
        exact_eigenvalues(OP, k=k, which=which)
