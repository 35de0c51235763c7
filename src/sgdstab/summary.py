"""One call for the curvature of a model at a point: the numbers a sharpness study reports.

lambda_max and the top-k eigenvalues (Lanczos), tr H (Hutchinson), ||H||_F (Hutchinson on
||H z||^2) and the spectral density (stochastic Lanczos quadrature, Ghorbani, Krishnan & Xiao,
ICML 2019) of the loss Hessian or the Gauss-Newton matrix, each with its error and its cost. These
are the quantities in which Wu, Wang & Su (NeurIPS 2022) state their bound
||H||_F <= sqrt(B/mu)/eta, beside the 2/lambda_max of gradient descent (Cohen et al., ICLR 2021)
and the trace of Wu & Su (2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import Tensor

from sgdstab.alignment import METHODS as ALIGNMENT_METHODS
from sgdstab.alignment import alignment as alignment_factor
from sgdstab.errors import InputError
from sgdstab.estimators import frobenius_norm, spectral_density, top_eigenvalues, trace
from sgdstab.operators import ProblemOperator, gauss_newton, hessian
from sgdstab.problem import Problem

OPERATORS: dict[str, Callable[[Problem, Tensor | None], ProblemOperator]] = {
    "hessian": hessian,
    "gauss_newton": gauss_newton,
}


@dataclass(frozen=True)
class CurvatureSummary:
    """Curvature of one operator ("hessian" or "gauss_newton") of a Problem at one point.

    ``density_grid`` / ``density`` are empty when the density was not asked for. ``mu`` (with
    ``mu_stderr``, and ``mu_min`` for the exact method) is the alignment factor of SPEC.md
    section 2 and ``gn_frobenius`` = ||G||_F (exact for the exact method), None when not asked
    for; at an interpolating minimum H = G, so it cross-checks ``frobenius``. ``num_matvecs`` counts operator applications of the
    curvature operator (the alignment's own cost is not included).
    """

    operator: str
    loss: float
    num_params: int
    num_samples: int
    lambda_max: float
    top_eigenvalues: tuple[float, ...]
    eigenvalues_converged: bool
    trace: float
    trace_stderr: float
    frobenius: float
    frobenius_stderr: float
    density_grid: tuple[float, ...]
    density: tuple[float, ...]
    mu: float | None
    mu_stderr: float | None
    mu_min: float | None
    gn_frobenius: float | None
    num_matvecs: int

    def to_dict(self) -> dict:
        return asdict(self)


def curvature_summary(
    problem: Problem,
    top_k: int = 5,
    num_probes: int = 100,
    seed: int = 0,
    density: bool = True,
    operator: str = "hessian",
    theta: Tensor | None = None,
    tol: float = 1e-3,
    density_probes: int = 4,
    density_steps: int = 60,
    alignment: str | None = None,
) -> CurvatureSummary:
    """Summarise the curvature of ``problem`` at ``theta`` (default: the model's parameters).

    ``num_probes`` Rademacher probes go to each of the trace and the Frobenius norm; the top
    ``top_k`` eigenvalues are found to relative ``tol``; the density uses ``density_probes``
    Lanczos runs of ``density_steps`` steps. Every estimate draws from ``seed``, so the same
    call gives the same numbers. ``alignment`` ("exact" or "stochastic", square loss only) adds
    the alignment factor mu of Wu, Wang & Su (2022) by ``sgdstab.alignment.alignment``.
    """
    if operator not in OPERATORS:
        raise InputError(f"operator must be one of {sorted(OPERATORS)}, got {operator!r}")
    if alignment is not None and alignment not in ALIGNMENT_METHODS:
        raise InputError(f"alignment must be one of {ALIGNMENT_METHODS} or None, got {alignment!r}")
    op = OPERATORS[operator](problem, theta)
    top = top_eigenvalues(op, k=min(top_k, op.size), tol=tol, seed=seed)
    tr = trace(op, num_probes=num_probes, seed=seed)
    # A different seed from the trace's: the two estimates then carry independent errors.
    fro = frobenius_norm(op, num_probes=num_probes, seed=seed + 1)
    grid: tuple[float, ...] = ()
    values: tuple[float, ...] = ()
    if density:
        result = spectral_density(
            op, num_probes=density_probes, num_steps=density_steps, seed=seed, num_grid=400
        )
        grid, values = tuple(result.grid.tolist()), tuple(result.density.tolist())
    aligned = None
    if alignment is not None:
        aligned = alignment_factor(
            problem, method=alignment, num_probes=num_probes, seed=seed, hessian=False, theta=op.theta
        )
    return CurvatureSummary(
        operator=operator,
        loss=problem.loss(op.theta),
        num_params=problem.num_params,
        num_samples=problem.num_samples,
        lambda_max=float(top.values[0]),
        top_eigenvalues=tuple(top.values.tolist()),
        eigenvalues_converged=top.converged,
        trace=tr.value,
        trace_stderr=tr.stderr,
        frobenius=fro.value,
        frobenius_stderr=fro.stderr,
        density_grid=grid,
        density=values,
        mu=None if aligned is None else aligned.mu,
        mu_stderr=None if aligned is None else aligned.stderr,
        mu_min=None if aligned is None else aligned.mu_min,
        gn_frobenius=None if aligned is None else aligned.gn_frobenius,
        num_matvecs=op.num_matvecs,
    )
