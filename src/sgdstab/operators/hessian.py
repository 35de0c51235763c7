"""The Hessian of the full-data loss, H = d^2 L / d theta^2, applied matrix-free."""
from __future__ import annotations

import torch
from torch import Tensor

from sgdstab.operators.base import LinearOperator
from sgdstab.problem import Problem, ProblemError

HESSIAN_BACKENDS = ("double_backward", "forward_over_reverse")


class HessianOperator(LinearOperator):
    """H v = (1/n) sum over chunks of the Hessian-vector product of the chunk's summed loss.

    Backends (Pearlmutter 1994, "Fast exact multiplication by the Hessian"):
    - "double_backward": reverse-over-reverse; one forward and gradient graph per chunk serves
      every column of a block, so blocks of probes are cheap. The default: measured faster on
      CPU (benchmarks/curvature.py, HVP/gradient table).
    - "forward_over_reverse": torch.func.jvp of torch.func.grad, one pass per column.
    """

    def __init__(self, problem: Problem, theta: Tensor | None = None, backend: str = "double_backward"):
        if backend not in HESSIAN_BACKENDS:
            raise ProblemError(f"backend must be one of {HESSIAN_BACKENDS}, got {backend!r}")
        super().__init__(problem.num_params, problem.dtype, problem.device)
        self.problem = problem
        self.theta = (problem.parameters() if theta is None else theta).detach()
        self.backend = backend

    def _matmat(self, columns: Tensor) -> Tensor:
        result = torch.zeros_like(columns)
        for x, y in self.problem.chunks():
            if self.backend == "double_backward":
                result += self._double_backward(columns, x, y)
            else:
                result += self._forward_over_reverse(columns, x, y)
        return result / self.problem.num_samples

    def _double_backward(self, columns: Tensor, x: Tensor, y: Tensor) -> Tensor:
        theta = self.theta.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self.problem.chunk_loss_sum(theta, x, y)
            (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        products = [torch.autograd.grad(grad, theta, column, retain_graph=True)[0] for column in columns.T]
        return torch.stack(products, dim=1)

    def _forward_over_reverse(self, columns: Tensor, x: Tensor, y: Tensor) -> Tensor:
        grad_fn = torch.func.grad(lambda t: self.problem.chunk_loss_sum(t, x, y))
        products = [torch.func.jvp(grad_fn, (self.theta,), (column,))[1] for column in columns.T]
        return torch.stack(products, dim=1)


def hessian(problem: Problem, theta: Tensor | None = None, backend: str = "double_backward") -> HessianOperator:
    """The loss Hessian of ``problem`` at ``theta`` (default: the model's current parameters)."""
    return HessianOperator(problem, theta, backend)
