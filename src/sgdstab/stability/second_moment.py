"""The second-moment map T of linearised SGD at a square-loss minimum, in sample space (SPEC.md section 3).

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
import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from sgdstab.errors import InputError
from sgdstab.estimators import LanczosProcess
from sgdstab.operators import LinearOperator
from sgdstab.sample_space import GramSpectrum, worst_case_alignment

#: How ``_top_eigenpair`` solves: "dense" builds the map's matrix, "lanczos" runs Lanczos, "auto"
#: picks dense up to ``DENSE_EIGEN_MAX_DIM`` free entries.
EIGEN_SOLVERS = ("auto", "dense", "lanczos")
#: Symmetric matrices with up to this many free entries r(r+1)/2 get a dense eigensolver.
DENSE_EIGEN_MAX_DIM = 64
#: Lanczos stops once its top Ritz value is within this relative error by the Kato-Temple estimate
#: residual^2 / gap (``_top_eigenpair``).
_EIGENVALUE_RTOL = 1e-12
#: Newton's steps far from the root need f only to a fraction of f - 1 (inexact Newton).
_LOOSE_EIGENVALUE_RTOL = 1e-6
#: A relative residual this small ends Lanczos whatever the gap (a zero gap included).
_RESIDUAL_RTOL = 1e-10
#: Lanczos vectors kept before an explicit restart from the top Ritz vector (memory: this many
#: r(r+1)/2 float64 vectors, 182 MB each at r = 6748).
_LANCZOS_BASIS = 12
_NEWTON_LOOSE_BELOW = 1e-3
#: Newton on rho - 1 stops when a step is below this (rho itself is reported as 1 + s anyway).
_SHIFT_ATOL = 1e-16


class _SymmetricMatrixSpace:
    """svec: symmetric size x size matrices as vectors of their size(size+1)/2 free entries.

    Row by row, the diagonal entry then sqrt(2) times the rest of the upper triangle, so the
    Euclidean inner product of two vectors is the Frobenius one of their matrices (an isometry).
    Packed by a loop over rows rather than through index arrays: at r = 6748 the two int64 index
    arrays of ``triu_indices`` would take 364 MB beside 182 MB per vector.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        self.size, self.dtype, self.device = size, dtype, device
        self.dim = size * (size + 1) // 2
        self._offsets = [0, *itertools.accumulate(range(size, 0, -1))]
        self._diagonal_slots = torch.tensor(self._offsets[:-1], device=device)

    def pack(self, matrix: Tensor) -> Tensor:
        packed = torch.cat([matrix[row, row:] for row in range(self.size)]).mul_(math.sqrt(2.0))
        packed[self._diagonal_slots] = matrix.diagonal()
        return packed

    def unpack(self, vector: Tensor) -> Tensor:
        upper = torch.zeros(self.size, self.size, dtype=self.dtype, device=self.device)
        for row in range(self.size):
            upper[row, row:] = vector[self._offsets[row] : self._offsets[row + 1]]
        symmetric = (upper + upper.T).div_(math.sqrt(2.0))
        symmetric.diagonal().copy_(vector[self._diagonal_slots])
        return symmetric


class _PackedMapOperator(LinearOperator):
    """A linear map on symmetric matrices, seen through svec as an operator on vectors."""

    def __init__(self, apply: Callable[[Tensor], Tensor], space: _SymmetricMatrixSpace):
        super().__init__(space.dim, space.dtype, space.device)
        self._apply, self._space = apply, space

    def _matmat(self, columns: Tensor) -> Tensor:
        images = [self._space.pack(self._apply(self._space.unpack(column))) for column in columns.T]
        return torch.stack(images, dim=1)


def _top_eigenpair(
    apply: Callable[[Tensor], Tensor],
    size: int,
    start: Tensor,
    rtol: float = _EIGENVALUE_RTOL,
    solver: str = "auto",
) -> tuple[float, Tensor]:
    """Largest eigenpair of a self-adjoint linear map on size x size symmetric matrices.

    The eigenvector comes with unit Frobenius norm.

    The map is seen through the isometry svec (``_SymmetricMatrixSpace``), so antisymmetric
    matrices, which second moments never are, stay out of the spectrum. Small maps are built
    densely; larger ones go to Lanczos with full reorthogonalisation (``estimators.lanczos``) from
    ``start``, in float64. Lanczos stops when the top Ritz value theta, with relative residual
    rho = ||F y - theta y|| / theta, has rho^2 / gamma <= ``rtol`` and moved by at most ``rtol``
    relative in the last step, gamma being the relative gap to the second Ritz value; or when rho
    <= 1e-10. By the Kato-Temple inequality (Parlett, The Symmetric Eigenvalue Problem, SIAM 1998,
    ch. 10) theta is then within about ``rtol`` relative of the top eigenvalue, where a rule on the
    residual alone would need about twice the steps (the error is about the residual squared).
    The Krylov basis restarts from the top Ritz vector after ``_LANCZOS_BASIS`` vectors, which
    bounds its memory (12 vectors of r(r+1)/2 float64 entries: 2.2 GB at r = 6748). Measured on
    MNIST MLPs (benchmarks/stability.py workloads, B = 32, float32 products, 2 threads): n = 300,
    C = 10 (r = 3000): 17 products (18 with the restarts) instead of ARPACK ``eigsh``'s 31 (ncv 10,
    residual 1e-10), eta* within 3e-13 relative of the same Lanczos run to residual 1e-10 (26
    products); n = 2000, C = 1 (r = 1328): 10 products instead of 16, within 5e-16. That is far
    below what float32 products carry: they make F symmetric only to float32 rounding, and runs
    along different Krylov paths (ARPACK, or Lanczos with other restarts) differ by up to 3e-9.
    ``solver`` ("auto", "dense" or "lanczos") forces one of the two.
    """
    space = _SymmetricMatrixSpace(size, start.dtype, start.device)
    if solver == "dense" or (solver == "auto" and space.dim <= DENSE_EIGEN_MAX_DIM):
        basis = torch.eye(space.dim, dtype=start.dtype, device=start.device)
        dense = torch.stack([space.pack(apply(space.unpack(column))) for column in basis], dim=1)
        values, vectors = torch.linalg.eigh((dense + dense.T) / 2)
        return values[-1].item(), space.unpack(vectors[:, -1])

    operator = _PackedMapOperator(apply, space)
    packed = space.pack(start)
    # The generator only serves an exhausted Krylov space (a restart direction); seeded, so reruns agree.
    generator = torch.Generator(device=start.device).manual_seed(0)
    previous = math.nan
    while True:
        process = LanczosProcess(operator, packed[:, None], generator)
        while True:
            process.step()
            values, coefficients, beta = process.ritz()
            top = values[-1].item()
            residual = abs(beta.item() * coefficients[-1, -1].item()) / abs(top)
            gap = (top - values[-2].item()) / abs(top) if len(values) > 1 else math.nan
            settled = residual**2 <= rtol * gap and abs(top - previous) <= rtol * abs(top)
            done = settled or residual <= _RESIDUAL_RTOL or process.num_steps == space.dim
            previous = top
            if done or process.num_steps == _LANCZOS_BASIS:
                break
        packed = process.ritz_vectors(coefficients[:, -1:])[:, 0]
        del process  # its basis, before the next one grows
        if done:
            return top, space.unpack(packed / packed.norm())


class SecondMomentMap:
    """The second-moment map T of linearised SGD at a minimum, in row-space coordinates (module doc).

    Args:
        spectrum: K on its range, from ``sample_space.gram_spectrum``.
        batch_noise: p_B (``batch_noise_factor``).
        solver: eigensolver of the threshold and the growth factor: "auto" (dense for small rank,
            Lanczos otherwise), "dense" or "lanczos"; all give the same numbers to their tolerance.
        kernel_dtype: dtype of the two nC x r x r matrix products of ``noise``, which are all but
            all of the cost of the threshold and the growth factor. Default: the dtype K was
            computed in (``spectrum.source_dtype``), since products rounded at K's own precision
            add no error of a larger order than K already carries; everything else, and the
            eigensolvers and root-finding, stay float64. Measured on an MNIST MLP (nC = 1000,
            float32 K): float32 products moved eta* by 1.3e-10 relative and rho(T) at 0.9 eta*
            by 2e-15, in half the CPU time (nC = 2000, C = 1: eta* by 4.7e-10).
    """

    def __init__(
        self,
        spectrum: GramSpectrum,
        batch_noise: float,
        solver: str = "auto",
        kernel_dtype: torch.dtype | None = None,
    ):
        if solver not in EIGEN_SOLVERS:
            raise InputError(f"solver must be one of {EIGEN_SOLVERS}, got {solver!r}")
        self.spectrum = spectrum
        self.batch_noise = batch_noise
        self.solver = solver
        self.num_samples, self.num_outputs = spectrum.num_samples, spectrum.num_outputs
        values = spectrum.values
        #: H = diag(curvature) in the row-space basis: the nonzero eigenvalues of G = K/n.
        self.curvature = values / self.num_samples
        #: M stacked (nC x r): u = M a maps row-space coordinates to residuals.
        self.factors = spectrum.vectors * values.sqrt()
        #: The same, one C x r block M_i per sample: (n, C, r).
        self.sample_factors = self.factors.reshape(self.num_samples, self.num_outputs, -1)
        #: ``factors`` in ``kernel_dtype`` (the same tensor when that is float64).
        self._kernel_factors = self.factors.to(kernel_dtype or spectrum.source_dtype)

    def _drift(self) -> Tensor:
        """A(S) = drift * S: the r x r matrix h_a + h_b (built when needed: 364 MB at r = 6748)."""
        return self.curvature[:, None] + self.curvature[None, :]

    @property
    def rank(self) -> int:
        return self.curvature.numel()

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue of H: that of K, over n."""
        return self.curvature[-1].item()

    @property
    def hessian_frobenius(self) -> float:
        """The Frobenius norm of H, ||K||_F / n."""
        return self.curvature.pow(2).sum().sqrt().item()

    @property
    def trace(self) -> float:
        """The trace of H, tr K / n."""
        return self.curvature.sum().item()

    @functools.cached_property
    def mu_min(self) -> float:
        """The worst-case alignment over range(K) (``sample_space.worst_case_alignment``)."""
        return worst_case_alignment(self.spectrum)

    def noise(self, moment: Tensor) -> Tensor:
        """D(S) = E[H_batch S H_batch] = (p_B/n) sum_i H_i S H_i + (1 - p_B) H S H.

        The sum over samples is two matrix products, M^T [bdiag(M S M^T) M], with the n C x C
        blocks M_i S M_i^T and their products with M_i batched (no loop over samples).
        """
        stacked = self._kernel_factors
        factors = stacked.reshape(self.sample_factors.shape)
        projected = (stacked @ moment.to(stacked.dtype)).reshape(factors.shape)
        inner = torch.bmm(projected, factors.transpose(1, 2))  # M_i S M_i^T, (n, C, C)
        per_sample = (stacked.T @ torch.bmm(inner, factors).reshape(-1, self.rank)).to(moment.dtype)
        mean = (moment * self.curvature[None, :]).mul_(self.curvature[:, None])
        # In place: at r = 6748 each r x r float64 temporary is 364 MB.
        return per_sample.mul_(self.batch_noise / self.num_samples).add_(mean, alpha=1 - self.batch_noise)

    def __call__(self, moment: Tensor, lr: float) -> Tensor:
        """T'(S) = S - eta A(S) + eta^2 D(S)."""
        return moment - lr * self._drift() * moment + lr**2 * self.noise(moment)

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

    def _shifted_drift(self, shift: float, lr: float) -> Tensor:
        """P(S) = (shift + lr (h_a + h_b)) * S_ab, floored at the rounding level of the sum.

        Near the diagonal bound the smallest entries are differences of nearly equal numbers; the
        floor keeps them positive when rounding would not, which moves rho by O(eps) only.
        """
        scaled_drift = self._drift().mul_(lr)
        floor = torch.finfo(scaled_drift.dtype).eps * scaled_drift.max().item()
        return scaled_drift.add_(shift).clamp_(min=floor)

    def _top_of_scaled_noise(
        self, shift: float, lr: float, start: Tensor, rtol: float = _EIGENVALUE_RTOL
    ) -> tuple[float, Tensor]:
        """Top eigenpair (f, Y) of F = lr^2 P^{-1/2} D P^{-1/2} (P: ``_shifted_drift``).

        F is symmetric PSD; f = 1 exactly when T'(X) = (1 + shift) X for X = P^{-1/2} Y.
        """
        scale = self._shifted_drift(shift, lr).rsqrt_()
        return _top_eigenpair(
            lambda moment: self.noise(scale * moment).mul_(scale).mul_(lr**2),
            self.rank,
            start,
            rtol,
            self.solver,
        )

    @functools.cached_property
    def _threshold_pair(self) -> tuple[float, Tensor]:
        # At shift 0 and lr 1, F = A^{-1/2} D A^{-1/2}. Its top eigenvector is sqrt(A) * S* with S*
        # PSD (Perron-Frobenius), so this start overlaps it by sum_a 2 h_a S*_aa > 0.
        return self._top_of_scaled_noise(0.0, 1.0, torch.diag((2 * self.curvature).sqrt()))

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
            pulled = vector * self._shifted_drift(shift, lr).rsqrt()
            step = (value - 1) / (value * pulled.pow(2).sum().item())
            updated = max(shift + step, floor)
            if abs(updated - shift) <= rtol * abs(updated) or abs(updated - shift) <= _SHIFT_ATOL:
                return 1.0 + updated
            shift = updated
            # Far from the root Newton needs f only to a fraction of f - 1 (inexact Newton).
            rtol = _EIGENVALUE_RTOL if abs(value - 1) < _NEWTON_LOOSE_BELOW else _LOOSE_EIGENVALUE_RTOL
            value, vector = self._top_of_scaled_noise(shift, lr, vector, rtol)
        return 1.0 + shift
