"""The LinearOperator interface every operator shares: products, blocks, counting, dense and scipy views."""

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from reference import assert_matches, tiny_network_problem
from sgdstab.operators import DenseOperator, gauss_newton, hessian, noise_covariance, ntk


def symmetric_matrix(size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return a + a.T


def test_to_dense_refuses_large_operators_naming_the_size():
    operator = hessian(tiny_network_problem("mlp", "mse"))
    with pytest.raises(MemoryError, match=f"{operator.size} x {operator.size}"):
        operator.to_dense(max_entries=operator.size**2 - 1)


def test_generic_to_dense_builds_the_matrix_from_products():
    operator = hessian(tiny_network_problem("mlp", "mse"))
    dense = operator.to_dense(block_size=4)
    columns = torch.eye(operator.size, dtype=torch.float64)
    assert torch.allclose(dense, operator @ columns, atol=1e-14)


def test_to_scipy_eigsh_finds_the_top_eigenvalue():
    matrix = symmetric_matrix(30)
    top = scipy.sparse.linalg.eigsh(
        DenseOperator(matrix).to_scipy(), k=1, which="LA", return_eigenvectors=False
    )
    assert np.isclose(top[0], torch.linalg.eigvalsh(matrix)[-1].item())


@pytest.mark.parametrize("bad", [torch.ones(4), torch.ones(5, 2, 2), [1.0] * 5])
def test_matmul_rejects_wrong_shapes_and_types(bad):
    with pytest.raises((ValueError, TypeError), match="DenseOperator"):
        DenseOperator(symmetric_matrix(5)) @ bad


def test_dense_operator_needs_a_square_matrix():
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.ones(3, 4))


@pytest.mark.parametrize("make_operator", [hessian, gauss_newton, noise_covariance, ntk])
def test_chunked_and_unchunked_agree(make_operator):
    chunked = tiny_network_problem("cnn", "mse", chunk_size=2)
    whole = tiny_network_problem("cnn", "mse", chunk_size=1000)
    probe = torch.randn(make_operator(whole).shape[0], 3, dtype=torch.float64)
    assert_matches(make_operator(chunked) @ probe, make_operator(whole) @ probe, rtol=1e-5, atol=1e-13)


def test_operators_apply_to_vectors_and_blocks_alike():
    operator = hessian(tiny_network_problem("mlp", "mse"))
    block = torch.randn(operator.size, 4, dtype=torch.float64)
    stacked = torch.stack([operator @ column for column in block.T], dim=1)
    assert (operator @ block).shape == (operator.size, 4)
    assert_matches(operator @ block, stacked, rtol=1e-5, atol=1e-13)


def test_matvec_counter_counts_columns():
    operator = gauss_newton(tiny_network_problem("mlp", "mse"))
    operator @ torch.ones(operator.size, dtype=torch.float64)
    operator @ torch.ones(operator.size, 5, dtype=torch.float64)
    assert operator.num_matvecs == 6
