"""Per-sample Jacobians, the empirical NTK K = J J^T and its spectrum, in sample space.

SPEC.md section 1: J stacks the per-sample Jacobians J_i (C x p) sample-major, so row i*C + a of
J (and of K) belongs to output a of sample i. Everything in the alignment factor (SPEC.md
section 2) and in the linear stability of SGD at a minimum (section 3) is a function of K and the
residuals, so the exact paths build K once (nC x nC) and never a p x p matrix.

K is the sum of two parts. Plain ``nn.Linear`` layers contribute through their per-layer
factors (``gram_factors``: layer inputs and output gradients, no per-sample gradient). The other
parameters contribute J_r J_r^T from per-sample Jacobians of their columns of J: a panel of
rows J_a times every later panel J_b. Both parts are accumulated block by block, upper triangle
only, each block added to both triangles at once (no second nC x nC copy). When J_r (nC x p_r)
fits ``max_jacobian_entries`` it is computed once and sliced; otherwise each panel is recomputed
on every pass over the data, so memory holds two panels and K, whatever p.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import scipy.linalg
import torch
from torch import Tensor

from sgdstab.errors import DataError, InputError, ResourceLimitError
from sgdstab.gram_factors import LinearFactors, factorable_linear_layers, linear_factors
from sgdstab.problem import Problem

#: Entries of J held in memory at once (2**27 float32 = 512 MiB).
DEFAULT_MAX_JACOBIAN_ENTRIES = 2**27
#: Entries of one nC x nC sample-space matrix (2**26 float64 = 512 MiB, nC up to 8192).
DEFAULT_MAX_GRAM_ENTRIES = 2**26
#: Samples per Jacobian panel when the whole J is stored: large enough for efficient matmuls.
_STORED_PANEL_SAMPLES = 512
#: The float32 eigensolver's eigenvalue errors are taken to be below this many eps_32 ||K||_F.
_FLOAT32_EIGENVALUE_ERRORS = 10
#: Rows of K per block built from layer factors (2048 x 2048 float32 = 16 MiB): larger blocks make
#: fewer, more efficient products. Measured for K at nC = 8192 (MNIST MLP, 2 threads, shared box):
#: 12.0 CPU s with 512-row blocks, 6.4 with 2048.
_FACTOR_BLOCK_ROWS = 2048


def jacobian_panels(
    problem: Problem, theta: Tensor, max_samples: int, first_row: int = 0, columns: Tensor | None = None
) -> Iterator[tuple[slice, Tensor]]:
    """(rows, J[rows]) for consecutive panels of at most ``max_samples`` samples, in data order.

    Per-sample Jacobians come from ``vmap(jacrev)`` over ``problem.sample_function``; with
    ``columns`` (indices into theta) only those columns of J. Panels whose rows start before
    ``first_row`` are passed over without computing their Jacobian, so a pass that only needs
    the later panels costs only those.
    """
    if columns is None:
        per_sample = torch.func.vmap(
            torch.func.jacrev(lambda t, x: problem.sample_function(t)(x)), in_dims=(None, 0)
        )
        variable = theta
    else:
        per_sample = torch.func.vmap(
            torch.func.jacrev(lambda t, x: problem.sample_function(theta.index_put((columns,), t))(x)),
            in_dims=(None, 0),
        )
        variable = theta[columns]
    outputs = problem.num_outputs
    start = 0
    for x, _ in problem.chunks():
        for offset in range(0, len(x), max_samples):
            samples = x[offset : offset + max_samples]
            rows = slice((start + offset) * outputs, (start + offset + len(samples)) * outputs)
            if rows.start >= first_row:
                yield rows, per_sample(variable, samples).reshape(rows.stop - rows.start, -1)
        start += len(x)


def check_gram_fits(problem: Problem, max_gram_entries: int, hint: str) -> None:
    """Refuse, with a message that says what to do instead, when K (nC x nC) exceeds the budget."""
    size = problem.num_samples * problem.num_outputs
    if size * size > max_gram_entries:
        raise ResourceLimitError(
            f"the sample-space NTK K would be {size} x {size} (n={problem.num_samples} samples x "
            f"C={problem.num_outputs} outputs), {size * size:,} entries, more than "
            f"max_gram_entries={max_gram_entries:,}; {hint}"
        )


def gram_matrix(
    problem: Problem,
    theta: Tensor | None = None,
    max_jacobian_entries: int = DEFAULT_MAX_JACOBIAN_ENTRIES,
    max_gram_entries: int = DEFAULT_MAX_GRAM_ENTRIES,
    hint: str = "raise max_gram_entries or use fewer samples",
    factor_layers: bool = True,
) -> Tensor:
    """The empirical NTK K = J J^T (nC x nC, sample-major), in the problem's dtype.

    With ``factor_layers`` (the default), the share of every plain ``nn.Linear`` layer is built
    from its inputs and output gradients (``gram_factors``), and only the other parameters go
    through per-sample Jacobians; False builds all of K from per-sample Jacobians.
    Raises ResourceLimitError (with ``hint`` appended) when K itself does not fit ``max_gram_entries``.
    """
    problem.require_whole_data(f"the sample-space NTK K ({hint})")
    check_gram_fits(problem, max_gram_entries, hint)
    theta = (problem.parameters() if theta is None else theta).detach()
    size = problem.num_samples * problem.num_outputs
    layers = []
    if factor_layers:
        sample = next(iter(problem.chunks()))[0][:1]
        layers = factorable_linear_layers(problem, theta, sample)
    factored_names = {name for layer in layers for name in (layer.weight_name, layer.bias_name) if name}
    columns = _columns_except(problem, factored_names)
    gram = torch.zeros(size, size, dtype=problem.dtype, device=problem.device)
    with torch.no_grad():
        if columns is None or columns.numel() > 0:
            _add_jacobian_gram(gram, problem, theta, columns, max_jacobian_entries)
        if layers:
            factors = linear_factors(problem, theta, layers, _STORED_PANEL_SAMPLES)
            outputs = problem.num_outputs
            step = max(1, _FACTOR_BLOCK_ROWS // outputs) * outputs
            row_slices = [slice(r, min(r + step, size)) for r in range(0, size, step)]
            _add_symmetric(
                gram,
                (
                    (rows_a, rows_b, _sum_blocks(factors, rows_a, rows_b, outputs))
                    for index, rows_a in enumerate(row_slices)
                    for rows_b in row_slices[index:]
                ),
            )
    return gram


def _columns_except(problem: Problem, names: set[str]) -> Tensor | None:
    """Indices of theta outside the named parameters; None when no parameter is excluded."""
    if not names:
        return None
    pieces, start = [], 0
    for name, shape in zip(problem.param_names, problem.param_shapes, strict=True):
        count = math.prod(shape)
        if name not in names:
            pieces.append(torch.arange(start, start + count, device=problem.device))
        start += count
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long, device=problem.device)


def _add_jacobian_gram(
    gram: Tensor, problem: Problem, theta: Tensor, columns: Tensor | None, max_jacobian_entries: int
) -> None:
    """Add J J^T for the columns of J (all when None) to ``gram``, from per-sample Jacobians.

    When that J fits ``max_jacobian_entries`` it is computed once and sliced; otherwise each
    panel is recomputed on every pass over the data, so memory holds two panels and K.
    """
    size = gram.shape[0]
    width = problem.num_params if columns is None else columns.numel()
    panels: Callable[[int], Iterator[tuple[slice, Tensor]]]
    if size * width <= max_jacobian_entries:
        stored = [
            block for _, block in jacobian_panels(problem, theta, _STORED_PANEL_SAMPLES, columns=columns)
        ]
        jacobian = torch.cat(stored)
        step = _STORED_PANEL_SAMPLES * problem.num_outputs
        row_slices = [slice(r, min(r + step, size)) for r in range(0, size, step)]

        def panels(first_row: int) -> Iterator[tuple[slice, Tensor]]:
            return ((rows, jacobian[rows]) for rows in row_slices if rows.start >= first_row)
    else:
        # Two panels (J_a and J_b) are alive at once.
        samples_per_panel = max(1, max_jacobian_entries // (2 * problem.num_outputs * width))

        def panels(first_row: int) -> Iterator[tuple[slice, Tensor]]:
            return jacobian_panels(problem, theta, samples_per_panel, first_row, columns)

    _add_symmetric(
        gram,
        (
            (rows_a, rows_b, block_a @ block_b.T)
            for rows_a, block_a in panels(0)
            for rows_b, block_b in itertools.chain([(rows_a, block_a)], panels(rows_a.stop))
        ),
    )


def _sum_blocks(factors: list[LinearFactors], rows_a: slice, rows_b: slice, outputs: int) -> Tensor:
    total = factors[0].block(rows_a, rows_b, outputs)
    for factor in factors[1:]:
        total += factor.block(rows_a, rows_b, outputs)
    return total


def _add_symmetric(gram: Tensor, products: Iterator[tuple[slice, slice, Tensor]]) -> None:
    """Add each block K[rows_a, rows_b] (rows_b at or after rows_a) and its mirror to ``gram``.

    Each off-diagonal product is written to both triangles as it is made, and a diagonal block's
    upper triangle is mirrored, so K is exactly symmetric and exists once; only a block is extra.
    """
    for rows_a, rows_b, product in products:
        if rows_a == rows_b:
            gram[rows_a, rows_a] += torch.triu(product) + torch.triu(product, diagonal=1).T
        else:
            gram[rows_a, rows_b] += product
            gram[rows_b, rows_a] += product.T


def block_congruence(vectors: Tensor, blocks: Tensor) -> Tensor:
    """sum_i V_i^T B_i V_i for V (nC x r) split into n row blocks V_i (C x r) and B (n, C, C).

    This is V^T bdiag(B) V without forming the block-diagonal matrix: O(nC r^2) flops.
    """
    n, outputs, _ = blocks.shape
    rows = vectors.reshape(n, outputs, -1)
    return vectors.T @ torch.bmm(blocks, rows).reshape(n * outputs, -1)


@dataclass(frozen=True)
class GramSpectrum:
    """K = V diag(w) V^T restricted to range(K): the eigenpairs with w above the rank tolerance.

    ``values`` (r,) ascending and ``vectors`` (nC, r) are float64; ``gram`` is K in float64.
    ``source_dtype``: the dtype K was computed in (the problem's), which bounds its accuracy.
    """

    gram: Tensor
    values: Tensor
    vectors: Tensor
    num_samples: int
    num_outputs: int
    source_dtype: torch.dtype = torch.float64

    @property
    def rank(self) -> int:
        return self.values.numel()


def gram_spectrum(gram: Tensor, num_outputs: int, rtol: float | None = None) -> GramSpectrum:
    """Eigendecompose K in float64 and keep range(K): eigenvalues above ``rtol * ||K||_F``.

    K's entries carry rounding errors E of order eps |K_ij| (plus the summation error of J J^T),
    and by Weyl's inequality they move each eigenvalue by at most ||E||_2 <= ||E||_F ~ eps ||K||_F;
    eigenvalues below that are indistinguishable from the null space. ``rtol`` defaults to
    sqrt(nC) * eps(K.dtype), a margin for the summation error. Measured on a float32 K of an MNIST
    MLP (nC = 1000, p = 100k) against float64: eigenvalue errors up to 2.5e-9 lambda_max; this
    cutoff (4.5e-6 lambda_max there) kept 844 directions, each eigenvalue within 3e-4 of its
    float64 value, where the textbook rank tolerance nC * eps * lambda_max kept only 412 of the
    1000 genuine ones.

    On the CPU only the kept eigenpairs are computed (LAPACK's MRRR, ``syevr``, on the eigenvalues
    above the cutoff): K of a network is often of low numerical rank (an MNIST MLP at nC = 8192:
    r = 1263), and the full ``eigh`` spends most of its time on eigenvectors that are then
    dropped. Measured with one thread on a 2048 x 2048 K of rank 122 kept: 1.09 s against 2.45 s,
    eigenvalues equal to 1e-15 lambda_max. A K computed in float32 is eigendecomposed in float32
    and refined in float64 (``_refined_float32_eigenpairs``): on the MNIST MLP's K at nC = 8192
    (rank 1263, 2 idle threads) 35.8 s in benchmarks/stability.py, where the float64 ``syevr``
    took 58.9 s. (torch's float32 ``eigh``, MKL, all eigenvectors, then the same refinement: 54.3 s.)
    """
    size = gram.shape[0]
    if rtol is None:
        rtol = math.sqrt(size) * torch.finfo(gram.dtype).eps
    gram64 = gram.to(torch.float64)
    frobenius = torch.linalg.matrix_norm(gram64).item()
    cutoff = rtol * frobenius
    if gram64.device.type == "cpu" and cutoff > 0:
        refined = (
            _refined_float32_eigenpairs(gram, gram64, cutoff, frobenius)
            if gram.dtype == torch.float32
            else None
        )
        values, vectors = refined if refined is not None else _kept_eigenpairs(gram64, cutoff)
    else:
        all_values, all_vectors = torch.linalg.eigh(gram64)
        keep = all_values > cutoff
        values, vectors = all_values[keep], all_vectors[:, keep]
    if values.numel() == 0:
        raise DataError("K = J J^T is zero at these parameters: the model's outputs do not depend on theta")
    return GramSpectrum(gram64, values, vectors, size // num_outputs, num_outputs, gram.dtype)


def _kept_eigenpairs(gram: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """The eigenpairs above ``cutoff`` of a symmetric CPU matrix, in its dtype (LAPACK ``syevr``)."""
    values, vectors = scipy.linalg.eigh(
        gram.numpy(), subset_by_value=(cutoff, math.inf), driver="evr", check_finite=False
    )
    return torch.from_numpy(values), torch.from_numpy(vectors)


def _refined_float32_eigenpairs(
    gram32: Tensor, gram64: Tensor, cutoff: float, frobenius: float
) -> tuple[Tensor, Tensor] | None:
    """The float64 eigenpairs of K above ``cutoff`` from a float32 eigendecomposition, or None.

    ``frobenius`` is ||K||_F, which the cutoff was computed from.

    The float32 ``syevr`` is backward stable: its eigenvectors span range(K) up to angles of
    about eps_32 ||K|| / w on each eigenvalue w. One step of subspace iteration in float64
    (V <- orth(K V)) shrinks each vector's null-space part by the ratio of the null space's
    eigenvalues (rounding noise) to w, and a Rayleigh-Ritz step on that span (Parlett, The
    Symmetric Eigenvalue Problem, SIAM 1998, ch. 11, 14) makes the pairs orthonormal and optimal
    in it to float64 precision; the refinement costs two nC x nC x r products and a QR. Each
    pair's residual ||K v - w v|| is then a certificate: w is within it of an eigenvalue of K
    (Parlett ch. 4). If any kept residual exceeds the cutoff (the rounding level below which
    range(K) is not resolved anyway), None asks for the float64 decomposition instead.

    The float32 solve keeps eigenvalues down to 10 eps_32 ||K||_F (at most half the cutoff) below
    the cutoff, so that one whose float32 value fell just under it is not lost; the refined values
    decide which are kept. On the MNIST K at nC = 8192 that keeps all 1263 of the float64 solve
    (without the margin: 1261, and mu_min moved by 4.6e-4 relative); half the cutoff as the margin
    cost 14 s more. Measured on a float32 K of rank 30 (nC = 120): projector onto the range within
    2e-9 and eigenvalues within 1e-15 lambda_max of the float64 decomposition's (the float32 solve
    alone: 7e-5 and 3e-11). At nearly full rank the refinement's r x r eigenproblem and QR cost
    about what the float32 solve saved (MNIST MLP, nC = 8190, r = 6746: about 290 CPU s of each,
    on a loaded machine).
    """
    # A float32 eigenvalue is off by a few eps_32 ||K||_2: with this margin below the cutoff every
    # eigenvalue the float64 solve would keep is in the span, and the refined values decide.
    margin = min(cutoff / 2, _FLOAT32_EIGENVALUE_ERRORS * torch.finfo(torch.float32).eps * frobenius)
    _, single_vectors = _kept_eigenpairs(gram32, cutoff - margin)
    if single_vectors.shape[1] == 0:
        return None
    basis = torch.linalg.qr(gram64 @ single_vectors.to(torch.float64)).Q
    image = gram64 @ basis
    projected = basis.T @ image
    values, rotation = torch.linalg.eigh((projected + projected.T) / 2)
    vectors = basis @ rotation
    keep = values > cutoff
    residuals = (image @ rotation[:, keep] - vectors[:, keep] * values[keep]).norm(dim=0)
    if bool((residuals > cutoff).any()):
        return None
    return values[keep], vectors[:, keep]


def build_gram_spectrum(
    problem: Problem,
    theta: Tensor | None = None,
    rank_rtol: float | None = None,
    max_jacobian_entries: int = DEFAULT_MAX_JACOBIAN_ENTRIES,
    max_gram_entries: int = DEFAULT_MAX_GRAM_ENTRIES,
    hint: str = "raise max_gram_entries or use fewer samples",
) -> GramSpectrum:
    """K at ``theta`` and its spectrum on range(K): ``gram_matrix`` then ``gram_spectrum``, once.

    Pass the result as ``spectrum=`` to ``alignment(method="exact")``, ``stability`` and
    ``simulate_linearized_sgd`` at the same point and they skip building K and its (nC)^3
    eigendecomposition. Only the float64 K is kept (the problem-dtype K is freed).
    """
    gram = gram_matrix(problem, theta, max_jacobian_entries, max_gram_entries, hint)
    return gram_spectrum(gram, problem.num_outputs, rank_rtol)


def check_spectrum_matches(spectrum: GramSpectrum, problem: Problem) -> None:
    """Refuse a precomputed spectrum whose shape says it belongs to another problem.

    Only the shape can be checked; that it was computed at the same parameters is the caller's word.
    """
    if (spectrum.num_samples, spectrum.num_outputs) != (problem.num_samples, problem.num_outputs):
        raise InputError(
            f"the given spectrum is of a K for n={spectrum.num_samples} samples x C={spectrum.num_outputs} "
            f"outputs, but the problem has n={problem.num_samples} x C={problem.num_outputs}; build it "
            "with sample_space.build_gram_spectrum(problem, theta) for this problem and point"
        )


def worst_case_alignment(spectrum: GramSpectrum) -> float:
    """mu_min = lambda_min(n bdiag_i (K^2)_ii - K^2 on range(K)) / ||K||_F^2 (SPEC.md section 2).

    In K's eigenbasis V (range only), V^T K^2 V = diag(w^2), so the restricted matrix is
    n V^T bdiag((K^2)_ii) V - diag(w^2), an r x r eigenproblem. It is PSD by Cauchy-Schwarz
    (||sum_i K_{:,i} u_i||^2 <= n sum_i ||K_{:,i} u_i||^2), so mu_min >= 0.
    """
    gram, values, vectors = spectrum.gram, spectrum.values, spectrum.vectors
    n, outputs = spectrum.num_samples, spectrum.num_outputs
    rows = gram.reshape(n, outputs, -1)
    square_blocks = torch.bmm(rows, rows.transpose(1, 2))  # (K^2)_ii = K[i, :] K[:, i]
    restricted = n * block_congruence(vectors, square_blocks) - torch.diag(values**2)
    lowest = torch.linalg.eigvalsh((restricted + restricted.T) / 2)[0].item()
    return lowest / values.pow(2).sum().item()
