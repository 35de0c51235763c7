"""H v agrees with curvlinops and PyHessian on one small float64 model, and all three with the
dense torch.func Hessian (tests/reference.py).

The peers are benchmark-only dependencies (``make bench`` installs them in .venv-bench); each test
is skipped where its peer is absent. Run with ``.venv-bench/bin/python -m pytest -m peers``.
"""

import sys

import pytest
import torch
from torch import nn

from reference import assert_matches, dense_hessian, mlp_problem
from sgdstab import Problem
from sgdstab.operators import hessian

pytestmark = pytest.mark.peers

RTOL = 1e-10


@pytest.fixture
def problem() -> Problem:
    return mlp_problem(num_outputs=2, n=12, inputs_dim=3, hidden=5, seed=4, chunk_size=5)


@pytest.fixture
def probe(problem: Problem) -> torch.Tensor:
    return torch.randn(problem.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def split_like_parameters(vector: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [
        piece.view_as(p) for piece, p in zip(vector.split([p.numel() for p in params]), params, strict=True)
    ]


def test_sgdstab_matches_the_dense_hessian(problem, probe):
    """The anchor the peers are compared through: sgdstab's H v against torch.func.hessian."""
    assert_matches(hessian(problem) @ probe, dense_hessian(problem) @ probe, rtol=RTOL, atol=1e-13)


def test_curvlinops_hessian_vector_product_matches(problem, probe):
    curvlinops = pytest.importorskip("curvlinops")
    params = [p for p in problem.model.parameters() if p.requires_grad]
    chunks = list(zip(problem.inputs.split(5), problem.targets.split(5), strict=True))
    # MSELoss(reduction="sum") is 2n L (SPEC.md section 1), so its Hessian is 2n H.
    theirs = curvlinops.HessianLinearOperator(
        problem.model, nn.MSELoss(reduction="sum"), params, chunks, check_deterministic=False
    )
    product = (theirs @ probe) / (2 * problem.num_samples)
    assert_matches(product, dense_hessian(problem) @ probe, rtol=RTOL, atol=1e-13)
    assert_matches(product, hessian(problem) @ probe, rtol=RTOL, atol=1e-13)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # PyHessian's own call
def test_pyhessian_hessian_vector_product_matches(problem, probe):
    pyhessian = pytest.importorskip("pyhessian")
    n = problem.num_samples
    params = [p for p in problem.model.parameters() if p.requires_grad]
    for p in params:  # PyHessian accumulates into .grad
        p.grad = None

    def criterion(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets).pow(2).sum() / (2 * n)  # sgdstab's L on the whole batch

    computer = pyhessian.hessian(problem.model, criterion, data=(problem.inputs, problem.targets), cuda=False)
    # The module, not the class of the same name that pyhessian's __init__ re-exports.
    hessian_vector_product = sys.modules["pyhessian.hessian"].hessian_vector_product
    pieces = hessian_vector_product(computer.gradsH, computer.params, split_like_parameters(probe, params))
    product = torch.cat([piece.reshape(-1) for piece in pieces])
    for p in params:
        p.grad = None
    assert_matches(product, dense_hessian(problem) @ probe, rtol=RTOL, atol=1e-13)
    assert_matches(product, hessian(problem) @ probe, rtol=RTOL, atol=1e-13)
