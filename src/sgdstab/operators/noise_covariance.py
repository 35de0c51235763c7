"""The single-sample SGD noise covariance Sigma = (1/n) sum_i g_i g_i^T - g g^T, matrix-free.

SPEC.md section 1 (Wu, Wang & Su 2022): g_i is the gradient of sample i's loss, g their mean.
Mini-batch noise is p_B * Sigma. Per-sample gradients are never stored: with c_i = g_i^T v (a JVP
of the per-sample losses), Sigma v = (1/n) sum_i c_i g_i - g (g^T v), and the sum is one VJP of
the per-sample losses weighted by c.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from sgdstab.operators.base import ProblemOperator
from sgdstab.operators.linearization import ChunkLinearization
from sgdstab.problem import Problem


class NoiseCovarianceOperator(ProblemOperator):
    def __init__(self, problem: Problem, theta: Tensor | None = None):
        super().__init__(problem, theta)
        self.mean_gradient = problem.gradient(self.theta)

    def _matmat(self, columns: Tensor) -> Tensor:
        result = torch.zeros_like(columns)
        for x, y in self.problem.chunks():
            chunk = ChunkLinearization(partial(self.problem.per_sample_losses, x=x, y=y), self.theta)
            for j, column in enumerate(columns.T):
                result[:, j] += chunk.vjp(chunk.jvp(column))
        result = self.problem.reduce_sum(result) / self.problem.num_samples
        return result - torch.outer(self.mean_gradient, self.mean_gradient @ columns)


def noise_covariance(problem: Problem, theta: Tensor | None = None) -> NoiseCovarianceOperator:
    """Sigma of ``problem`` at ``theta`` (default: the model's parameters); batch noise is p_B Sigma.

    Example:
        A zero linear model on x_1 = (1, 0), x_2 = (0, 1) with targets 1 and -1 has per-sample
        gradients g_1 = (-1, 0) and g_2 = (0, 1), so Sigma = (1/2) sum_i g_i g_i^T - g g^T:

        >>> import torch
        >>> from torch import nn
        >>> from sgdstab import Problem
        >>> from sgdstab.operators import noise_covariance
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> _ = nn.init.zeros_(model.weight)
        >>> inputs = torch.eye(2, dtype=torch.float64)
        >>> problem = Problem(model, inputs, torch.tensor([[1.0], [-1.0]], dtype=torch.float64))
        >>> print(noise_covariance(problem).to_dense().round(decimals=9))
        tensor([[0.2500, 0.2500],
                [0.2500, 0.2500]], dtype=torch.float64)
    """
    return NoiseCovarianceOperator(problem, theta)
