"""HessianOperator against torch.func.hessian of the loss written out (tests/reference.py)."""

import gc
import weakref

import pytest
import torch
from torch import nn

import sgdstab
from reference import all_data, assert_matches, dense_hessian, dense_loss, tiny_network_problem
from sgdstab.estimators import power_iteration, top_eigenvalues
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


def test_an_estimator_keeps_the_graph_while_it_runs_and_frees_it_on_return():
    problem = tiny_network_problem("mlp", "mse")
    truth = dense_hessian(problem)
    operator = hessian(problem)
    operator @ torch.ones(problem.num_params, dtype=torch.float64)
    assert operator.kept_graph_bytes == 0  # a bare product keeps nothing
    with operator.many_products():
        first = operator @ torch.eye(problem.num_params, dtype=torch.float64)[:, :2]
        assert operator.kept_graph_bytes > 0
        kept_gradient = weakref.ref(operator._kept_graphs[0][1])
        assert_matches(operator @ truth[:, :3], truth @ truth[:, :3], rtol=1e-5, atol=1e-12)
    assert_matches(first, truth[:, :2], rtol=1e-5, atol=1e-12)
    gc.collect()
    assert operator.kept_graph_bytes == 0 and kept_gradient() is None

    result = top_eigenvalues(operator, k=2, tol=1e-10)
    assert_matches(result.values, torch.linalg.eigvalsh(truth).flip(0)[:2], rtol=1e-8)
    assert operator.kept_graph_bytes == 0


def test_a_second_estimator_call_sees_parameters_changed_in_between():
    # theta is the first layer; the second, frozen layer is changed in place between two calls
    # on one operator, which a graph kept from the first call would not see.
    problem = tiny_network_problem("mlp", "mse")
    problem = sgdstab.Problem(problem.model, *all_data(problem), params=["0"], chunk_size=3)
    operator = hessian(problem)
    for shift in (0.0, 0.5):
        with torch.no_grad():
            problem.model[2].weight.add_(shift)
        spectrum = torch.linalg.eigvalsh(dense_hessian(problem))
        assert_matches(top_eigenvalues(operator, k=2, tol=1e-10).values, spectrum.flip(0)[:2], rtol=1e-8)
        dominant = power_iteration(operator, tol=1e-12, max_iter=5000).values[0]
        assert_matches(abs(float(dominant)), float(spectrum.abs().max()), rtol=1e-5)
        assert operator.kept_graph_bytes == 0


@pytest.mark.parametrize("budget_share", [0.0, 0.6, 1.0])
def test_graphs_kept_within_the_memory_budget_give_the_same_products(budget_share):
    problem = tiny_network_problem("cnn", "mse", chunk_size=3)  # chunks of 3, 3 and 1 samples
    truth = dense_hessian(problem)
    with hessian(problem).many_products() as measured:
        measured @ torch.zeros(problem.num_params, dtype=torch.float64)
        all_chunks_bytes = measured.kept_graph_bytes
    operator = hessian(problem, graph_memory_budget=int(budget_share * all_chunks_bytes))
    probes = torch.randn(
        problem.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    with operator.many_products():
        for _ in range(2):  # the first call keeps what fits, the second uses it and rebuilds the rest
            assert_matches(operator @ probes, truth @ probes, rtol=1e-5, atol=1e-12)
            kept = len(operator._kept_graphs)
    assert kept == 0 if budget_share == 0 else (kept == 3 if budget_share == 1 else 0 < kept < 3)
    assert operator.kept_graph_bytes == 0


def test_cache_graph_true_keeps_graphs_until_released():
    problem = tiny_network_problem("mlp", "mse")
    operator = hessian(problem, cache_graph=True)
    top_eigenvalues(operator, k=1)
    assert len(operator._kept_graphs) == 3 and operator.kept_graph_bytes > 0
    operator.release_graphs()
    assert operator._kept_graphs == [] and operator.kept_graph_bytes == 0


def test_preferred_direction_is_the_loss_gradient_only_while_graphs_are_kept():
    problem = tiny_network_problem("cnn", "cross_entropy")
    operator = hessian(problem)
    assert operator.preferred_direction() is None  # outside a block it would cost a pass
    with operator.many_products():
        gradient = torch.func.grad(dense_loss(problem))(problem.parameters())
        assert_matches(operator.preferred_direction(), gradient, rtol=1e-8, atol=1e-14)
        assert operator.kept_graph_bytes > 0  # built once, for the products that follow
    assert hessian(problem, backend="forward_over_reverse").preferred_direction() is None
