"""The alignment factor of SGD noise with the curvature (Wu, Wang & Su, NeurIPS 2022; SPEC.md section 2).

    mu(theta) = tr(Sigma G) / (2 L ||G||_F^2)

Square loss only. With e in R^{nC} the stacked residuals, K = J J^T the sample-space NTK and
(K^2)_ii the C x C diagonal block of K^2 for sample i, mu has the exact sample-space form

    mu = [ n S1 - S2 ] / ( ||e||^2 F ),   S1 = sum_i e_i^T (K^2)_ii e_i,  S2 = e^T K^2 e,  F = ||K||_F^2,

because tr(Sigma G) = S1/n^2 - S2/n^3, 2L = ||e||^2/n and ||G||_F^2 = F/n^2. Both paths sum the
numerator in centred form, n S1 - S2 = n sum_i ||a_i - mean_j a_j||^2 with a_i = K[:, block i] e_i
(whose mean is K e / n), so it never comes out of a cancellation.

- method="exact" builds K (``sample_space.gram_matrix``) and also returns mu_min, the worst case
  over residual directions in range(K) that the rigorous stability bound uses.
- method="stochastic" never stores a Jacobian or K. With D = blockdiag(e_i) (nC x n) the
  centred numerator is n ||K D P||_F^2 with P = I - 11^T/n, so
  n S1 - S2 = n E_z ||K D (z - mean(z))||^2 over Rademacher z in R^n (no subtraction of two
  estimates, unlike S1 = E_z ||K D z||^2 minus S2 = ||K e||^2), and F = E_z' ||K z'||^2 over
  Rademacher z' in R^{nC}. Both sums are ||K X||_F^2 (X = D P or I), and a few top directions of K
  carry most of them (an MNIST MLP's K is dominated by one), which makes Hutchinson's variance
  large; so, as in Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021), a range-finder sketch
  U = orth(K S) (Halko, Martinsson & Tropp, SIAM Review 2011) takes them out exactly,
  ||K X||_F^2 = ||(K U)^T X||_F^2 + ||(I - U U^T) K X||_F^2, and the probes only estimate the
  deflated rest. On that MNIST MLP (n = 4000, C = 1, 30 probes) plain Hutchinson gave
  mu = 0.42 +- 0.12 (SPEC.md's form) or 0.51 +- 0.13 (centred); with 10 sketch directions,
  0.7113 +- 0.0026, against the exact 0.7120. Each K-product is one VJP and one JVP pass
  (``operators.ntk``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sgdstab.errors import InputError
from sgdstab.operators import hessian as hessian_operator
from sgdstab.operators import noise_covariance, ntk
from sgdstab.problem import Problem
from sgdstab.sample_space import (
    DEFAULT_MAX_GRAM_ENTRIES,
    DEFAULT_MAX_JACOBIAN_ENTRIES,
    GramSpectrum,
    check_spectrum_matches,
    gram_matrix,
    gram_spectrum,
    worst_case_alignment,
)

METHODS = ("exact", "stochastic")
#: method="exact" computes the Hessian variant by default up to this many parameters (dense H and
#: Sigma cost 2p operator applications each over the data).
DENSE_HESSIAN_MAX_PARAMS = 512
#: Probe columns pushed through the operators at once: bounds the (p, columns) work arrays.
_PROBE_BLOCK = 32


@dataclass(frozen=True)
class AlignmentResult:
    """The alignment factor at one point.

    mu: tr(Sigma G) / (2 L ||G||_F^2); nan when every residual is exactly zero (0/0).
    mu_min: worst case over residual directions in range(K) (exact method only, else None).
    trace_sigma_g: tr(Sigma G). loss: L. gn_frobenius: ||G||_F = ||K||_F / n.
    stderr: standard error of mu (0 for the exact method).
    mu_hessian: tr(Sigma H) / (2 L ||H||_F^2), the variant away from minima; None when not computed.
    mu_hessian_stderr: its standard error (0 for the exact method, None when not computed).
    num_probes: Hutchinson probes per estimated sum (stochastic method), else None.
    """

    mu: float
    mu_min: float | None
    trace_sigma_g: float
    loss: float
    gn_frobenius: float
    stderr: float
    mu_hessian: float | None
    mu_hessian_stderr: float | None
    num_samples: int
    num_outputs: int
    method: str
    num_probes: int | None


def alignment(
    problem: Problem,
    method: str = "exact",
    num_probes: int = 100,
    seed: int = 0,
    hessian: bool | None = None,
    sketch_size: int = 20,
    theta: Tensor | None = None,
    worst_case: bool = True,
    rank_rtol: float | None = None,
    max_jacobian_entries: int = DEFAULT_MAX_JACOBIAN_ENTRIES,
    max_gram_entries: int = DEFAULT_MAX_GRAM_ENTRIES,
    spectrum: GramSpectrum | None = None,
) -> AlignmentResult:
    """The alignment factor mu of SGD noise with the Gauss-Newton curvature (SPEC.md section 2).

    Args:
        problem: a square-loss Problem (cross-entropy is refused: the theory is for square loss).
        method: "exact" (builds the nC x nC NTK K; refuses when K exceeds ``max_gram_entries``)
            or "stochastic" (matrix-free Hutchinson in sample space, ``num_probes`` probes for
            each of the two sums after deflating ``sketch_size`` directions of K exactly, which
            costs 2 * sketch_size more K-products; randomness from ``seed``).
        hessian: also compute the variant with H in place of G. None: for the exact method when
            p <= DENSE_HESSIAN_MAX_PARAMS (dense H and Sigma), never for the stochastic one.
            True with the exact method needs dense H to fit; with the stochastic method it uses
            Hutchinson probes through Hessian-vector products.
        theta: the point (default: the model's parameters).
        worst_case: compute mu_min (exact method; costs two (nC)^3 eigendecompositions), over
            range(K) as ``sample_space.gram_spectrum`` cuts it with ``rank_rtol``.
        max_jacobian_entries: above this J is not stored and K is built panel by panel.
        max_gram_entries: the exact method refuses (``ResourceLimitError``) a K with more entries.
        rank_rtol: relative cut-off of K's numerical rank (``sample_space.gram_spectrum``).
        num_probes: stochastic method: Hutchinson probes for each of the two sums.
        sketch_size: stochastic method: directions of K deflated exactly before the probes.
        seed: stochastic method: the seed of every random draw (same seed, same numbers).
        spectrum: exact method only: K's spectrum at ``theta`` from
            ``sample_space.build_gram_spectrum`` (e.g. the one ``stability`` uses at the same
            point); K is then not rebuilt nor eigendecomposed, and ``rank_rtol`` and the budgets
            are not used. Only its shape is checked against the problem.

    Non-finite inputs, targets, parameters or outputs raise ``DataError`` before anything is
    computed (``Problem.check_finite``).

    The stochastic standard error is the delta method for a ratio of independent probe means:
    mu = n (A + a) / (||e||^2 (B + b)) with A, B the exactly deflated parts and a, b the means of
    the numerator and F probes, so stderr^2 = (n / (||e||^2 (B + b)))^2 var(a) / m
    + (mu / (B + b))^2 var(b) / m (sample variances, m probes); it ignores the O(1/m) bias of a
    ratio.
    """
    problem.require_square_loss("the alignment factor")
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if method == "stochastic" and num_probes < 2:
        raise InputError(f"num_probes must be at least 2 to estimate a standard error, got {num_probes}")
    if sketch_size < 0:
        raise InputError(f"sketch_size must be a non-negative number of directions, got {sketch_size}")
    if spectrum is not None:
        if method != "exact":
            raise InputError(
                'a precomputed spectrum is used by method="exact" only; drop it or change method'
            )
        check_spectrum_matches(spectrum, problem)
    theta = (problem.parameters() if theta is None else theta).detach()
    problem.check_finite(theta)
    if hessian is None:
        hessian = method == "exact" and problem.num_params <= DENSE_HESSIAN_MAX_PARAMS
    residuals = problem.residuals(theta).reshape(-1).to(torch.float64)
    if method == "exact":
        return _exact(
            problem,
            theta,
            residuals,
            hessian,
            worst_case,
            rank_rtol,
            max_jacobian_entries,
            max_gram_entries,
            spectrum,
        )
    return _stochastic(problem, theta, residuals, num_probes, seed, hessian, sketch_size)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _exact(
    problem: Problem,
    theta: Tensor,
    residuals: Tensor,
    hessian: bool,
    worst_case: bool,
    rank_rtol: float | None,
    max_jacobian_entries: int,
    max_gram_entries: int,
    spectrum: GramSpectrum | None,
) -> AlignmentResult:
    n, outputs = problem.num_samples, problem.num_outputs
    if spectrum is None:
        gram = gram_matrix(
            problem,
            theta,
            max_jacobian_entries,
            max_gram_entries,
            hint='use alignment(..., method="stochastic"), which never forms K',
        )
        spectrum = gram_spectrum(gram, outputs, rank_rtol) if worst_case else None
        gram = spectrum.gram if spectrum is not None else gram.to(torch.float64)
    else:
        gram = spectrum.gram
    # Rows a_i = K[:, block i] e_i, whose mean is K e / n: n S1 - S2 = n sum_i ||a_i - mean||^2,
    # summed without the cancellation of the two terms.
    per_sample = torch.einsum("icj,ic->ij", gram.reshape(n, outputs, -1), residuals.reshape(n, outputs))
    numerator = n * (per_sample - per_sample.mean(dim=0)).pow(2).sum().item()
    frobenius_sq = gram.pow(2).sum().item()
    residual_sq = residuals.pow(2).sum().item()
    mu_hessian = _dense_hessian_alignment(problem, theta, residual_sq) if hessian else None
    return AlignmentResult(
        mu=_ratio(numerator, residual_sq * frobenius_sq),
        mu_min=worst_case_alignment(spectrum) if worst_case and spectrum is not None else None,
        trace_sigma_g=numerator / n**3,
        loss=residual_sq / (2 * n),
        gn_frobenius=math.sqrt(frobenius_sq) / n,
        stderr=0.0,
        mu_hessian=mu_hessian,
        mu_hessian_stderr=0.0 if hessian else None,
        num_samples=n,
        num_outputs=outputs,
        method="exact",
        num_probes=None,
    )


def _dense_hessian_alignment(problem: Problem, theta: Tensor, residual_sq: float) -> float:
    """tr(Sigma H) / (2 L ||H||_F^2) from dense H and Sigma (SPEC.md section 2, the H variant)."""
    dense_hessian = hessian_operator(problem, theta).to_dense().to(torch.float64)
    dense_sigma = noise_covariance(problem, theta).to_dense().to(torch.float64)
    two_loss = residual_sq / problem.num_samples
    return _ratio((dense_sigma * dense_hessian).sum().item(), two_loss * dense_hessian.pow(2).sum().item())


def _rademacher(rows: int, columns: int, generator: torch.Generator, device: torch.device) -> Tensor:
    # Drawn on the CPU so that one seed gives the same probes on every device.
    signs = torch.randint(0, 2, (rows, columns), generator=generator, dtype=torch.float64) * 2 - 1
    return signs.to(device)


def _mean_and_variance_of_mean(samples: Tensor) -> tuple[float, float]:
    return samples.mean().item(), (samples.var() / samples.numel()).item()


def _ratio_with_stderr(
    numerator: Tensor,
    denominator: Tensor,
    scale: float,
    numerator_offset: float = 0.0,
    denominator_offset: float = 0.0,
) -> tuple[float, float]:
    """Scale (A + a) / (B + b) for a, b the means of independent probe samples and A, B exact
    offsets, with its delta-method standard error (from the variances of the two means).
    """
    a, var_a = _mean_and_variance_of_mean(numerator)
    b, var_b = _mean_and_variance_of_mean(denominator)
    total = denominator_offset + b
    if not scale * total > 0:  # also when scale is nan: all residuals zero
        return math.nan, math.nan
    value = scale * (numerator_offset + a) / total
    return value, math.sqrt((scale / total) ** 2 * var_a + (value / total) ** 2 * var_b)


def _in_blocks(apply: Callable[[Tensor], Tensor], columns: Tensor) -> Tensor:
    blocks = [
        apply(columns[:, start : start + _PROBE_BLOCK]) for start in range(0, columns.shape[1], _PROBE_BLOCK)
    ]
    return torch.cat(blocks, dim=1)


def _stochastic(
    problem: Problem,
    theta: Tensor,
    residuals: Tensor,
    num_probes: int,
    seed: int,
    hessian: bool,
    sketch_size: int,
) -> AlignmentResult:
    n, outputs, dtype, device = problem.num_samples, problem.num_outputs, problem.dtype, problem.device
    generator = torch.Generator().manual_seed(seed)
    kernel = ntk(problem, theta)

    def kernel_products(columns: Tensor) -> Tensor:
        if columns.shape[1] == 0:  # no sketch
            return columns
        return _in_blocks(lambda block: kernel @ block, columns.to(dtype)).to(torch.float64)

    # Range finder: U spans K's top directions, whose part of both sums is taken exactly.
    sketch = torch.randn(n * outputs, min(sketch_size, n * outputs), generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(kernel_products(sketch.to(device))).Q
    top = kernel_products(basis)  # K U
    per_sample = (top.reshape(n, outputs, -1) * residuals.reshape(n, outputs, 1)).sum(dim=1)  # U^T K D
    numerator_exact = (per_sample - per_sample.mean(dim=0)).pow(2).sum().item()  # ||U^T K D P||_F^2
    frobenius_exact = top.pow(2).sum().item()  # ||U^T K||_F^2

    signs = _rademacher(n, num_probes, generator, device)
    centred = (signs - signs.mean(dim=0)).repeat_interleave(outputs, dim=0)
    # Columns: D P z_j (numerator probes), then z'_j (F probes).
    columns = torch.cat(
        [centred * residuals[:, None], _rademacher(n * outputs, num_probes, generator, device)], dim=1
    )
    # J^T D P z_j = sum_i (z_i - mean z) g_i, a random centred sum of per-sample gradients; the H
    # variant reuses it.
    pulled = _in_blocks(kernel.transpose_jacobian, columns.to(dtype))
    products = _in_blocks(kernel.jacobian, pulled).to(torch.float64)
    squares = (products - basis @ (basis.T @ products)).pow(2).sum(dim=0)
    numerator_probes, frobenius_probes = squares[:num_probes], squares[num_probes:]
    residual_sq = residuals.pow(2).sum().item()
    inverse_residual_sq = 1 / residual_sq if residual_sq > 0 else math.nan
    mu, stderr = _ratio_with_stderr(
        numerator_probes, frobenius_probes, n * inverse_residual_sq, numerator_exact, frobenius_exact
    )
    mu_hessian = mu_hessian_stderr = None
    if hessian:
        mu_hessian, mu_hessian_stderr = _stochastic_hessian_alignment(
            problem, theta, pulled[:, :num_probes], inverse_residual_sq, generator
        )
    return AlignmentResult(
        mu=mu,
        mu_min=None,
        trace_sigma_g=(numerator_exact + numerator_probes.mean().item()) / n**2,
        loss=residual_sq / (2 * n),
        gn_frobenius=math.sqrt(frobenius_exact + frobenius_probes.mean().item()) / n,
        stderr=stderr,
        mu_hessian=mu_hessian,
        mu_hessian_stderr=mu_hessian_stderr,
        num_samples=n,
        num_outputs=outputs,
        method="stochastic",
        num_probes=num_probes,
    )


def _stochastic_hessian_alignment(
    problem: Problem,
    theta: Tensor,
    centred_sums: Tensor,
    inverse_residual_sq: float,
    generator: torch.Generator,
) -> tuple[float, float]:
    """tr(Sigma H) / (2 L ||H||_F^2) by Hutchinson, with the delta-method standard error.

    tr(Sigma H) = (1/n) sum_i (g_i - g)^T H (g_i - g) = E[w^T H w] / n for the centred sums
    w = sum_i (z_i - mean z) g_i, so mu_H = E[w^T H w] / (||e||^2 ||H||_F^2) with
    ||H||_F^2 = E ||H z||^2 over independent Rademacher z in R^p.
    """
    num_probes = centred_sums.shape[1]
    frobenius_probes = _rademacher(problem.num_params, num_probes, generator, problem.device).to(
        problem.dtype
    )
    columns = torch.cat([centred_sums, frobenius_probes], dim=1)
    curvature = hessian_operator(problem, theta)
    images = _in_blocks(lambda block: curvature @ block, columns).to(torch.float64)
    quadratic = (columns.to(torch.float64) * images)[:, :num_probes].sum(dim=0)
    frobenius_sq = images[:, num_probes:].pow(2).sum(dim=0)
    return _ratio_with_stderr(quadratic, frobenius_sq, inverse_residual_sq)
