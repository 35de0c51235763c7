"""Power iteration: the dominant eigenpair, kept as the baseline Lanczos is measured against."""

from __future__ import annotations

import torch

from sgdstab._checks import check_positive_float, check_positive_int
from sgdstab.estimators._common import gaussian, make_generator, many_products
from sgdstab.estimators.results import EigenResult
from sgdstab.operators import LinearOperator


@many_products
def power_iteration(
    op: LinearOperator,
    tol: float = 1e-3,
    max_iter: int = 1000,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The eigenvalue of largest magnitude and its eigenvector by power iteration.

    ``v <- A v / ||A v||`` with Rayleigh quotient ``theta = v^T A v`` (Golub and Van Loan, Matrix
    Computations, 4th ed. 2013, sec. 8.2.1). Stops when theta changes by at most ``tol |theta|``
    between two iterations, the rule PyHessian uses (Yao et al., "PyHessian", IEEE BigData 2020),
    so matvec counts compare like for like. That rule says nothing about accuracy when the top
    two eigenvalues are close, so ``residual_norms`` reports ``||A v - theta v||``, which bounds
    the distance from theta to the spectrum; it is computed from the last product, at no cost.
    One operator application per iteration; the start vector is Gaussian.

    Example:
        The largest magnitude wins, whatever its sign:

        >>> import torch
        >>> from sgdstab.estimators import power_iteration
        >>> from sgdstab.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([-6.0, 2.0, 1.0], dtype=torch.float64)))
        >>> result = power_iteration(op, tol=1e-12)
        >>> round(float(result.values[0]), 6), result.converged
        (-6.0, True)
    """
    tol = check_positive_float("tol", tol)
    max_iter = check_positive_int("max_iter", max_iter)
    generator = make_generator(op, seed, generator)
    matvecs_before = op.num_matvecs

    vector = gaussian(op, 1, generator)
    vector = vector / vector.norm()
    previous = None
    for _ in range(max_iter):
        product = op @ vector
        value = float(vector.T @ product)
        residual = float((product - value * vector).norm())
        # A zero residual is an exact eigenpair (it also guards A v = 0 before dividing by |Av|).
        settled = previous is not None and abs(value - previous) <= tol * abs(value)
        converged = residual == 0 or settled
        if converged:
            break
        previous = value
        vector = product / product.norm()

    return EigenResult(
        values=torch.tensor([value], dtype=op.dtype, device=op.device),
        vectors=vector,
        residual_norms=torch.tensor([residual], dtype=op.dtype, device=op.device),
        num_matvecs=op.num_matvecs - matvecs_before,
        converged=converged,
    )
