"""NTKOperator against J J^T from a dense Jacobian, and its identities with G (SPEC.md section 1)."""

import torch

from reference import assert_matches, dense_gram, tiny_network_problem
from sgdstab.operators import gauss_newton, ntk


def test_ntk_is_gram_matrix_of_sample_major_jacobian(architecture):
    problem = tiny_network_problem(architecture, "mse")
    kernel = ntk(problem)
    assert kernel.shape == (problem.num_samples * problem.num_outputs,) * 2
    assert_matches(kernel.to_dense(), dense_gram(problem), rtol=1e-5, atol=1e-12)


def test_ntk_identities_with_gauss_newton():
    """SPEC.md section 1: ||G||_F = ||K||_F / n, tr G = tr K / n, lambda_max(G) = lambda_max(K) / n."""
    problem = tiny_network_problem("mlp", "mse")
    n = problem.num_samples
    G, K = gauss_newton(problem).to_dense(), ntk(problem).to_dense()
    assert torch.isclose(torch.linalg.matrix_norm(G), torch.linalg.matrix_norm(K) / n)
    assert torch.isclose(G.trace(), K.trace() / n)
    assert torch.isclose(torch.linalg.eigvalsh(G)[-1], torch.linalg.eigvalsh(K)[-1] / n)
