import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from tiny_problems import make_problem

from sgdstab.operators import DenseOperator, hessian


def symmetric_matrix(size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return a + a.T


def test_to_dense_refuses_large_operators_naming_the_size():
    operator = hessian(make_problem("mlp", "mse"))
    with pytest.raises(MemoryError, match=f"{operator.size} x {operator.size}"):
        operator.to_dense(max_entries=operator.size**2 - 1)


def test_generic_to_dense_builds_the_matrix_from_products():
    operator = hessian(make_problem("mlp", "mse"))
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
