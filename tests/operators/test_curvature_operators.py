"""Every operator against a dense float64 matrix built with torch.func (hessian, jacrev)."""

import pytest
import torch
from tiny_problems import all_inputs_targets, dense_loss, make_problem
from torch import nn

import sgdstab
from sgdstab.operators import HESSIAN_BACKENDS, gauss_newton, hessian, noise_covariance, ntk
from sgdstab.problem import output_hessian


def output_jacobian(problem):
    inputs, _ = all_inputs_targets(problem)
    theta = problem.parameters()
    return torch.func.jacrev(lambda t: problem.forward(t, inputs).reshape(len(inputs), -1))(theta)


@pytest.mark.parametrize("backend", HESSIAN_BACKENDS)
def test_hessian_matches_torch_func(architecture, loss_name, backend):
    problem = make_problem(architecture, loss_name)
    truth = torch.func.hessian(dense_loss(problem))(problem.parameters())
    assert torch.allclose(hessian(problem, backend=backend).to_dense(), truth, atol=1e-12)


def test_gauss_newton_matches_jacobian_formula(architecture, loss_name):
    problem = make_problem(architecture, loss_name)
    jac = output_jacobian(problem)  # (n, C, p)
    if loss_name == "mse":
        truth = torch.einsum("ncp,ncq->pq", jac, jac) / problem.num_samples
    else:
        inputs, _ = all_inputs_targets(problem)
        probs = torch.softmax(problem.forward(problem.parameters(), inputs), dim=-1)
        curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        truth = torch.einsum("ncp,ncd,ndq->pq", jac, curvature, jac) / problem.num_samples
    assert torch.allclose(gauss_newton(problem).to_dense(), truth, atol=1e-12)


def test_cross_entropy_output_hessian_is_second_derivative_of_the_loss():
    logits = torch.randn(4, 3, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1])
    truth = torch.stack(
        [
            torch.func.hessian(lambda f: nn.functional.cross_entropy(f[None], labels[i : i + 1]))(logits[i])
            for i in range(4)
        ]
    )
    assert torch.allclose(output_hessian("cross_entropy", logits), truth, atol=1e-12)


def test_gauss_newton_equals_hessian_at_interpolation():
    problem = make_problem("mlp", "mse")
    inputs, _ = all_inputs_targets(problem)
    problem = problem.with_targets(problem.forward(problem.parameters(), inputs).detach())  # residuals are zero
    assert torch.allclose(gauss_newton(problem).to_dense(), hessian(problem).to_dense(), atol=1e-12)


def test_noise_covariance_matches_per_sample_gradients(architecture, loss_name):
    problem = make_problem(architecture, loss_name)
    inputs, targets = all_inputs_targets(problem)
    per_sample = torch.func.jacrev(lambda t: problem.per_sample_losses(t, inputs, targets))(
        problem.parameters()
    )
    mean = per_sample.mean(0)
    truth = per_sample.T @ per_sample / problem.num_samples - torch.outer(mean, mean)
    assert torch.allclose(noise_covariance(problem).to_dense(), truth, atol=1e-12)


def test_ntk_is_gram_matrix_of_sample_major_jacobian(architecture):
    problem = make_problem(architecture, "mse")
    jac = output_jacobian(problem).reshape(-1, problem.num_params)
    kernel = ntk(problem)
    assert kernel.shape == (problem.num_samples * problem.num_outputs,) * 2
    assert torch.allclose(kernel.to_dense(), jac @ jac.T, atol=1e-12)


def test_ntk_identities_with_gauss_newton():
    """SPEC.md section 1: ||G||_F = ||K||_F / n, tr G = tr K / n, lambda_max(G) = lambda_max(K) / n."""
    problem = make_problem("mlp", "mse")
    n = problem.num_samples
    G, K = gauss_newton(problem).to_dense(), ntk(problem).to_dense()
    assert torch.isclose(torch.linalg.matrix_norm(G), torch.linalg.matrix_norm(K) / n)
    assert torch.isclose(G.trace(), K.trace() / n)
    assert torch.isclose(torch.linalg.eigvalsh(G)[-1], torch.linalg.eigvalsh(K)[-1] / n)


@pytest.mark.parametrize("make_operator", [hessian, gauss_newton, noise_covariance, ntk])
def test_chunked_and_unchunked_agree(make_operator):
    chunked, whole = make_problem("cnn", "mse", chunk_size=2), make_problem("cnn", "mse", chunk_size=1000)
    probe = torch.randn(make_operator(whole).shape[0], 3, dtype=torch.float64)
    assert torch.allclose(make_operator(chunked) @ probe, make_operator(whole) @ probe, atol=1e-13)


def test_linear_regression_hessian_is_gram_of_inputs():
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    targets = torch.randn(50, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    problem = sgdstab.Problem(model, inputs, targets, chunk_size=16)
    assert torch.allclose(hessian(problem).to_dense(), inputs.T @ inputs / 50, atol=1e-13)


def test_operators_apply_to_vectors_and_blocks_alike():
    operator = hessian(make_problem("mlp", "mse"))
    block = torch.randn(operator.size, 4, dtype=torch.float64)
    stacked = torch.stack([operator @ column for column in block.T], dim=1)
    assert (operator @ block).shape == (operator.size, 4)
    assert torch.allclose(operator @ block, stacked, atol=1e-13)


def test_matvec_counter_counts_columns():
    operator = gauss_newton(make_problem("mlp", "mse"))
    operator @ torch.ones(operator.size, dtype=torch.float64)
    operator @ torch.ones(operator.size, 5, dtype=torch.float64)
    assert operator.num_matvecs == 6


def test_operator_at_given_theta_differs_from_current_parameters():
    problem = make_problem("mlp", "mse")
    shifted = problem.parameters() + 0.3
    truth = torch.func.hessian(dense_loss(problem))(shifted)
    assert torch.allclose(hessian(problem, theta=shifted).to_dense(), truth, atol=1e-12)


@pytest.mark.parametrize("cache_graph", [True, False])
def test_hessian_with_cached_graph_matches_and_stays_correct_over_calls(cache_graph):
    problem = make_problem("cnn", "mse", chunk_size=3)
    truth = torch.func.hessian(dense_loss(problem))(problem.parameters())
    operator = hessian(problem, cache_graph=cache_graph)
    probes = torch.randn(problem.num_params, 2, dtype=torch.float64)
    for _ in range(2):  # the second call reuses the cached graphs
        assert torch.allclose(operator @ probes, truth @ probes, atol=1e-12)


def test_cache_graph_needs_double_backward():
    with pytest.raises(ValueError, match="double_backward"):
        hessian(make_problem("mlp", "mse"), backend="forward_over_reverse", cache_graph=True)
