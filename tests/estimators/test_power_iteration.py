import pytest
import torch
from known_spectra import with_spectrum

from sgdstab.estimators import power_iteration
from sgdstab.operators import DenseOperator

SEPARATED = [10.0, 5.0, 3.0, -2.0] + [i / 100 for i in range(96)]


def test_dominant_eigenpair_of_separated_spectrum():
    op = with_spectrum(SEPARATED, seed=0)
    result = power_iteration(op, tol=1e-6)
    assert result.converged
    assert abs(result.values[0] - 10.0) <= 1e-5 * 10.0
    vector = result.vectors[:, 0]
    assert result.vectors.shape == (100, 1)
    assert torch.isclose(vector.norm(), torch.tensor(1.0, dtype=torch.float64))
    actual_residual = (op.matrix @ vector - result.values[0] * vector).norm()
    assert torch.isclose(result.residual_norms[0], actual_residual)
    assert result.num_matvecs == op.num_matvecs


def test_largest_magnitude_may_be_negative():
    op = with_spectrum([-30.0, 10.0, 5.0] + [0.0] * 47, seed=1)
    result = power_iteration(op, tol=1e-8)
    assert result.converged
    assert torch.isclose(result.values[0], torch.tensor(-30.0, dtype=torch.float64), rtol=1e-7)


def test_max_iter_caps_cost_and_reports_non_convergence():
    op = with_spectrum([10.0, 9.99] + [1.0] * 48, seed=2)
    result = power_iteration(op, tol=1e-12, max_iter=7)
    assert not result.converged
    assert result.num_matvecs == 7


def test_zero_operator_stops_at_first_product():
    result = power_iteration(DenseOperator(torch.zeros(5, 5, dtype=torch.float64)))
    assert result.converged and result.num_matvecs == 1 and result.values[0] == 0


def test_same_seed_same_result():
    op = with_spectrum(SEPARATED, seed=3)
    first, second = power_iteration(op, seed=4), power_iteration(op, seed=4)
    assert torch.equal(first.values, second.values) and torch.equal(first.vectors, second.vectors)


@pytest.mark.parametrize(
    "kwargs, message", [({"tol": -1.0}, "tol must be"), ({"max_iter": 0}, "max_iter must be")]
)
def test_bad_input_raises_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        power_iteration(with_spectrum(SEPARATED), **kwargs)
