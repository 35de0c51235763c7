import pytest
import torch
from known_spectra import hessian_like_spectrum, with_spectrum

from sgdstab.estimators import power_iteration, top_eigenvalues
from sgdstab.operators import DenseOperator

INDEFINITE = [9.0, 5.0, 4.99, 4.98, 2.0, 1.0, 0.5, -0.5, -3.0, -7.0] + [0.1 * i / 90 for i in range(90)]


def assert_eigenpairs(op, result):
    """Each returned pair satisfies A v = lambda v up to its reported residual bound."""
    actual = (op.matrix @ result.vectors - result.vectors * result.values).norm(dim=0)
    assert torch.all(actual <= result.residual_norms * (1 + 1e-6) + 1e-10)
    gram = result.vectors.T @ result.vectors
    assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=1e-8)


def test_largest_matches_known_spectrum_within_tol():
    spectrum = hessian_like_spectrum(500)
    op = with_spectrum(spectrum)
    result = top_eigenvalues(op, k=1, tol=1e-3)
    assert result.converged
    assert abs(result.values[0] - 40.0) <= 1e-3 * 40.0
    assert result.residual_norms[0] <= 1e-3 * result.values[0]
    assert result.num_matvecs == op.num_matvecs
    assert result.vectors.shape == (500, 1)
    assert_eigenpairs(op, result)


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-7])
def test_tolerance_is_respected(tol):
    op = with_spectrum(INDEFINITE, seed=1)
    result = top_eigenvalues(op, k=3, tol=tol)
    truth = torch.tensor([9.0, 5.0, 4.99], dtype=torch.float64)
    assert result.converged
    assert torch.all((result.values - truth).abs() <= tol * truth)
    assert torch.all(result.residual_norms <= tol * result.values.abs())


def test_clustered_top_three_values_and_vectors():
    op = with_spectrum([5.0, 4.99, 4.98] + [1.0 - i / 97 for i in range(97)], seed=2)
    result = top_eigenvalues(op, k=3, tol=1e-8)
    assert result.converged
    assert torch.allclose(result.values, torch.tensor([5.0, 4.99, 4.98], dtype=torch.float64), rtol=1e-7)
    assert_eigenpairs(op, result)


def test_smallest_on_indefinite_matrix_is_most_negative_first():
    op = with_spectrum(INDEFINITE, seed=3)
    result = top_eigenvalues(op, k=2, which="smallest", tol=1e-6)
    assert torch.allclose(result.values, torch.tensor([-7.0, -3.0], dtype=torch.float64), rtol=1e-6)
    assert_eigenpairs(op, result)


def test_both_ends_in_descending_order():
    op = with_spectrum(INDEFINITE, seed=4)
    result = top_eigenvalues(op, k=2, which="both", tol=1e-6)
    expected = torch.tensor([9.0, 5.0, -3.0, -7.0], dtype=torch.float64)
    assert torch.allclose(result.values, expected, rtol=1e-6)
    assert_eigenpairs(op, result)


def test_needs_far_fewer_matvecs_than_power_iteration():
    """With top eigenvalues 40, 39, 38 (close, as in trained networks), power iteration given 3x
    Lanczos's budget is still less accurate than Lanczos stopped at tol=1e-3."""
    outliers = (40.0, 39.0, 38.0, 30.0, 20.0, 12.0, 8.0, 6.0, 4.0, 3.0)
    op = with_spectrum(hessian_like_spectrum(1000, outliers), seed=5)
    lanczos = top_eigenvalues(op, tol=1e-3)
    power = power_iteration(op, tol=1e-12, max_iter=3 * lanczos.num_matvecs)
    assert abs(lanczos.values[0] - 40.0) / 40.0 <= 1e-3
    assert abs(power.values[0] - 40.0) / 40.0 > 1e-3
    assert power.num_matvecs == 3 * lanczos.num_matvecs


def test_krylov_exhaustion_on_small_matrix_gives_whole_spectrum():
    spectrum = torch.tensor([3.0, -1.0, 2.0, 0.0, 5.0], dtype=torch.float64)
    op = with_spectrum(spectrum, seed=6)
    result = top_eigenvalues(op, k=5, tol=1e-12)
    assert result.converged
    assert result.num_matvecs == 5
    assert torch.allclose(result.values, spectrum.sort(descending=True).values, atol=1e-12)
    assert_eigenpairs(op, result)


@pytest.mark.parametrize("matrix, value", [(torch.eye(6), 1.0), (torch.zeros(6, 6), 0.0)])
def test_invariant_subspaces_restart(matrix, value):
    op = DenseOperator(matrix.double())
    result = top_eigenvalues(op, k=3)
    assert result.converged
    assert torch.all(result.values == value)
    assert result.num_matvecs == 3
    assert_eigenpairs(op, result)


def test_max_iter_caps_cost_and_reports_non_convergence():
    op = with_spectrum(hessian_like_spectrum(300), seed=7)
    result = top_eigenvalues(op, k=1, tol=1e-14, max_iter=5)
    assert not result.converged
    assert result.num_matvecs == 5


def test_same_seed_same_result_and_generator_accepted():
    op = with_spectrum(hessian_like_spectrum(200), seed=8)
    first, second = top_eigenvalues(op, seed=3), top_eigenvalues(op, seed=3)
    assert torch.equal(first.values, second.values) and torch.equal(first.vectors, second.vectors)
    from_generator = top_eigenvalues(op, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first.values, from_generator.values)


def test_float32_operator_keeps_its_dtype():
    op = DenseOperator(with_spectrum(hessian_like_spectrum(200), seed=9).matrix.float())
    result = top_eigenvalues(op, k=2, tol=1e-3)
    assert result.values.dtype == result.vectors.dtype == result.residual_norms.dtype == torch.float32
    assert torch.allclose(result.values, torch.tensor([40.0, 36.0]), rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k must be a positive integer"),
        ({"k": 11}, "size 10"),
        ({"k": 6, "which": "both"}, "size 10"),
        ({"which": "middle"}, "which must be one of"),
        ({"tol": 0.0}, "tol must be"),
        ({"k": 3, "max_iter": 2}, "max_iter=2"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        top_eigenvalues(with_spectrum(range(10)), **kwargs)


class _WithPreferredDirection(DenseOperator):
    """A known spectrum whose preferred direction is given (a stand-in for a Hessian's gradient)."""

    def __init__(self, matrix, direction):
        super().__init__(matrix)
        self.direction = direction

    def preferred_direction(self):
        return self.direction


def test_a_preferred_direction_near_the_top_eigenvector_saves_products():
    op = with_spectrum(hessian_like_spectrum(500), seed=3)
    top_vector = torch.linalg.eigh(op.matrix).eigenvectors[:, -1]
    noise = torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    informed = _WithPreferredDirection(op.matrix, top_vector + 0.1 * noise / noise.norm())
    plain, helped = top_eigenvalues(op, k=1, tol=1e-6), top_eigenvalues(informed, k=1, tol=1e-6)
    for result in (plain, helped):
        assert abs(float(result.values[0]) - 40.0) <= 1e-6 * 40.0
    assert helped.num_matvecs < plain.num_matvecs


@pytest.mark.parametrize("direction", ["orthogonal to the top", "zero", "nan"])
def test_a_useless_preferred_direction_still_finds_the_top(direction):
    spectrum = torch.tensor(INDEFINITE, dtype=torch.float64)
    op = with_spectrum(spectrum, seed=1)
    eigenvectors = torch.linalg.eigh(op.matrix).eigenvectors
    hint = {
        "orthogonal to the top": eigenvectors[:, -2],  # the eigenvector of 5.0, not of 9.0
        "zero": torch.zeros(100, dtype=torch.float64),
        "nan": torch.full((100,), float("nan"), dtype=torch.float64),
    }[direction]
    result = top_eigenvalues(_WithPreferredDirection(op.matrix, hint), k=2, tol=1e-8)
    assert torch.allclose(result.values, torch.tensor([9.0, 5.0], dtype=torch.float64), rtol=1e-8)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_preferred_direction_opposite_to_the_gaussian_does_not_cancel_it(sign):
    # d = 1: the Gaussian start is +-1, so adding a preferred direction of the other sign would
    # give a zero start without the sign alignment.
    result = top_eigenvalues(
        _WithPreferredDirection(
            torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([sign], dtype=torch.float64)
        )
    )
    assert result.values.item() == 2.0 and result.converged
