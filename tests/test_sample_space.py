"""The sample-space NTK K = J J^T against a Jacobian built densely by torch.func.jacrev."""

import math
from types import SimpleNamespace

import pytest
import torch

from reference import assert_matches, dense_gram, mlp_problem
from sgdstab import InputError, Problem
from sgdstab.sample_space import (
    DEFAULT_MAX_GRAM_ENTRIES,
    block_congruence,
    build_gram_spectrum,
    check_gram_fits,
    check_spectrum_matches,
    gram_matrix,
    gram_spectrum,
)


def _mlp_problem(num_outputs: int, n: int = 9, chunk_size: int = 4, seed: int = 0) -> Problem:
    return mlp_problem(num_outputs, n, inputs_dim=3, hidden=4, seed=seed, chunk_size=chunk_size)


@pytest.mark.parametrize("num_outputs", [1, 3])
@pytest.mark.parametrize("max_jacobian_entries", [2**27, 126, 84, 1])
def test_gram_matrix_equals_dense_jacobian_product(num_outputs, max_jacobian_entries):
    # p = 16 + 5C. Stored J; then two panels of budget // (2 C p) samples recomputed per pass:
    # 3 samples for C=1 (panels straddle the chunks of 4), 2 samples, and the floor of one sample.
    # factor_layers=False: every column through per-sample Jacobians (tests/test_gram_factors.py
    # covers the per-layer factors this MLP would otherwise take).
    problem = _mlp_problem(num_outputs)
    gram = gram_matrix(problem, max_jacobian_entries=max_jacobian_entries, factor_layers=False)
    assert_matches(gram, dense_gram(problem), rtol=1e-12, atol=1e-12)


def test_gram_matrix_from_loader_matches_tensors():
    problem = _mlp_problem(2)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(problem.inputs, problem.targets), batch_size=4, shuffle=False
    )
    from_loader = Problem.from_loader(problem.model, loader)
    torch.testing.assert_close(gram_matrix(from_loader, max_jacobian_entries=50), gram_matrix(problem))
    torch.testing.assert_close(
        gram_matrix(from_loader, max_jacobian_entries=50, factor_layers=False), gram_matrix(problem)
    )


def test_gram_matrix_refuses_when_k_does_not_fit():
    problem = _mlp_problem(3)
    with pytest.raises(MemoryError, match=r"27 x 27.*max_gram_entries=100; try this"):
        gram_matrix(problem, max_gram_entries=100, hint="try this")


def test_spectrum_keeps_the_range_only():
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2, bias=False).double()  # p = 6 < nC = 20: rank 6
    inputs = torch.randn(10, 3, dtype=torch.float64)
    problem = Problem(model, inputs, torch.zeros(10, 2, dtype=torch.float64))
    gram = gram_matrix(problem)
    spectrum = gram_spectrum(gram, 2)
    assert spectrum.rank == 6
    reconstructed = spectrum.vectors @ torch.diag(spectrum.values) @ spectrum.vectors.T
    torch.testing.assert_close(reconstructed, gram, rtol=1e-10, atol=1e-10)


def test_block_congruence_equals_explicit_block_diagonal():
    torch.manual_seed(2)
    vectors = torch.randn(12, 5, dtype=torch.float64)
    blocks = torch.randn(4, 3, 3, dtype=torch.float64)
    explicit = vectors.T @ torch.block_diag(*blocks) @ vectors
    torch.testing.assert_close(block_congruence(vectors, blocks), explicit)


@pytest.mark.parametrize("max_jacobian_entries", [2**27, 84])
def test_gram_matrix_is_exactly_symmetric(max_jacobian_entries):
    # Both triangles come from one product per block (no symmetrising copy of K afterwards).
    gram = gram_matrix(_mlp_problem(3, n=11), max_jacobian_entries=max_jacobian_entries, factor_layers=False)
    assert torch.equal(gram, gram.T)


def test_built_spectrum_equals_gram_then_spectrum_and_refuses_another_problem():
    problem = _mlp_problem(2)
    built = build_gram_spectrum(problem, rank_rtol=1e-10)
    expected = gram_spectrum(gram_matrix(problem), 2, rtol=1e-10)
    for field in ("gram", "values", "vectors"):
        assert torch.equal(getattr(built, field), getattr(expected, field))
    assert (built.num_samples, built.num_outputs) == (9, 2)
    check_spectrum_matches(built, problem)
    with pytest.raises(InputError, match=r"n=9 samples x C=2 outputs.*n=9 x C=3"):
        check_spectrum_matches(built, _mlp_problem(3))


def test_the_default_budget_admits_nc_8192_and_names_the_argument_above():
    for n, outputs in ((8192, 1), (819, 10)):
        check_gram_fits(SimpleNamespace(num_samples=n, num_outputs=outputs), DEFAULT_MAX_GRAM_ENTRIES, "")
    with pytest.raises(MemoryError, match="8200 x 8200.*max_gram_entries="):
        check_gram_fits(SimpleNamespace(num_samples=820, num_outputs=10), DEFAULT_MAX_GRAM_ENTRIES, "")


def _float32_low_rank_gram(size: int = 120, rank: int = 30, num_outputs: int = 2) -> torch.Tensor:
    # Eigenvalues spread over four decades, all far above the float32 cutoff (~1e-5 ||K||_F).
    torch.manual_seed(3)
    factors = torch.randn(size, rank, dtype=torch.float64) * torch.logspace(0, -2, rank, dtype=torch.float64)
    return (factors @ factors.T).to(torch.float32)


def test_a_float32_k_is_eigendecomposed_in_float32_to_float64_accuracy():
    gram = _float32_low_rank_gram()
    fast = gram_spectrum(gram, 2)
    # Truth: the float64 decomposition of the same (float32-valued) matrix.
    truth = torch.linalg.eigh(gram.to(torch.float64))
    truth_values, truth_vectors = truth.eigenvalues[-30:], truth.eigenvectors[:, -30:]
    assert fast.rank == 30 and fast.source_dtype == torch.float32
    assert_matches(fast.values, truth_values, rtol=0, atol=1e-14 * float(truth_values[-1]))
    assert_matches(fast.vectors.T @ fast.vectors, torch.eye(30, dtype=torch.float64), rtol=0, atol=1e-13)
    assert_matches(fast.vectors @ fast.vectors.T, truth_vectors @ truth_vectors.T, rtol=0, atol=1e-8)


def test_the_float32_decomposition_falls_back_to_float64_when_its_residual_is_too_large(monkeypatch):
    import sgdstab.sample_space as sample_space

    gram = _float32_low_rank_gram()
    truth = torch.linalg.eigh(gram.to(torch.float64))
    truth_values, truth_vectors = truth.eigenvalues[-30:], truth.eigenvectors[:, -30:]
    solved = sample_space._kept_eigenpairs

    def perturbed(matrix, cutoff):
        values, vectors = solved(matrix, cutoff)
        if matrix.dtype == torch.float32:  # a solve gone wrong: 20 vectors spanning no invariant space
            vectors = torch.randn_like(vectors[:, :20])
        return values, vectors

    monkeypatch.setattr(sample_space, "_kept_eigenpairs", perturbed)
    fallback = gram_spectrum(gram, 2)
    assert fallback.rank == 30
    assert_matches(fallback.values, truth_values, rtol=0, atol=1e-12 * float(truth_values[-1]))
    assert_matches(fallback.vectors @ fallback.vectors.T, truth_vectors @ truth_vectors.T, rtol=0, atol=1e-8)


def test_the_float32_path_keeps_the_float64_rank_next_to_the_cutoff():
    # Eigenvalues from just above to just below the rank cutoff sqrt(nC) eps_32 ||K||_F: the
    # float32 solve misplaces each by about eps_32 ||K||, so it must not decide which are kept.
    torch.manual_seed(4)
    size = 120
    basis = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64)).Q
    values = torch.zeros(size, dtype=torch.float64)
    values[-20:] = torch.logspace(0, 2, 20, dtype=torch.float64)
    cutoff = math.sqrt(size) * torch.finfo(torch.float32).eps * values.norm().item()
    values[:12] = cutoff * torch.linspace(0.9, 1.1, 12, dtype=torch.float64)
    gram = ((basis * values) @ basis.T).to(torch.float32)
    fast = gram_spectrum(gram, 2)
    truth = torch.linalg.eigvalsh(gram.to(torch.float64))
    truth_cutoff = (
        math.sqrt(size)
        * torch.finfo(torch.float32).eps
        * float(torch.linalg.matrix_norm(gram.to(torch.float64)))
    )
    kept = truth[truth > truth_cutoff]
    assert fast.rank == kept.numel() > 20
    assert_matches(fast.values, kept, rtol=0, atol=1e-14 * float(kept[-1]))
