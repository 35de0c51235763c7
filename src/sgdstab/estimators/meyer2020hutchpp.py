"""Hutch++ trace estimation (Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal Stochastic
Trace Estimation", SOSA 2021, arXiv 2010.09649, Algorithm 1).

A third of the budget sketches the top of the spectrum, ``Q = orth(A S)``; its trace
``tr(Q^T A Q)`` is taken exactly (another third), and Hutchinson's estimator, on the last third,
only has to cover the deflated rest ``(I - QQ^T) A (I - QQ^T)``, whose Frobenius norm (and so the
variance) is much smaller when the spectrum decays, as a Hessian's does. The relative error then
falls like 1/m in the number of products m instead of Hutchinson's 1/sqrt(m).
"""

from __future__ import annotations

import torch

from sgdstab._checks import check_positive_int
from sgdstab.errors import InputError
from sgdstab.estimators._common import apply_in_blocks, make_generator, many_products, rademacher
from sgdstab.estimators.hutchinson import mean_and_stderr
from sgdstab.estimators.results import TraceResult
from sgdstab.operators import LinearOperator


@many_products
def hutchpp_trace(
    op: LinearOperator,
    num_matvecs: int = 99,
    seed: int | None = 0,
    block_size: int = 32,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Hutch++ estimate of tr A from at most ``num_matvecs`` operator applications.

    The sketch takes ``min(num_matvecs // 3, d)`` Rademacher columns; the rest of the budget goes
    to Rademacher probes of the deflated operator. ``stderr`` is the standard error of that
    Hutchinson part, conditional on the sketch (the sketched trace is exact given Q). When the
    sketch spans the whole space the answer is exact, no probes are spent and ``stderr`` is 0.

    Example:
        A rank-2 matrix in 50 dimensions: the sketch (10 of the 30 products) captures its range,
        so the trace is exact with fewer products than dimensions:

        >>> import torch
        >>> from sgdstab.estimators import hutchpp_trace
        >>> from sgdstab.operators import DenseOperator
        >>> spectrum = torch.zeros(50, dtype=torch.float64)
        >>> spectrum[:2] = torch.tensor([3.0, -1.0])
        >>> result = hutchpp_trace(DenseOperator(torch.diag(spectrum)), num_matvecs=30)
        >>> round(result.value, 9), result.stderr < 1e-12, result.num_matvecs
        (2.0, True, 30)
    """
    check_positive_int("num_matvecs", num_matvecs)
    check_positive_int("block_size", block_size)
    if num_matvecs < 3:
        raise InputError(
            f"hutchpp_trace needs num_matvecs >= 3 (sketch, its image, probes), got {num_matvecs}"
        )
    generator = make_generator(op, seed, generator)
    matvecs_before = op.num_matvecs

    sketch_size = min(num_matvecs // 3, op.size)
    sketch = apply_in_blocks(op, rademacher(op, sketch_size, generator), block_size)
    basis, _ = torch.linalg.qr(sketch)
    sketched_trace = float((basis * apply_in_blocks(op, basis, block_size)).sum())
    if sketch_size == op.size:
        return TraceResult(sketched_trace, stderr=0.0, num_matvecs=op.num_matvecs - matvecs_before)

    probes = rademacher(op, num_matvecs - 2 * sketch_size, generator)
    deflated = probes - basis @ (basis.T @ probes)
    quadratic_forms = (deflated * apply_in_blocks(op, deflated, block_size)).sum(dim=0)
    residual_trace, stderr = mean_and_stderr(quadratic_forms)
    return TraceResult(
        sketched_trace + residual_trace, stderr=stderr, num_matvecs=op.num_matvecs - matvecs_before
    )
