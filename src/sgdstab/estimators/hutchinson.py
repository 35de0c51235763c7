"""Hutchinson estimators of the trace and the squared Frobenius norm, with Rademacher probes.

For z with independent +-1 entries, E[z^T A z] = tr A (Hutchinson, Commun. Stat. Simul. Comput.
1989) with variance 2 (||A||_F^2 - sum_i a_ii^2) per probe (Avron and Toledo, J. ACM 2011), and
E[||A z||^2] = tr(A^T A) = ||A||_F^2 by the same argument. Each estimate is a mean of i.i.d.
per-probe values, so its standard error is the sample standard deviation over sqrt(#probes).

Example:
    On a diagonal matrix every probe gives z^T A z = tr A exactly, so the estimate of ``trace``
    is exact with zero standard error:

    >>> import torch
    >>> from sgdstab.operators import DenseOperator
    >>> op = DenseOperator(torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)))
    >>> from sgdstab.estimators import trace
    >>> result = trace(op, num_probes=5)
    >>> result.value, result.stderr, result.num_matvecs
    (6.0, 0.0, 5)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sgdstab._checks import check_positive_float, check_positive_int
from sgdstab.errors import InputError
from sgdstab.estimators._common import make_generator, many_products, rademacher
from sgdstab.estimators.epperly2024xtrace import xtrace_to_error
from sgdstab.estimators.results import FrobeniusResult, TraceResult
from sgdstab.operators import LinearOperator

#: Per-probe values from a block of probes Z (d, b) and its image A Z.
ProbeStatistic = Callable[[Tensor, Tensor], Tensor]


def mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    """Sample mean and its standard error (inf from a single sample: the spread is unknown)."""
    samples = samples.to(torch.float64)
    if samples.numel() < 2:
        return float(samples.mean()), math.inf
    return float(samples.mean()), float(samples.std() / math.sqrt(samples.numel()))


def _sample_probes(
    op: LinearOperator,
    statistic: ProbeStatistic,
    num_probes: int,
    seed: int | None,
    target_rel_stderr: float | None,
    block_size: int,
    max_probes: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, int]:
    """Per-probe values of ``statistic``, drawn in blocks of ``block_size`` probes, and the
    number of operator applications they cost.

    Draws ``num_probes``, then, when ``target_rel_stderr`` is set, further blocks until the
    standard error of their mean is at most that fraction of |mean| or ``max_probes`` is reached.
    """
    _check_sampling(num_probes, block_size, target_rel_stderr, max_probes)
    generator = make_generator(op, seed, generator)
    matvecs_before = op.num_matvecs
    samples: list[Tensor] = []
    drawn = 0
    goal = num_probes
    while drawn < goal:
        probes = rademacher(op, min(block_size, goal - drawn), generator)
        samples.append(statistic(probes, op @ probes))
        drawn += probes.shape[1]
        if drawn == goal and target_rel_stderr is not None and goal < max_probes:
            mean, stderr = mean_and_stderr(torch.cat(samples))
            if not stderr <= target_rel_stderr * abs(mean):
                goal = min(goal + block_size, max_probes)
    return torch.cat(samples), op.num_matvecs - matvecs_before


def _check_sampling(
    num_probes: int, block_size: int, target_rel_stderr: float | None, max_probes: int
) -> None:
    check_positive_int("num_probes", num_probes)
    check_positive_int("block_size", block_size)
    check_positive_int("max_probes", max_probes)
    if target_rel_stderr is not None:
        check_positive_float("target_rel_stderr", target_rel_stderr)


@many_products
def trace(
    op: LinearOperator,
    num_probes: int = 100,
    seed: int | None = 0,
    target_rel_stderr: float | None = None,
    block_size: int = 32,
    max_probes: int = 10_000,
    generator: torch.Generator | None = None,
    target_rel_error: float | None = None,
) -> TraceResult:
    """Hutchinson's estimate of tr A: the mean of z^T A z over Rademacher probes z.

    With ``target_rel_stderr``, probes beyond ``num_probes`` are added ``block_size`` at a time
    until ``stderr <= target_rel_stderr * |value|`` or ``max_probes`` have been used. Exact (zero
    variance) for diagonal A.

    With ``target_rel_error`` instead, the estimate is XTrace's (``xtrace_to_error``: Epperly,
    Tropp and Webber 2024), grown until its own error estimate, returned as ``stderr``, is at most
    that fraction of |value|; far fewer products on the decaying spectra of Hessians. On a flat
    spectrum, where deflation cannot pay, it returns the Hutchinson mean of XTrace's first round
    of test vectors when that already meets the target (half the products).
    """
    if target_rel_error is not None:
        if target_rel_stderr is not None:
            raise InputError("give target_rel_error (XTrace) or target_rel_stderr (Hutchinson), not both")
        return xtrace_to_error(op, target_rel_error, seed=seed, generator=generator)
    samples, num_matvecs = _sample_probes(
        op,
        lambda probes, images: (probes * images).sum(dim=0),
        num_probes,
        seed,
        target_rel_stderr,
        block_size,
        max_probes,
        generator,
    )
    value, stderr = mean_and_stderr(samples)
    return TraceResult(value=value, stderr=stderr, num_matvecs=num_matvecs)


@many_products
def frobenius_norm(
    op: LinearOperator,
    num_probes: int = 100,
    seed: int | None = 0,
    target_rel_stderr: float | None = None,
    block_size: int = 32,
    max_probes: int = 10_000,
    generator: torch.Generator | None = None,
) -> FrobeniusResult:
    """Hutchinson's estimate of ||A||_F^2 as the mean of ||A z||^2 over Rademacher probes z.

    ``value`` is its square root, with standard error by the delta method,
    ``stderr = squared_stderr / (2 value)``. ``target_rel_stderr`` and ``max_probes`` act on
    the squared norm as in ``trace``.

    Example:
        On a diagonal matrix ||A z||^2 = sum_i a_ii^2 = ||A||_F^2 for every probe:

        >>> import torch
        >>> from sgdstab.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)))
        >>> result = frobenius_norm(op, num_probes=5)
        >>> result.squared, result.squared_stderr, round(result.value**2, 12)
        (14.0, 0.0, 14.0)
    """
    samples, num_matvecs = _sample_probes(
        op,
        lambda probes, images: images.pow(2).sum(dim=0),
        num_probes,
        seed,
        target_rel_stderr,
        block_size,
        max_probes,
        generator,
    )
    squared, squared_stderr = mean_and_stderr(samples)
    value = math.sqrt(squared)
    # The zero operator gives zero spread; the delta method would divide 0 by 0.
    stderr = 0.0 if squared_stderr == 0 else squared_stderr / (2 * value)
    return FrobeniusResult(
        value=value,
        squared=squared,
        stderr=stderr,
        squared_stderr=squared_stderr,
        num_matvecs=num_matvecs,
    )
