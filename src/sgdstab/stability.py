"""Linear stability of SGD at a square-loss minimum, in sample space (SPEC.md section 3).

Linearised at a minimum theta*, SGD moves delta_{t+1} = (I - eta H_batch) delta_t with
H_batch = (1/B) sum_b J_{i_b}^T J_{i_b} (Wu, Wang & Su 2022; Ma & Ying 2021). The residual
u_t = J delta_t has second moment N_t = E[u_t u_t^T] evolving by the linear map

    T(N) = N - (eta/n)(K N + N K) + eta^2 [ (p_B/n) K bdiag(N) K + ((1 - p_B)/n^2) K N K ],

p_B = 1/B with replacement, (n - B)/(B (n - 1)) without. Everything here is computed in the row
space of J without a p x p matrix: with K = V diag(w) V^T on range(K), the orthonormal basis
Phi = J^T V diag(w)^{-1/2} of range(J^T) turns H into diag(w)/n and the per-sample
H_i = J_i^T J_i into M_i^T M_i with M_i = V_i diag(w)^{1/2} (V_i: sample i's C rows of V).
In these coordinates delta = Phi a, N = M S M^T with S = E[a a^T] (r x r), and

    T'(S) = S - eta A(S) + eta^2 D(S),  A(S) = (w_a + w_b)/n * S_ab (elementwise),
    D(S) = (p_B/n) sum_i H_i S H_i + (1 - p_B) H S H,

where A and D are self-adjoint under the Frobenius inner product and D is PSD
(tr(S H_i S H_i) = ||H_i^{1/2} S H_i^{1/2}||_F^2): the parameter-space second-moment operator of
Ma & Ying (2021) and Mulayoff & Michaeli (2023), but r x r instead of p^2 x p^2.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.sparse.linalg
import torch
from torch import Tensor

from sgdstab.alignment import worst_case_alignment
from sgdstab.problem import Problem
from sgdstab.sample_space import (
    DEFAULT_MAX_GRAM_ENTRIES,
    DEFAULT_MAX_JACOBIAN_ENTRIES,
    GramSpectrum,
    block_congruence,
    gram_matrix,
    gram_spectrum,
)

SAMPLINGS = ("with_replacement", "without_replacement")
CRITERIA = ("exact", "frobenius", "gd", "trace", "mulayoff15", "mulayoff16", "mulayoff24", "wme")
#: Symmetric matrices with up to this many free entries r(r+1)/2 get a dense eigensolver.
_DENSE_EIGEN_MAX_DIM = 64
_EIGSH_TOL = 1e-10
_EIGSH_LOOSE_TOL = 1e-6
#: Lanczos vectors ARPACK keeps between restarts (memory: this many r x r matrices).
_LANCZOS_BASIS = 10
_NEWTON_LOOSE_BELOW = 1e-3
#: Newton on rho - 1 stops when a step is below this (rho itself is reported as 1 + s anyway).
_SHIFT_ATOL = 1e-16
#: Starting directions for maximising Mulayoff & Michaeli's (24), from each family.
_MULAYOFF24_STARTS = 4


def batch_noise_factor(num_samples: int, batch_size: int, sampling: str) -> float:
    """p_B: mini-batch noise covariance is p_B Sigma (SPEC.md section 1).

    1/B with replacement; (n - B)/(B (n - 1)) without (0 when B = n: every batch is the full data).
    """
    check_sgd_arguments(num_samples, 1.0, batch_size, sampling)
    if sampling == "with_replacement":
        return 1.0 / batch_size
    if batch_size == num_samples:
        return 0.0
    return (num_samples - batch_size) / (batch_size * (num_samples - 1))


def check_sgd_arguments(num_samples: int, lr: float, batch_size: int, sampling: str) -> None:
    """ValueError with a one-line reason for a learning rate, batch size or sampling SGD cannot use."""
    if isinstance(lr, bool) or not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    integral = isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
    if not (integral and 1 <= batch_size <= num_samples):
        raise ValueError(f"batch_size must be an integer between 1 and n={num_samples}, got {batch_size!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")


def _top_eigenpair(
    apply: Callable[[Tensor], Tensor], size: int, start: Tensor, tol: float = _EIGSH_TOL
) -> tuple[float, Tensor]:
    """Largest eigenvalue of a self-adjoint linear map on size x size symmetric matrices, and its
    eigenvector (unit Frobenius norm).

    The map is seen through the isometry svec (diagonal, then sqrt(2) times the upper triangle),
    so antisymmetric matrices, which second moments never are, stay out of the spectrum. Small
    maps are built densely; larger ones go to Lanczos (ARPACK ``eigsh``) from ``start``, to a
    relative residual ``tol`` (the eigenvalue's error is about the residual squared over the gap).
    """
    rows, cols = torch.triu_indices(size, size, device=start.device)
    weights = torch.where(rows == cols, 1.0, math.sqrt(2.0)).to(start.dtype)

    def svec(matrix: Tensor) -> Tensor:
        return matrix[rows, cols] * weights

    def smat(vector: Tensor) -> Tensor:
        upper = torch.zeros(size, size, dtype=start.dtype, device=start.device)
        upper[rows, cols] = vector / weights
        return upper + upper.T - torch.diag(upper.diagonal())

    dim = weights.numel()
    if dim <= _DENSE_EIGEN_MAX_DIM:
        basis = torch.eye(dim, dtype=start.dtype, device=start.device)
        dense = torch.stack([svec(apply(smat(column))) for column in basis], dim=1)
        values, vectors = torch.linalg.eigh((dense + dense.T) / 2)
        return values[-1].item(), smat(vectors[:, -1])

    def matvec(vector: np.ndarray) -> np.ndarray:
        image = apply(smat(torch.as_tensor(np.ravel(vector), dtype=start.dtype, device=start.device)))
        return svec(image).cpu().numpy()

    operator = scipy.sparse.linalg.LinearOperator((dim, dim), matvec=matvec, dtype=np.float64)
    values, vectors = scipy.sparse.linalg.eigsh(
        operator, k=1, which="LA", v0=svec(start).cpu().numpy(), tol=tol, ncv=min(dim, _LANCZOS_BASIS)
    )
    return float(values[0]), smat(torch.as_tensor(vectors[:, 0], dtype=start.dtype, device=start.device))


class SecondMomentMap:
    """The second-moment map T of linearised SGD at a minimum, in row-space coordinates (module doc).

    Args:
        spectrum: K on its range, from ``sample_space.gram_spectrum``.
        batch_noise: p_B (``batch_noise_factor``).
    """

    def __init__(self, spectrum: GramSpectrum, batch_noise: float):
        self.spectrum = spectrum
        self.batch_noise = batch_noise
        self.num_samples, self.num_outputs = spectrum.num_samples, spectrum.num_outputs
        values = spectrum.values
        #: H = diag(curvature) in the row-space basis: the nonzero eigenvalues of G = K/n.
        self.curvature = values / self.num_samples
        #: M stacked (nC x r): u = M a maps row-space coordinates to residuals.
        self.factors = spectrum.vectors * values.sqrt()
        #: The same, one C x r block M_i per sample: (n, C, r).
        self.sample_factors = self.factors.reshape(self.num_samples, self.num_outputs, -1)
        self._drift = self.curvature[:, None] + self.curvature[None, :]

    @property
    def rank(self) -> int:
        return self.curvature.numel()

    def noise(self, moment: Tensor) -> Tensor:
        """D(S) = E[H_batch S H_batch] = (p_B/n) sum_i H_i S H_i + (1 - p_B) H S H."""
        factors = self.sample_factors
        projected = (self.factors @ moment).reshape(factors.shape)
        inner = torch.bmm(projected, factors.transpose(1, 2))  # M_i S M_i^T, (n, C, C)
        per_sample = self.factors.T @ torch.bmm(inner, factors).reshape(-1, self.rank)
        mean = self.curvature[:, None] * moment * self.curvature[None, :]
        return (self.batch_noise / self.num_samples) * per_sample + (1 - self.batch_noise) * mean

    def __call__(self, moment: Tensor, lr: float) -> Tensor:
        """T'(S) = S - eta A(S) + eta^2 D(S)."""
        return moment - lr * self._drift * moment + lr**2 * self.noise(moment)

    def to_sample_space(self, moment: Tensor) -> Tensor:
        """N = M S M^T, the residual second moment."""
        return self.factors @ moment @ self.factors.T

    def from_sample_space(self, moment: Tensor) -> Tensor:
        """S with M S M^T = N, for N supported on range(K) (where every N_t of linearised SGD lies)."""
        unscaled = self.spectrum.vectors.T @ moment @ self.spectrum.vectors
        scale = self.spectrum.values.rsqrt()
        return scale[:, None] * unscaled * scale[None, :]

    def sample_space_step(self, moment: Tensor, lr: float) -> Tensor:
        """T(N) of SPEC.md section 3 for a sample-space second moment N on range(K)."""
        return self.to_sample_space(self(self.from_sample_space(moment), lr))

    def _diagonal(self, shift: float, lr: float) -> Tensor:
        """P(S) = (shift + lr (h_a + h_b)) * S_ab, floored at the rounding level of the sum.

        Near the diagonal bound the smallest entries are differences of nearly equal numbers; the
        floor keeps them positive when rounding would not, which moves rho by O(eps) only.
        """
        scaled_drift = lr * self._drift
        return (shift + scaled_drift).clamp(
            min=torch.finfo(scaled_drift.dtype).eps * scaled_drift.max().item()
        )

    def _balance(
        self, shift: float, lr: float, start: Tensor, tol: float = _EIGSH_TOL
    ) -> tuple[float, Tensor]:
        """Top eigenpair (f, Y) of F = lr^2 P^{-1/2} D P^{-1/2} (P: ``_diagonal``).

        F is symmetric PSD; f = 1 exactly when T'(X) = (1 + shift) X for X = P^{-1/2} Y.
        """
        scale = self._diagonal(shift, lr).rsqrt()
        return _top_eigenpair(
            lambda moment: lr**2 * scale * self.noise(scale * moment), self.rank, start, tol
        )

    @functools.cached_property
    def _threshold_pair(self) -> tuple[float, Tensor]:
        # At shift 0 and lr 1, F = A^{-1/2} D A^{-1/2}. Its top eigenvector is sqrt(A) * S* with S*
        # PSD (Perron-Frobenius), so this start overlaps it by sum_a 2 h_a S*_aa > 0.
        return self._balance(0.0, 1.0, torch.diag(self._drift.diagonal().sqrt()))

    def threshold(self) -> float:
        """eta* = 1 / lambda_max(A^{-1} D) (Ma & Ying 2021; Mulayoff & Michaeli 2023).

        For an eigenpair D S = lambda A S, T'(S) = S + eta (eta lambda - 1) A S, so T' has the
        eigenvalue 1 exactly at eta = 1/lambda. A^{-1} D is similar to the symmetric PSD
        A^{-1/2} D A^{-1/2}, whose top eigenvalue Lanczos finds in few applications.
        """
        top = self._threshold_pair[0]
        return 1.0 / top if top > 0 else math.inf

    def spectral_radius(self, lr: float, max_steps: int = 50, rtol: float = 1e-12) -> float:
        """rho(T) at ``lr``: the per-step growth factor of E L~.

        T' is self-adjoint and maps PSD to PSD, so rho is its largest eigenvalue (Perron-Frobenius).
        Lanczos on T' itself crawls: its r^2/2 eigenvalues crowd just below 1 (pairs of flat
        directions). Instead, with rho = 1 + s, (1 + s) - T' = P_s - lr^2 D, P_s = s + lr A
        elementwise, so for s above the diagonal bound max_a <E_aa, (T' - I) E_aa> (where P_s > 0)
        rho - 1 is the root of f(s) = lambda_max(lr^2 P_s^{-1/2} D P_s^{-1/2}) = 1 (Sylvester's
        inertia). f is convex and decreasing (a maximum of c/(s + d) terms), so Newton's method,
        with f'(s) = -f ||P_s^{-1/2} Y||^2 from the unit top eigenvector Y, climbs monotonically to
        the root after its first step, and each step is one well-separated, warm-started
        eigenproblem. The first step starts at s = 0, where f = lr / eta*. The shift s is carried
        on its own, never as 1 + s, so slow modes (rho = 1 - 1e-12) keep their digits.
        """
        value, vector = self._threshold_pair
        value, shift = lr * value, 0.0
        column_mass = self.sample_factors.pow(2).sum(dim=1)  # (H_i)_aa, (n, r)
        diagonal_noise = (self.batch_noise / self.num_samples) * column_mass.pow(2).sum(dim=0)
        diagonal_noise += (1 - self.batch_noise) * self.curvature**2
        floor = (lr**2 * diagonal_noise - 2 * lr * self.curvature).max().item()
        for _ in range(max_steps):
            pulled = vector * self._diagonal(shift, lr).rsqrt()
            step = (value - 1) / (value * pulled.pow(2).sum().item())
            updated = max(shift + step, floor)
            if abs(updated - shift) <= rtol * abs(updated) or abs(updated - shift) <= _SHIFT_ATOL:
                return 1.0 + updated
            shift = updated
            # Far from the root Newton needs f only to a fraction of f - 1 (inexact Newton).
            tol = _EIGSH_TOL if abs(value - 1) < _NEWTON_LOOSE_BELOW else _EIGSH_LOOSE_TOL
            value, vector = self._balance(shift, lr, vector, tol)
        return 1.0 + shift


def _mulayoff15(moment: SecondMomentMap) -> float:
    """Mulayoff & Michaeli (2023), their (15): 2l / (l^2 + (p_B/n) sum_i (v^T H_i v - l)^2).

    l = lambda_max(H), v its eigenvector.
    """
    top = moment.rank - 1
    top_curvature = moment.curvature[top].item()
    along = moment.sample_factors[:, :, top].pow(2).sum(dim=1)  # v^T H_i v = ||M_i v||^2
    spread = (along - top_curvature).pow(2).sum().item()
    return 2 * top_curvature / (top_curvature**2 + moment.batch_noise / moment.num_samples * spread)


def _mulayoff16(moment: SecondMomentMap) -> float:
    """Mulayoff & Michaeli (2023), their (16): 2 tr H / ((1 - p_B) ||H||_F^2 + (p_B/n) sum_i ||H_i||_F^2)."""
    factors = moment.sample_factors
    # ||H_i||_F = ||M_i^T M_i||_F = ||M_i M_i^T||_F, a C x C matrix.
    per_sample = torch.bmm(factors, factors.transpose(1, 2)).pow(2).sum().item()
    denominator = (1 - moment.batch_noise) * moment.curvature.pow(2).sum().item()
    denominator += moment.batch_noise / moment.num_samples * per_sample
    return 2 * moment.curvature.sum().item() / denominator


def _mulayoff24(moment: SecondMomentMap) -> float:
    """Mulayoff & Michaeli (2023), their (24): 2/eta* >= max_{|v|=1} v^T H v + p_B Var_i(v^T H_i v) / v^T H v.

    Var_i is the mean over samples of (v^T H_i v - v^T H v)^2. Every v gives a valid necessary
    condition, so the maximum found by L-BFGS on phi(a)/|a|^2 over the row space, from the top
    eigenvectors of H and the top singular vectors of the sharpest samples' M_i, is a bound
    whatever the optimiser's luck; from the top eigenvector it is already their (15).
    """
    n, p_b, curvature = moment.num_samples, moment.batch_noise, moment.curvature
    factors = moment.sample_factors

    def negative_objective(point: np.ndarray) -> tuple[float, np.ndarray]:
        a = torch.as_tensor(point, dtype=curvature.dtype, device=curvature.device)
        outputs = factors @ a  # M_i a, (n, C)
        along = outputs.pow(2).sum(dim=1)
        mean = (curvature * a**2).sum()
        deviation = along - mean  # sums to zero: mean is the average of v^T H_i v
        variance = deviation.pow(2).mean()
        phi = mean + p_b * variance / mean
        grad_mean = 2 * curvature * a
        grad_variance = (4 / n) * (factors * (deviation[:, None, None] * outputs[:, :, None])).sum(dim=(0, 1))
        grad_phi = grad_mean + p_b * (grad_variance / mean - variance * grad_mean / mean**2)
        norm_sq = a @ a
        value = phi / norm_sq
        grad = grad_phi / norm_sq - 2 * value * a / norm_sq
        return -value.item(), -grad.cpu().numpy()

    starts = []
    for index in range(moment.rank - 1, max(moment.rank - 1 - _MULAYOFF24_STARTS, -1), -1):
        starts.append(torch.zeros(moment.rank, dtype=curvature.dtype))
        starts[-1][index] = 1.0
    sharpest = torch.linalg.matrix_norm(factors).argsort(descending=True)[:_MULAYOFF24_STARTS]
    starts += [torch.linalg.svd(factors[i], full_matrices=False).Vh[0].cpu() for i in sharpest.tolist()]
    best = 0.0
    for start in starts:
        initial = -negative_objective(start.numpy())[0]
        found = scipy.optimize.minimize(negative_objective, start.numpy(), jac=True, method="L-BFGS-B")
        best = max(best, initial, -found.fun)
    return 2 / best


def _wme(moment: SecondMomentMap) -> float:
    """Wu, Ma & E (2018): the largest eta with lambda_max((I - eta H)^2 + eta^2 p_B Sigma_H) <= 1.

    Sigma_H = (1/n) sum_i H_i^2 - H^2. This one-step condition (E||delta_{t+1}||^2 <= ||delta_t||^2
    for every delta) is SUFFICIENT for linear stability only, so this threshold lies below the
    exact one. It rearranges to eta [(1 - p_B) H^2 + p_B (1/n) sum_i H_i^2] <= 2H, i.e.
    eta <= 2 / lambda_max(H^{-1/2} [...] H^{-1/2}) in closed form (what bisection would find);
    in the row-space basis H^{-1/2} (1/n) sum_i H_i^2 H^{-1/2} = sum_i V_i^T (M_i M_i^T) V_i.
    """
    factors = moment.sample_factors
    blocks = torch.bmm(factors, factors.transpose(1, 2))
    matrix = moment.batch_noise * block_congruence(moment.spectrum.vectors, blocks)
    matrix = matrix + torch.diag((1 - moment.batch_noise) * moment.curvature)
    return 2 / torch.linalg.eigvalsh((matrix + matrix.T) / 2)[-1].item()


@dataclass(frozen=True)
class StabilityResult:
    """Linear stability of SGD(lr, batch_size, sampling) at one minimum (SPEC.md section 3).

    The curvature is H = G = K/n, exact at an interpolating minimum (elsewhere G stands in for H).
    growth_factor: rho(T) at lr, the per-step growth factor of E L~. stable: growth_factor <= 1.
    thresholds: the largest stable lr by each criterion (CRITERIA, ``stability`` says which are
        necessary and which sufficient); math.inf where a criterion puts no limit (e.g. no noise).
    escape_factor: lr^2 p_B mu_min ||H||_F^2; when > 1, E L~_t >= escape_factor^t L~_0.
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


def _safe_inverse(value: float) -> float:
    return 1 / value if value > 0 else math.inf


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
) -> StabilityResult:
    """Is ``theta`` a linearly stable minimum for SGD(lr, batch_size, sampling)? (SPEC.md section 3)

    Thresholds (largest stable lr, same minimum, batch size and sampling):
    - "exact": 1 / lambda_max(A^+ D) (Ma & Ying 2021; Mulayoff & Michaeli 2023).
    - "frobenius": 1 / (||H||_F sqrt(p_B mu_min)) (Wu, Wang & Su 2022), necessary.
    - "gd": 2 / lambda_max(H) (Cohen et al. 2021, edge of stability), necessary.
    - "trace": 2 / (p_B tr H) (Wu & Su 2023 form for general B), reported as their criterion.
    - "mulayoff15", "mulayoff16", "mulayoff24": Mulayoff & Michaeli (2023), their (15), (16),
      (24), necessary.
    - "wme": Wu, Ma & E (2018) one-step condition, sufficient only.

    The analysis linearises at an interpolating minimum, so a warning (in the result and through
    ``warnings.warn``) flags a loss above ``minimum_rtol`` times ||y||^2/(2n), the loss of the zero
    predictor (1 when all targets are zero). The gradient needs no separate test: for square loss
    ||g||^2 = e^T K e / n^2 <= 2 L lambda_max(G), so a small loss bounds it.

    Cost: K (``sample_space.gram_matrix``; refused when nC x nC exceeds ``max_gram_entries``),
    two (nC)^3 eigendecompositions, and Lanczos on r x r matrices at O(nC r^2) per application
    for the exact threshold and the growth factor. ``rank_rtol``: see ``gram_spectrum``.
    """
    problem.require_square_loss("linear stability of SGD")
    check_sgd_arguments(problem.num_samples, lr, batch_size, sampling)
    lr, batch_size = float(lr), int(batch_size)
    theta = (problem.parameters() if theta is None else theta).detach()
    gram = gram_matrix(problem, theta, max_jacobian_entries, max_gram_entries)
    spectrum = gram_spectrum(gram, problem.num_outputs, rank_rtol)
    moment = SecondMomentMap(spectrum, batch_noise_factor(problem.num_samples, batch_size, sampling))
    n, p_b = problem.num_samples, moment.batch_noise

    residuals = problem.residuals(theta).reshape(-1).to(torch.float64)
    loss = residuals.pow(2).sum().item() / (2 * n)
    gradient_norm = math.sqrt(max(residuals @ spectrum.gram @ residuals, 0.0)) / n
    reference = sum(y.to(torch.float64).pow(2).sum().item() for _, y in problem.chunks()) / (2 * n) or 1.0
    notes: tuple[str, ...] = ()
    if loss > minimum_rtol * reference:
        notes = (
            f"not a minimum: the loss {loss:.3g} is {loss / reference:.2g} times that of the zero predictor "
            f"(tolerance {minimum_rtol:g}); the analysis linearises at an interpolating minimum "
            "and uses G in place of H",
        )
        warnings.warn(notes[0], stacklevel=2)

    lambda_max = moment.curvature[-1].item()
    frobenius = moment.curvature.pow(2).sum().sqrt().item()
    trace = moment.curvature.sum().item()
    mu_min = worst_case_alignment(spectrum)
    thresholds = {
        "exact": moment.threshold(),
        "frobenius": _safe_inverse(frobenius * math.sqrt(max(p_b * mu_min, 0.0))),
        "gd": 2 / lambda_max,
        "trace": 2 * _safe_inverse(p_b * trace),
        "mulayoff15": _mulayoff15(moment),
        "mulayoff16": _mulayoff16(moment),
        "mulayoff24": _mulayoff24(moment),
        "wme": _wme(moment),
    }
    growth = moment.spectral_radius(lr)
    escape = lr**2 * p_b * mu_min * frobenius**2
    return StabilityResult(
        lr=lr,
        batch_size=batch_size,
        sampling=sampling,
        batch_noise=p_b,
        growth_factor=growth,
        stable=growth <= 1.0,
        thresholds=thresholds,
        escape_factor=escape,
        log_escape_rate=math.log(escape) if escape > 0 else -math.inf,
        lambda_max=lambda_max,
        hessian_frobenius=frobenius,
        trace=trace,
        mu_min=mu_min,
        loss=loss,
        gradient_norm=gradient_norm,
        rank=moment.rank,
        num_samples=n,
        num_outputs=problem.num_outputs,
        warnings=notes,
    )


@dataclass(frozen=True)
class SimulationResult:
    """E L~_t of linearised SGD from a minimum, over independent chains.

    loss_mean, loss_stderr: (num_steps + 1,) float64, the mean over chains of
        L~_t = ||u_t||^2 / (2n) and its standard error (chain standard deviation / sqrt(chains)).
    growth_factor: (loss_mean[-1] / loss_mean[h])^(1 / (num_steps - h)), h = num_steps // 2: the
        empirical per-step factor after the first half; it tends to rho(T) as the run lengthens,
        slowly when rho comes from flat modes, which weigh little in L~.
    """

    loss_mean: Tensor
    loss_stderr: Tensor
    growth_factor: float
    lr: float
    batch_size: int
    sampling: str
    num_chains: int


def _batch_weights(
    num_chains: int, num_samples: int, batch_size: int, sampling: str, generator: torch.Generator
) -> Tensor:
    """(chains, n): how many times each sample is in each chain's batch, divided by B."""
    if sampling == "with_replacement":
        picks = torch.randint(num_samples, (num_chains, batch_size), generator=generator)
    else:
        picks = torch.rand(num_chains, num_samples, generator=generator).argsort(dim=1)[:, :batch_size]
    counts = torch.zeros(num_chains, num_samples, dtype=torch.float64)
    counts.scatter_add_(1, picks, torch.ones(num_chains, batch_size, dtype=torch.float64))
    return counts / batch_size


def simulate_linearized_sgd(
    problem: Problem,
    lr: float,
    batch_size: int,
    sampling: str = "with_replacement",
    num_steps: int = 100,
    num_chains: int = 1000,
    seed: int = 0,
    init: str | Tensor = "gaussian",
    theta: Tensor | None = None,
    max_jacobian_entries: int = DEFAULT_MAX_JACOBIAN_ENTRIES,
    max_gram_entries: int = DEFAULT_MAX_GRAM_ENTRIES,
) -> SimulationResult:
    """Run ``num_chains`` independent chains of linearised SGD at ``theta`` (SPEC.md section 3), batched.

    In sample space, with u = J delta and H_batch = (1/B) sum_b J_{i_b}^T J_{i_b},
    u_{t+1} = u_t - (eta/B) sum_b K[:, block i_b] u_t[block i_b] (a sample drawn twice with
    replacement counts twice). Batches come from a generator seeded with ``seed`` (on the CPU,
    so a seed gives the same batches on every device).

    init: "gaussian" starts every chain at an independent u_0 = J delta_0 with delta_0 ~ N(0, I_p),
        i.e. u_0 ~ N(0, K); a tensor of shape (nC,) or (num_chains, nC) gives u_0 itself (a
        parameter-space delta_0 maps to it by ``operators.ntk(problem).jacobian``).
    """
    problem.require_square_loss("linearised SGD")
    n, outputs = problem.num_samples, problem.num_outputs
    check_sgd_arguments(n, lr, batch_size, sampling)
    lr, batch_size = float(lr), int(batch_size)
    if num_steps < 1 or num_chains < 2:
        raise ValueError(f"need num_steps >= 1 and num_chains >= 2, got {num_steps} and {num_chains}")
    theta = (problem.parameters() if theta is None else theta).detach()
    gram = gram_matrix(problem, theta, max_jacobian_entries, max_gram_entries)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(init, Tensor):
        if init.shape not in ((n * outputs,), (num_chains, n * outputs)):
            raise ValueError(
                f"init must have shape ({n * outputs},) or ({num_chains}, {n * outputs}), got {tuple(init.shape)}"
            )
        residuals = init.to(device=gram.device, dtype=torch.float64).expand(num_chains, n * outputs).clone()
    elif init == "gaussian":
        spectrum = gram_spectrum(gram, outputs)
        draws = torch.randn(num_chains, spectrum.rank, generator=generator, dtype=torch.float64).to(
            gram.device
        )
        residuals = (draws * spectrum.values.sqrt()) @ spectrum.vectors.T
    else:
        raise ValueError(f'init must be "gaussian" or a tensor of residuals, got {init!r}')
    gram = gram.to(torch.float64)
    losses = torch.empty(num_steps + 1, num_chains, dtype=torch.float64)
    losses[0] = residuals.pow(2).sum(dim=1).cpu() / (2 * n)
    for step in range(1, num_steps + 1):
        weights = _batch_weights(num_chains, n, batch_size, sampling, generator).to(gram.device)
        residuals = residuals - lr * (weights.repeat_interleave(outputs, dim=1) * residuals) @ gram
        losses[step] = residuals.pow(2).sum(dim=1).cpu() / (2 * n)
    mean = losses.mean(dim=1)
    half = num_steps // 2
    return SimulationResult(
        loss_mean=mean,
        loss_stderr=losses.std(dim=1) / math.sqrt(num_chains),
        growth_factor=(mean[-1] / mean[half]).item() ** (1 / (num_steps - half)),
        lr=lr,
        batch_size=batch_size,
        sampling=sampling,
        num_chains=num_chains,
    )
