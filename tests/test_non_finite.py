"""Non-finite data never gets a number (reliability review #75-#78): every entry point that would
compute a spectrum or a verdict raises DataError naming what is NaN or inf (``Problem.check_finite``)."""

import math

import pytest
import torch

import sgdstab
from reference import all_data
from sgdstab import DataError, Problem


def _problem(corrupt: str) -> Problem:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    inputs = torch.randn(8, 3, dtype=torch.float64)
    targets = torch.randn(8, 1, dtype=torch.float64)
    if corrupt == "inputs":
        inputs[5, 0] = math.nan
    elif corrupt == "targets":
        targets[7, 0] = math.nan
    return Problem(model, inputs, targets, chunk_size=3)


CALLS = {
    "alignment exact": lambda p: sgdstab.alignment(p),
    "alignment stochastic": lambda p: sgdstab.alignment(p, method="stochastic", num_probes=4),
    "stability": lambda p: sgdstab.stability(p, lr=0.1, batch_size=2),
    "simulation": lambda p: sgdstab.simulate_linearized_sgd(p, 0.1, 2, num_steps=2, num_chains=4),
    "trace of H": lambda p: sgdstab.trace(sgdstab.hessian(p), num_probes=4),
    "frobenius of Sigma": lambda p: sgdstab.frobenius_norm(sgdstab.noise_covariance(p), num_probes=4),
    "top eigenvalues of H": lambda p: sgdstab.top_eigenvalues(sgdstab.hessian(p), k=2),
    "density of H": lambda p: sgdstab.spectral_density(sgdstab.hessian(p), num_probes=2, num_steps=4),
    "G product": lambda p: sgdstab.gauss_newton(p) @ torch.ones(p.num_params, dtype=torch.float64),
    "K product": lambda p: sgdstab.ntk(p) @ torch.ones(8, dtype=torch.float64),
}


@pytest.mark.parametrize("corrupt,sample", [("inputs", 5), ("targets", 7)])
@pytest.mark.parametrize("call", CALLS)
def test_non_finite_data_raises_a_data_error_naming_it(call, corrupt, sample):
    with pytest.raises(DataError, match=f"the {corrupt} hold NaN or inf.*first is sample {sample}"):
        CALLS[call](_problem(corrupt))


def test_finite_data_passes_and_overflowing_outputs_are_named():
    problem = _problem("none")
    problem.check_finite()
    inputs, targets = all_data(problem)
    huge = Problem(torch.nn.Linear(3, 1).double(), inputs.abs() + 1.0, targets)
    with torch.no_grad():
        huge.model.weight.fill_(1e308)
    with pytest.raises(DataError, match="outputs are NaN or inf"):
        sgdstab.alignment(huge)
