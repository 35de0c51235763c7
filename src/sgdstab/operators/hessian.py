"""The Hessian of the full-data loss, H = d^2 L / d theta^2, applied matrix-free."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from sgdstab.operators.base import ProblemOperator
from sgdstab.problem import Problem, ProblemError

HESSIAN_BACKENDS = ("double_backward", "forward_over_reverse")


class HessianOperator(ProblemOperator):
    """H v = (1/n) sum over chunks of the Hessian-vector product of the chunk's summed loss.

    Backends (Pearlmutter 1994, "Fast exact multiplication by the Hessian"):
    - "double_backward": reverse-over-reverse; one forward and gradient graph per chunk serves
      every column of a block, so blocks of probes are cheap. The default: measured faster on
      CPU (benchmarks/curvature.py, HVP/gradient rows).
    - "forward_over_reverse": torch.func.jvp of torch.func.grad, vmapped over the columns of a
      block, so a block costs one batched pass.

    ``cache_graph`` (double_backward only) keeps each chunk's gradient graph alive across calls,
    so an application costs one backward pass instead of forward + backward + backward: about
    1.6x faster for iterative solvers (Lanczos) at the price of holding the activations of the
    whole data set in memory. ``None`` (default) caches only when the data set is a single chunk,
    whose graph the chunk size already bounds.
    """

    def __init__(
        self,
        problem: Problem,
        theta: Tensor | None = None,
        backend: str = "double_backward",
        cache_graph: bool | None = None,
    ):
        if backend not in HESSIAN_BACKENDS:
            raise ProblemError(f"backend must be one of {HESSIAN_BACKENDS}, got {backend!r}")
        if cache_graph and backend != "double_backward":
            raise ProblemError(
                "cache_graph=True needs backend='double_backward' (forward_over_reverse keeps no graph)"
            )
        super().__init__(problem, theta)
        self.backend = backend
        if cache_graph is None:
            cache_graph = backend == "double_backward" and problem.num_samples <= problem.chunk_size
        self._cached_graphs: list[tuple[Tensor, Tensor]] | None = [] if cache_graph else None

    def _matmat(self, columns: Tensor) -> Tensor:
        result = torch.zeros_like(columns)
        if self.backend == "forward_over_reverse":
            for x, y in self.problem.chunks():
                result += self._forward_over_reverse(columns, x, y)
        else:
            for theta, grad in self._gradient_graphs():
                result += torch.stack(
                    [torch.autograd.grad(grad, theta, column, retain_graph=True)[0] for column in columns.T],
                    1,
                )
        return self.problem.reduce_sum(result) / self.problem.num_samples

    def _gradient_graphs(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(theta leaf, gradient built with create_graph) per chunk, from the cache when kept."""
        if self._cached_graphs:
            yield from self._cached_graphs
            return
        for x, y in self.problem.chunks():
            theta = self.theta.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = self.problem.chunk_loss_sum(theta, x, y)
                (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
            if self._cached_graphs is not None:
                self._cached_graphs.append((theta, grad))
            yield theta, grad

    def _forward_over_reverse(self, columns: Tensor, x: Tensor, y: Tensor) -> Tensor:
        grad_fn = torch.func.grad(lambda t: self.problem.chunk_loss_sum(t, x, y))

        def product(column: Tensor) -> Tensor:
            return torch.func.jvp(grad_fn, (self.theta,), (column,))[1]

        # One batched pass for all columns instead of a Python loop of passes.
        return torch.func.vmap(product, in_dims=1, out_dims=1)(columns)


def hessian(
    problem: Problem,
    theta: Tensor | None = None,
    backend: str = "double_backward",
    cache_graph: bool | None = None,
) -> HessianOperator:
    """The loss Hessian of ``problem`` at ``theta`` (default: the model's current parameters).

    Example:
        Linear regression, whose square-loss Hessian is X^T X / n whatever the weights:

        >>> import torch
        >>> from torch import nn
        >>> from sgdstab import Problem
        >>> inputs = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> problem = Problem(model, inputs, torch.zeros(2, 1, dtype=torch.float64))
        >>> from sgdstab.operators import hessian
        >>> print(hessian(problem).to_dense().round(decimals=9))
        tensor([[1., 1.],
                [1., 2.]], dtype=torch.float64)
    """
    return HessianOperator(problem, theta, backend, cache_graph)
