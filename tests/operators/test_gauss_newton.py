"""GaussNewtonOperator against J^T Lambda J / n from a dense Jacobian (tests/reference.py)."""

import torch
from torch import nn

from reference import all_data, assert_matches, dense_gauss_newton, tiny_network_problem
from sgdstab.operators import gauss_newton, hessian
from sgdstab.problem import output_hessian


def test_gauss_newton_matches_jacobian_formula(architecture, loss_name):
    problem = tiny_network_problem(architecture, loss_name)
    assert_matches(gauss_newton(problem).to_dense(), dense_gauss_newton(problem), rtol=1e-5, atol=1e-12)


def test_cross_entropy_output_hessian_is_second_derivative_of_the_loss():
    """The Lambda_i the operator uses for cross-entropy, against torch.func.hessian of the loss."""
    logits = torch.randn(4, 3, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1])

    def loss_of_sample(label):
        return lambda f: nn.functional.cross_entropy(f[None], label[None])

    truth = torch.stack([torch.func.hessian(loss_of_sample(labels[i]))(logits[i]) for i in range(4)])
    assert_matches(output_hessian("cross_entropy", logits), truth, rtol=1e-5, atol=1e-12)


def test_gauss_newton_equals_hessian_at_interpolation():
    problem = tiny_network_problem("mlp", "mse")
    inputs, _ = all_data(problem)
    problem = problem.with_targets(
        problem.forward(problem.parameters(), inputs).detach()
    )  # residuals are zero
    assert_matches(gauss_newton(problem).to_dense(), hessian(problem).to_dense(), rtol=1e-5, atol=1e-12)
