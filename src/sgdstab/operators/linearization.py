"""Jacobian products of a per-chunk function of the parameters, reusing one forward pass.

For a chunk of data and a map theta -> out (outputs or per-sample losses, shape (b, m)), keeps the
autograd graph of one forward pass so that several J^T u (VJP) and J v (JVP) products cost one
backward each. J v uses the double-VJP identity J v = d/du <J^T u, v> (u is a dummy cotangent),
which keeps everything in reverse mode on the same graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class ChunkLinearization:
    """Holds out = fn(theta) for one chunk with its graph, for repeated VJPs and JVPs."""

    def __init__(self, fn: Callable[[Tensor], Tensor], theta: Tensor):
        self.theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            out = fn(self.theta)
        self.outputs = out.reshape(out.shape[0], -1)
        self._transpose_graph: tuple[Tensor, Tensor] | None = None

    def vjp(self, cotangent: Tensor) -> Tensor:
        """J^T u for u of shape (b, m); returns a flat parameter vector."""
        (result,) = torch.autograd.grad(self.outputs, self.theta, cotangent, retain_graph=True)
        return result

    def jvp(self, tangent: Tensor) -> Tensor:
        """J v for a flat parameter vector v; returns shape (b, m)."""
        if self._transpose_graph is None:
            with torch.enable_grad():
                dummy = torch.zeros_like(self.outputs, requires_grad=True)
                (transposed,) = torch.autograd.grad(self.outputs, self.theta, dummy, create_graph=True)
            self._transpose_graph = (dummy, transposed)
        dummy, transposed = self._transpose_graph
        (result,) = torch.autograd.grad(transposed, dummy, tangent, retain_graph=True)
        return result
