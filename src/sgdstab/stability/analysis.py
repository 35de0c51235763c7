"""Is a minimum linearly stable for SGD(eta, B)? (SPEC.md section 3).

The growth factor rho(T) and the threshold of every criterion of the registry, from the
sample-space NTK K (``second_moment`` has the derivation).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from sgdstab.problem import Problem
from sgdstab.sample_space import (
    DEFAULT_MAX_GRAM_ENTRIES,
    DEFAULT_MAX_JACOBIAN_ENTRIES,
    GramSpectrum,
    build_gram_spectrum,
    check_spectrum_matches,
)
from sgdstab.stability.criteria import all_thresholds
from sgdstab.stability.second_moment import SecondMomentMap
from sgdstab.stability.sgd import batch_noise_factor, check_sgd_arguments
from sgdstab.stability.wu2022 import escape_factor


@dataclass(frozen=True)
class StabilityResult:
    """Linear stability of SGD(lr, batch_size, sampling) at one minimum (SPEC.md section 3).

    The curvature is H = G = K/n, exact at an interpolating minimum (elsewhere G stands in for H).
    growth_factor: rho(T) at lr, the per-step growth factor of E L~. stable: growth_factor <= 1.
    thresholds: the largest stable lr by each criterion of ``criteria.STABILITY_CRITERIA`` (which
        says which are necessary and which sufficient); math.inf where a criterion puts no limit
        (e.g. no noise).
    escape_factor: lr^2 p_B mu_min ||H||_F^2 (``wu2022.escape_factor``); when > 1,
        E L~_t >= escape_factor^t L~_0.
    log_escape_rate: log(escape_factor), the least slope of log E L~_t per step when positive.
    lambda_max, hessian_frobenius, trace: of H. mu_min: worst-case alignment on range(K).
    batch_noise: p_B. loss, gradient_norm: at the point. rank: dimension of range(K).
    warnings: reasons the point may not be a minimum the analysis applies to.
    """

    lr: float
    batch_size: int
    sampling: str
    batch_noise: float
    growth_factor: float
    stable: bool
    thresholds: dict[str, float]
    escape_factor: float
    log_escape_rate: float
    lambda_max: float
    hessian_frobenius: float
    trace: float
    mu_min: float
    loss: float
    gradient_norm: float
    rank: int
    num_samples: int
    num_outputs: int
    warnings: tuple[str, ...]


def stability(
    problem: Problem,
    lr: float = 0.1,
    batch_size: int = 32,
    sampling: str = "with_replacement",
    theta: Tensor | None = None,
    minimum_rtol: float = 1e-3,
    rank_rtol: float | None = None,
    max_jacobian_entries: int = DEFAULT_MAX_JACOBIAN_ENTRIES,
    max_gram_entries: int = DEFAULT_MAX_GRAM_ENTRIES,
    spectrum: GramSpectrum | None = None,
) -> StabilityResult:
    """Is ``theta`` a linearly stable minimum for SGD(lr, batch_size, sampling)? (SPEC.md section 3).

    ``thresholds`` holds the largest stable lr (same minimum, batch size and sampling) by every
    criterion of the registry ``criteria.STABILITY_CRITERIA``, which gives each one's formula,
    citation and kind: the exact eta* (Ma & Ying 2021; Mulayoff & Michaeli 2023); the necessary
    Frobenius criterion with mu_min (Wu, Wang & Su 2022), GD's 2/lambda_max (Cohen et al. 2021)
    and Mulayoff & Michaeli's (15), (16), (24); the trace criterion of Wu & Su (2023), reported;
    and the sufficient one-step condition of Wu, Ma & E (2018).

    Non-finite inputs, targets, parameters or outputs raise ``DataError`` before any spectrum is
    computed (``Problem.check_finite``).

    The analysis linearises at an interpolating minimum, so a warning (in the result and through
    ``warnings.warn``) flags a loss above ``minimum_rtol`` times ||y||^2/(2n), the loss of the zero
    predictor (1 when all targets are zero). The gradient needs no separate test: for square loss
    ||g||^2 = e^T K e / n^2 <= 2 L lambda_max(G), so a small loss bounds it.

    Cost: K (``sample_space.gram_matrix``; refused when nC x nC exceeds ``max_gram_entries``),
    two (nC)^3 eigendecompositions, and Lanczos on r x r matrices at O(nC r^2) per application
    for the exact threshold and the growth factor. ``rank_rtol``: see ``gram_spectrum``.

    ``spectrum``: K's spectrum at ``theta`` from ``sample_space.build_gram_spectrum``, when the
    caller already has it (another lr or batch size at the same point, ``alignment``,
    ``simulate_linearized_sgd``): K is then not rebuilt, and ``rank_rtol`` and the two budgets are
    not used. Only its shape is checked against the problem.
    """
    problem.require_square_loss("linear stability of SGD")
    lr, batch_size = check_sgd_arguments(problem.num_samples, lr, batch_size, sampling)
    theta = (problem.parameters() if theta is None else theta).detach()
    problem.check_finite(theta)
    if spectrum is None:
        spectrum = build_gram_spectrum(problem, theta, rank_rtol, max_jacobian_entries, max_gram_entries)
    else:
        check_spectrum_matches(spectrum, problem)
    moment = SecondMomentMap(spectrum, batch_noise_factor(problem.num_samples, batch_size, sampling))
    n, p_b = problem.num_samples, moment.batch_noise

    residuals = problem.residuals(theta).reshape(-1).to(torch.float64)
    loss = residuals.pow(2).sum().item() / (2 * n)
    gradient_norm = math.sqrt(max((residuals @ spectrum.gram @ residuals).item(), 0.0)) / n
    reference = problem.zero_predictor_loss() or 1.0
    notes: tuple[str, ...] = ()
    if loss > minimum_rtol * reference:
        notes = (
            f"not a minimum: the loss {loss:.3g} is {loss / reference:.2g} times that of the zero predictor "
            f"(tolerance {minimum_rtol:g}); the analysis linearises at an interpolating minimum "
            "and uses G in place of H",
        )
        warnings.warn(notes[0], stacklevel=2)

    growth = moment.spectral_radius(lr)
    escape = escape_factor(lr, moment.hessian_frobenius, p_b, moment.mu_min)
    return StabilityResult(
        lr=lr,
        batch_size=batch_size,
        sampling=sampling,
        batch_noise=p_b,
        growth_factor=growth,
        stable=growth <= 1.0,
        thresholds=all_thresholds(moment),
        escape_factor=escape,
        log_escape_rate=math.log(escape) if escape > 0 else -math.inf,
        lambda_max=moment.lambda_max,
        hessian_frobenius=moment.hessian_frobenius,
        trace=moment.trace,
        mu_min=moment.mu_min,
        loss=loss,
        gradient_norm=gradient_norm,
        rank=moment.rank,
        num_samples=n,
        num_outputs=problem.num_outputs,
        warnings=notes,
    )
