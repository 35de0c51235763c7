"""The empirical NTK K = J J^T in sample space (nC x nC), applied matrix-free.

SPEC.md section 1: J stacks the per-sample Jacobians J_i = df(x_i)/dtheta (C x p), sample-major,
so a sample-space vector u has length nC with u[i*C:(i+1)*C] belonging to sample i. K u = J (J^T u)
costs one VJP pass and one JVP pass over the data; no Jacobian is stored.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from sgdstab.operators.base import ProblemOperator
from sgdstab.operators.linearization import ChunkLinearization
from sgdstab.problem import Problem


class NTKOperator(ProblemOperator):
    def __init__(self, problem: Problem, theta: Tensor | None = None):
        super().__init__(problem, theta, size=problem.num_samples * problem.num_outputs)

    def _chunk_linearizations(self):
        """(rows among this process's samples, linearization) per chunk."""
        start = 0
        for x, _ in self.problem.chunks():
            rows = slice(start * self.problem.num_outputs, (start + len(x)) * self.problem.num_outputs)
            start += len(x)
            yield rows, ChunkLinearization(partial(self.problem.forward, x=x), self.theta)

    def transpose_jacobian(self, columns: Tensor) -> Tensor:
        """J^T U for sample-space columns U (nC, k); returns (p, k)."""
        result = torch.zeros(self.problem.num_params, columns.shape[1], dtype=self.dtype, device=self.device)
        outputs = self.problem.num_outputs
        local = self.problem.local_samples(columns.reshape(-1, outputs, columns.shape[1]))
        columns = local.reshape(-1, columns.shape[1])
        for rows, chunk in self._chunk_linearizations():
            block = columns[rows]
            for j in range(columns.shape[1]):
                result[:, j] += chunk.vjp(block[:, j].reshape(chunk.outputs.shape))
        return self.problem.reduce_sum(result)

    def jacobian(self, columns: Tensor) -> Tensor:
        """J W for parameter-space columns W (p, k); returns (nC, k)."""
        local = torch.cat(
            [
                torch.stack([chunk.jvp(column).reshape(-1) for column in columns.T], dim=1)
                for _, chunk in self._chunk_linearizations()
            ]
        )
        per_sample = local.reshape(-1, self.problem.num_outputs, columns.shape[1])
        return self.problem.gather_samples(per_sample).reshape(self.size, -1)

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
