"""The Hessian of the full-data loss, H = d^2 L / d theta^2, applied matrix-free."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from sgdstab.operators.base import ProblemOperator
from sgdstab.problem import Problem, ProblemError

HESSIAN_BACKENDS = ("double_backward", "forward_over_reverse")

#: Share of the memory free on the device that kept gradient graphs may fill by default.
DEFAULT_GRAPH_MEMORY_SHARE = 0.5


def free_memory_bytes(device: torch.device) -> int:
    """Bytes free now: on a CUDA device as its driver reports, on the CPU as Linux's MemAvailable
    (the physical pages free where /proc/meminfo is missing).
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class _SavedBytes:
    """Counts the bytes of the distinct storages autograd saves for backward while active."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def __enter__(self) -> _SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _unpack(tensor: Tensor) -> Tensor:
    return tensor


class HessianOperator(ProblemOperator):
    """H v = (1/n) sum over chunks of the Hessian-vector product of the chunk's summed loss.

    Backends (Pearlmutter 1994, "Fast exact multiplication by the Hessian"):
    - "double_backward": reverse-over-reverse; one forward and gradient graph per chunk serves
      every column of a block, so blocks of probes are cheap. The default: measured faster on
      CPU (benchmarks/curvature.py, HVP/gradient rows).
    - "forward_over_reverse": torch.func.jvp of torch.func.grad, vmapped over the columns of a
      block, so a block costs one batched pass.

    Kept gradient graphs (double_backward). A product needs each chunk's gradient built with
    ``create_graph``; kept, that graph makes every later product one backward pass instead of a
    forward and two backward passes (CNN of benchmarks/curvature.py: 2.3 instead of 4.1
    gradients per product), at the price of holding the chunk's activations and their
    derivatives in memory. ``cache_graph``:

    - ``None`` (default): graphs are kept only inside a ``many_products()`` block, which every
      estimator that applies many products opens, and freed when it closes, so no graph outlives
      the estimator. Chunks are kept in order while the memory autograd saved for them (measured
      as each graph is built) fits ``graph_memory_budget`` bytes (default: half of the memory
      free on the device when the block's first product runs); the chunks after the first that
      does not fit are rebuilt at every product, the uncached path. A single bare ``op @ v``
      outside a block keeps nothing.
    - ``True``: every chunk's graph is kept from the first product until ``release_graphs()``,
      whatever its size (a caller that spreads products over several estimators, like
      ``Monitor``).
    - ``False``: nothing is kept; every product rebuilds the graphs.

    The operator is fixed at ``theta``; kept graphs hold that point and the model's other
    parameters and buffers as they were when built, so change those only between blocks.
    """

    def __init__(
        self,
        problem: Problem,
        theta: Tensor | None = None,
        backend: str = "double_backward",
        cache_graph: bool | None = None,
        graph_memory_budget: int | None = None,
    ):
        if backend not in HESSIAN_BACKENDS:
            raise ProblemError(f"backend must be one of {HESSIAN_BACKENDS}, got {backend!r}")
        if cache_graph and backend != "double_backward":
            raise ProblemError(
                "cache_graph=True needs backend='double_backward' (forward_over_reverse keeps no graph)"
            )
        if graph_memory_budget is not None and graph_memory_budget < 0:
            raise ProblemError(
                f"graph_memory_budget must be a number of bytes >= 0, got {graph_memory_budget}"
            )
        super().__init__(problem, theta)
        self.backend = backend
        self.cache_graph = cache_graph
        self.graph_memory_budget = graph_memory_budget
        self._kept_graphs: list[tuple[Tensor, Tensor]] = []
        self._kept_bytes = 0
        self._all_kept = False
        self._budget_bytes: int | None = None

    @property
    def kept_graph_bytes(self) -> int:
        """Bytes autograd saved for the gradient graphs kept now (0 when none are)."""
        return self._kept_bytes

    def release_graphs(self) -> None:
        """Free the kept gradient graphs (a later product rebuilds them)."""
        self._kept_graphs = []
        self._kept_bytes = 0
        self._all_kept = False
        self._budget_bytes = None

    def _release_shared_work(self) -> None:
        if self.cache_graph is None:
            self.release_graphs()

    def preferred_direction(self) -> Tensor | None:
        """The loss gradient at theta, read off the gradient graphs when they may be kept (this
        builds them as the first product would, so it is free when they fit the memory budget;
        chunks beyond it cost a pass of their own); None when they may not, as the gradient
        would then always cost a pass. Near a minimum of a trained network the gradient lies
        mostly in the top eigenspace of the Hessian (Gur-Ari, Roberts and Dyer, "Gradient descent
        happens in a tiny subspace", arXiv:1812.04754, 2018).
        """
        keeps = self.cache_graph is True or (self.cache_graph is None and self.in_many_products)
        if self.backend != "double_backward" or not keeps:
            return None
        total = torch.zeros_like(self.theta)
        for _, grad in self._gradient_graphs():
            total += grad.detach()
        return self.problem.reduce_sum(total) / self.problem.num_samples

    def _matmat(self, columns: Tensor) -> Tensor:
        result = torch.zeros_like(columns)
        if self.backend == "forward_over_reverse":
            for x, y in self.problem.chunks():
                result += self._forward_over_reverse(columns, x, y)
        else:
            for theta, grad in self._gradient_graphs():
                for index, column in enumerate(columns.T):
                    result[:, index] += torch.autograd.grad(grad, theta, column, retain_graph=True)[0]
        return self.problem.reduce_sum(result) / self.problem.num_samples

    def _gradient_graphs(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(theta leaf, gradient built with create_graph) per chunk: the kept graphs (always the
        first chunks), then the other chunks' built now and kept while allowed.
        """
        yield from self._kept_graphs
        if self._all_kept:
            return
        all_kept = True
        for x, y in itertools.islice(self.problem.chunks(), len(self._kept_graphs), None):
            keep = self.backend == "double_backward" and (
                self.cache_graph is True or (self.cache_graph is None and self.in_many_products and all_kept)
            )
            theta = self.theta.clone().requires_grad_(True)
            with torch.enable_grad(), _SavedBytes() if keep else contextlib.nullcontext() as saved:
                loss = self.problem.chunk_loss_sum(theta, x, y)
                (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
            if saved is not None:
                keep = self.cache_graph is True or self._kept_bytes + saved.total <= self._budget()
            if keep:
                assert saved is not None
                self._kept_graphs.append((theta, grad))
                self._kept_bytes += saved.total
            all_kept = all_kept and keep
            yield theta, grad
        self._all_kept = all_kept and bool(self._kept_graphs)

    def _budget(self) -> int:
        """The block's byte budget for kept graphs, fixed at its first kept chunk."""
        if self._budget_bytes is None:
            self._budget_bytes = (
                int(DEFAULT_GRAPH_MEMORY_SHARE * free_memory_bytes(self.device))
                if self.graph_memory_budget is None
                else self.graph_memory_budget
            )
        return self._budget_bytes

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
    graph_memory_budget: int | None = None,
) -> HessianOperator:
    """The loss Hessian of ``problem`` at ``theta`` (default: the model's current parameters).

    ``cache_graph`` and ``graph_memory_budget``: when gradient graphs are kept between products
    (see ``HessianOperator``; by default inside estimators, within half the free memory).

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
    return HessianOperator(problem, theta, backend, cache_graph, graph_memory_budget)
