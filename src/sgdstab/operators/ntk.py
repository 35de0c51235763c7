"""The empirical NTK K = J J^T in sample space (nC x nC), applied matrix-free.

SPEC.md section 1: J stacks the per-sample Jacobians J_i = df(x_i)/dtheta (C x p), sample-major,
so a sample-space vector u has length nC with u[i*C:(i+1)*C] belonging to sample i. K u = J (J^T u)
costs one VJP pass and one JVP pass over the data; no Jacobian is stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sgdstab.operators.base import LinearOperator
from sgdstab.operators.linearization import ChunkLinearization
from sgdstab.problem import Problem


class NTKOperator(LinearOperator):
    def __init__(self, problem: Problem, theta: Tensor | None = None):
        super().__init__(problem.num_samples * problem.num_outputs, problem.dtype, problem.device)
        self.problem = problem
        self.theta = (problem.parameters() if theta is None else theta).detach()

    def _chunk_linearizations(self):
        start = 0
        for x, _ in self.problem.chunks():
            rows = slice(start * self.problem.num_outputs, (start + len(x)) * self.problem.num_outputs)
            start += len(x)
            yield rows, ChunkLinearization(lambda t: self.problem.forward(t, x), self.theta)

    def transpose_jacobian(self, columns: Tensor) -> Tensor:
        """J^T U for sample-space columns U (nC, k); returns (p, k)."""
        result = torch.zeros(self.problem.num_params, columns.shape[1], dtype=self.dtype, device=self.device)
        for rows, chunk in self._chunk_linearizations():
            block = columns[rows]
            for j in range(columns.shape[1]):
                result[:, j] += chunk.vjp(block[:, j].reshape(chunk.outputs.shape))
        return result

    def jacobian(self, columns: Tensor) -> Tensor:
        """J W for parameter-space columns W (p, k); returns (nC, k)."""
        result = torch.empty(self.size, columns.shape[1], dtype=self.dtype, device=self.device)
        for rows, chunk in self._chunk_linearizations():
            for j, column in enumerate(columns.T):
                result[rows, j] = chunk.jvp(column).reshape(-1)
        return result

    def _matmat(self, columns: Tensor) -> Tensor:
        return self.jacobian(self.transpose_jacobian(columns))


def ntk(problem: Problem, theta: Tensor | None = None) -> NTKOperator:
    """The sample-space NTK K = J J^T of ``problem`` at ``theta`` (not divided by n).

    Example:
        For a linear model with one output J = X, so K = X X^T (n x n):

        >>> import torch
        >>> from torch import nn
        >>> from sgdstab import Problem
        >>> inputs = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> problem = Problem(model, inputs, torch.zeros(2, 1, dtype=torch.float64))
        >>> from sgdstab.operators import ntk
        >>> print(ntk(problem).to_dense().round(decimals=9))
        tensor([[1., 1.],
                [1., 5.]], dtype=torch.float64)
    """
    return NTKOperator(problem, theta)
