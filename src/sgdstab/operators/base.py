"""The one small interface every curvature operator implements.

An operator is a symmetric linear map on flat vectors, applied matrix-free: ``op @ v`` for a
vector of shape ``(d,)`` or a matrix of columns of shape ``(d, k)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor

from sgdstab.errors import InputError, ResourceLimitError

if TYPE_CHECKING:
    from sgdstab.problem import Problem

#: Largest number of entries ``to_dense`` builds unless told otherwise (2**26 float64 = 512 MiB).
DEFAULT_MAX_DENSE_ENTRIES = 2**26


class LinearOperator:
    """A square linear operator applied through ``op @ v``.

    Subclasses implement ``_matmat(V)`` for a ``(d, k)`` block of columns and set ``shape``,
    ``dtype`` and ``device``. Each column applied adds one to ``num_matvecs``, so estimators and
    benchmarks can report the cost of an answer in operator applications.

    Example:
        >>> import torch
        >>> from sgdstab.operators import DenseOperator
        >>> op = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
        >>> op @ torch.tensor([1.0, 0.0], dtype=torch.float64)
        tensor([2., 1.], dtype=torch.float64)
        >>> op @ torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # a block of columns
        tensor([[2., 1.],
                [1., 3.]], dtype=torch.float64)
        >>> op.num_matvecs
        3
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str):
        self.shape = (int(size), int(size))
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0
        self._product_runs = 0

    def _matmat(self, columns: Tensor) -> Tensor:
        raise NotImplementedError

    @contextmanager
    def many_products(self) -> Iterator[LinearOperator]:
        """A block in which the operator may keep work shared by all its products, freed at exit.

        Estimators that apply an operator many times at one point wrap their loop in it (Lanczos,
        power iteration, Hutchinson, XTrace, ...). A ``HessianOperator`` keeps its gradient graph
        here, so a product costs one backward pass instead of a forward and two backward passes.
        Blocks nest; what was kept is released when the outermost one exits, so nothing outlives
        the estimator that asked for it. Operators with nothing to share ignore it.
        """
        self._product_runs += 1
        try:
            yield self
        finally:
            self._product_runs -= 1
            if self._product_runs == 0:
                self._release_shared_work()

    @property
    def in_many_products(self) -> bool:
        """Whether a ``many_products`` block is open."""
        return self._product_runs > 0

    def _release_shared_work(self) -> None:
        """Hook run when the outermost ``many_products`` block exits (see ``HessianOperator``)."""

    def preferred_direction(self) -> Tensor | None:
        """A direction the top eigenvectors are likely to share, when the operator has one at
        no extra cost (a Hessian's loss gradient); else None. Eigensolvers may start near it.
        """
        return None

    def _check_first_product(self) -> None:
        """Hook run before the first product (see ``ProblemOperator``)."""

    def __matmul__(self, v: Tensor) -> Tensor:
        if not isinstance(v, Tensor):
            raise TypeError(f"{type(self).__name__} @ v needs a torch.Tensor, got {type(v).__name__}")
        if v.ndim not in (1, 2) or v.shape[0] != self.shape[1]:
            raise InputError(
                f"{type(self).__name__} has shape {self.shape}; it applies to a vector of length "
                f"{self.shape[1]} or a matrix with {self.shape[1]} rows, got shape {tuple(v.shape)}"
            )
        columns = v.reshape(v.shape[0], -1).to(device=self.device, dtype=self.dtype)
        if self.num_matvecs == 0:
            self._check_first_product()
        self.num_matvecs += columns.shape[1]
        result = self._matmat(columns)
        return result.reshape(-1) if v.ndim == 1 else result

    def matvec(self, v: Tensor) -> Tensor:
        return self @ v

    @property
    def size(self) -> int:
        return self.shape[0]

    def to_dense(self, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES, block_size: int = 64) -> Tensor:
        """The operator as a dense ``(d, d)`` tensor, built by applying it to identity blocks."""
        d = self.size
        if d * d > max_entries:
            raise ResourceLimitError(
                f"{type(self).__name__} of size {d} x {d} would need {d * d:,} entries "
                f"({d * d * torch.finfo(self.dtype).bits / 8 / 2**30:.1f} GiB), more than "
                f"max_entries={max_entries:,}; use a matrix-free estimator or raise max_entries"
            )
        dense = torch.empty(d, d, dtype=self.dtype, device=self.device)
        with self.many_products():
            for start in range(0, d, block_size):
                stop = min(start + block_size, d)
                identity_block = torch.zeros(d, stop - start, dtype=self.dtype, device=self.device)
                identity_block[torch.arange(start, stop), torch.arange(stop - start)] = 1
                dense[:, start:stop] = self @ identity_block
        return dense

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` on float64 numpy arrays (for ``eigsh``)."""
        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32

        def apply(x: np.ndarray) -> np.ndarray:
            result = self @ torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            return result.detach().cpu().numpy().astype(np_dtype)

        return scipy.sparse.linalg.LinearOperator(
            self.shape, matvec=apply, matmat=apply, rmatvec=apply, dtype=np_dtype
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class DenseOperator(LinearOperator):
    """A symmetric matrix held in memory, seen through the operator interface.

    Used for exact small-p computations and by tests to run estimators on known spectra.
    """

    def __init__(self, matrix: Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise InputError(f"DenseOperator needs a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, columns: Tensor) -> Tensor:
        return self.matrix @ columns

    def to_dense(self, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES, block_size: int = 64) -> Tensor:
        return self.matrix.clone()


class ProblemOperator(LinearOperator):
    """An operator built on a Problem at a fixed point theta (default: the model's parameters).

    Its first product checks the data, the point and the outputs for NaN/inf
    (``Problem.check_finite``), so non-finite data fails with its name rather than deep inside an
    eigensolver. ``size`` defaults to the number of parameters (sample-space operators pass nC).
    """

    def __init__(self, problem: Problem, theta: Tensor | None = None, size: int | None = None):
        super().__init__(problem.num_params if size is None else size, problem.dtype, problem.device)
        self.problem = problem
        self.theta = (problem.parameters() if theta is None else theta).detach()

    def _check_first_product(self) -> None:
        self.problem.check_finite(self.theta)
