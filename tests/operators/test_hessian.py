"""HessianOperator against torch.func.hessian of the loss written out (tests/reference.py)."""

import pytest
import torch
from torch import nn

import sgdstab
from reference import assert_matches, dense_hessian, tiny_network_problem
from sgdstab.operators import HESSIAN_BACKENDS, hessian


@pytest.mark.parametrize("backend", HESSIAN_BACKENDS)
def test_hessian_matches_torch_func(architecture, loss_name, backend):
    problem = tiny_network_problem(architecture, loss_name)
    assert_matches(
        hessian(problem, backend=backend).to_dense(), dense_hessian(problem), rtol=1e-5, atol=1e-12
    )


def test_linear_regression_hessian_is_gram_of_inputs():
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    targets = torch.randn(50, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    problem = sgdstab.Problem(model, inputs, targets, chunk_size=16)
    assert_matches(hessian(problem).to_dense(), inputs.T @ inputs / 50, rtol=1e-5, atol=1e-13)


def test_operator_at_given_theta_differs_from_current_parameters():
    problem = tiny_network_problem("mlp", "mse")
    shifted = problem.parameters() + 0.3
    truth = dense_hessian(problem, theta=shifted)
    assert_matches(hessian(problem, theta=shifted).to_dense(), truth, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("cache_graph", [True, False])
def test_hessian_with_cached_graph_matches_and_stays_correct_over_calls(cache_graph):
    problem = tiny_network_problem("cnn", "mse", chunk_size=3)
    truth = dense_hessian(problem)
    operator = hessian(problem, cache_graph=cache_graph)
    probes = torch.randn(problem.num_params, 2, dtype=torch.float64)
    for _ in range(2):  # the second call reuses the cached graphs
        assert_matches(operator @ probes, truth @ probes, rtol=1e-5, atol=1e-12)


def test_cache_graph_needs_double_backward():
    with pytest.raises(ValueError, match="double_backward"):
        hessian(tiny_network_problem("mlp", "mse"), backend="forward_over_reverse", cache_graph=True)
