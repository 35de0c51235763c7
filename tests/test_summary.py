"""curvature_summary against the dense Hessian built by torch.func (the truth, not the code under test)."""

import pytest
import torch
from torch import nn

import sgdstab
from reference import all_data, dense_gauss_newton, dense_hessian, mu_by_definition
from sgdstab.summary import curvature_summary


@pytest.fixture(scope="module")
def problem():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    inputs = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    targets = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    return sgdstab.Problem(model, inputs, targets)


def test_summary_matches_dense_hessian(problem):
    hessian = dense_hessian(problem)
    eigenvalues = torch.linalg.eigvalsh(hessian).flip(0)
    summary = curvature_summary(problem, top_k=3, num_probes=100, seed=1, tol=1e-8)
    assert summary.lambda_max == pytest.approx(float(eigenvalues[0]), rel=1e-6)
    assert summary.top_eigenvalues == pytest.approx(eigenvalues[:3].tolist(), rel=1e-6)
    # Hutchinson estimates: within 4 of their own standard errors of the dense truth.
    assert abs(summary.trace - float(hessian.trace())) <= 4 * summary.trace_stderr
    assert abs(summary.frobenius - float(hessian.norm())) <= 4 * summary.frobenius_stderr
    inputs, targets = all_data(problem)
    direct_loss = 0.5 * (problem.forward(problem.parameters(), inputs) - targets).pow(2).sum() / 30
    assert summary.loss == pytest.approx(float(direct_loss), rel=1e-12)
    assert summary.num_params == problem.num_params and summary.num_samples == 30


def test_density_integrates_to_one_and_is_reproducible(problem):
    first = curvature_summary(problem, num_probes=20, seed=3)
    second = curvature_summary(problem, num_probes=20, seed=3)
    assert first == second
    grid, density = torch.tensor(first.density_grid), torch.tensor(first.density)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-3)
    assert first.to_dict()["frobenius"] == first.frobenius
    assert abs(first.frobenius - float(dense_hessian(problem).norm())) <= 4 * first.frobenius_stderr


def test_no_density_and_unknown_operator(problem):
    summary = curvature_summary(problem, num_probes=10, density=False, operator="gauss_newton", tol=1e-8)
    assert summary.density == () and summary.operator == "gauss_newton"
    assert summary.lambda_max == pytest.approx(
        float(torch.linalg.eigvalsh(dense_gauss_newton(problem))[-1]), rel=1e-6
    )
    with pytest.raises(ValueError, match="operator must be one of"):
        curvature_summary(problem, operator="fisher")


def test_alignment_matches_dense_sigma_and_gauss_newton(problem):
    # mu = tr(Sigma G) / (2 L ||G||_F^2) from per-sample Jacobians (SPEC.md sections 1-2).
    expected = mu_by_definition(problem)
    summary = curvature_summary(problem, num_probes=10, density=False, alignment="exact")
    assert summary.mu == pytest.approx(expected, rel=1e-8)
    assert 0 <= summary.mu_min <= summary.mu and summary.mu_stderr == 0
