"""The Gauss-Newton matrix G = (1/n) sum_i J_i^T Lambda_i J_i, applied matrix-free.

For square loss Lambda_i = I and G = (1/n) J^T J (SPEC.md section 1); for cross-entropy
Lambda_i = diag(p_i) - p_i p_i^T, the generalized Gauss-Newton of Schraudolph (2002).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from sgdstab.operators.base import ProblemOperator
from sgdstab.operators.linearization import ChunkLinearization
from sgdstab.problem import Problem, output_hessian


class GaussNewtonOperator(ProblemOperator):
    def __init__(self, problem: Problem, theta: Tensor | None = None):
        super().__init__(problem, theta)

    def _matmat(self, columns: Tensor) -> Tensor:
        result = torch.zeros_like(columns)
        for x, _ in self.problem.chunks():
            chunk = ChunkLinearization(partial(self.problem.forward, x=x), self.theta)
            curvature = output_hessian(self.problem.loss_name, chunk.outputs.detach())
            for j, column in enumerate(columns.T):
                jv = chunk.jvp(column)
                if curvature is not None:
                    jv = (curvature @ jv.unsqueeze(-1)).squeeze(-1)
                result[:, j] += chunk.vjp(jv)
        return self.problem.reduce_sum(result) / self.problem.num_samples


def gauss_newton(problem: Problem, theta: Tensor | None = None) -> GaussNewtonOperator:
    """The Gauss-Newton matrix of ``problem`` at ``theta`` (default: the model's parameters).

    Example:
        For a linear model under square loss G = J^T J / n = X^T X / n, the Hessian itself:

        >>> import torch
        >>> from torch import nn
        >>> from sgdstab import Problem
        >>> inputs = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> problem = Problem(model, inputs, torch.zeros(2, 1, dtype=torch.float64))
        >>> from sgdstab.operators import gauss_newton
        >>> print(gauss_newton(problem).to_dense().round(decimals=9))
        tensor([[1., 1.],
                [1., 2.]], dtype=torch.float64)
    """
    return GaussNewtonOperator(problem, theta)
