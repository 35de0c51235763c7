import math

import numpy as np
import pytest
import torch
from known_spectra import hessian_like_spectrum, hutchinson_variance, with_spectrum

from sgdstab.estimators import frobenius_norm, trace
from sgdstab.operators import DenseOperator

SPECTRUM = hessian_like_spectrum(200)
OP = with_spectrum(SPECTRUM, seed=0)
TRACE = float(SPECTRUM.sum())
FROBENIUS_SQUARED = float(SPECTRUM.pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trace_within_four_standard_errors(seed):
    result = trace(OP, num_probes=100, seed=seed, block_size=16)
    assert abs(result.value - TRACE) <= 4 * result.stderr
    assert result.num_matvecs == 100


@pytest.mark.parametrize("seed", [0, 1])
def test_trace_stderr_matches_known_variance(seed):
    """Avron and Toledo: Var[z^T A z] = 2 (||A||_F^2 - sum_i a_ii^2) for Rademacher z."""
    num_probes = 400
    result = trace(OP, num_probes=num_probes, seed=seed)
    expected = math.sqrt(hutchinson_variance(OP.matrix) / num_probes)
    assert result.stderr == pytest.approx(expected, rel=0.25)


def test_trace_z_scores_are_standard_normal_sized():
    """An honest stderr gives z-scores of typical size ~0.8, neither all tiny nor large."""
    z_scores = [(r.value - TRACE) / r.stderr for r in (trace(OP, num_probes=30, seed=s) for s in range(20))]
    mean_abs = sum(abs(z) for z in z_scores) / len(z_scores)
    assert 0.4 < mean_abs < 1.5
    assert max(abs(z) for z in z_scores) < 4.5


def test_trace_is_exact_for_diagonal_matrix():
    diagonal = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    result = trace(DenseOperator(torch.diag(diagonal)), num_probes=5)
    assert result.value == pytest.approx(float(diagonal.sum()))
    assert result.stderr == 0.0


def test_target_relative_stderr_adds_batches_until_met():
    result = trace(OP, num_probes=8, block_size=8, target_rel_stderr=0.05)
    assert result.stderr <= 0.05 * abs(result.value)
    assert result.num_matvecs > 8 and result.num_matvecs % 8 == 0
    assert abs(result.value - TRACE) <= 4 * result.stderr


def test_target_relative_stderr_stops_at_max_probes():
    result = trace(OP, num_probes=4, block_size=4, target_rel_stderr=1e-6, max_probes=20)
    assert result.num_matvecs == 20
    assert result.stderr > 1e-6 * abs(result.value)


def test_single_probe_has_unknown_stderr():
    assert trace(OP, num_probes=1).stderr == math.inf


def test_same_seed_same_estimate():
    assert trace(OP, num_probes=10, seed=5) == trace(OP, num_probes=10, seed=5)
    assert trace(OP, num_probes=10, seed=5) == trace(
        OP, num_probes=10, generator=torch.Generator().manual_seed(5)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frobenius_within_four_standard_errors(seed):
    result = frobenius_norm(OP, num_probes=100, seed=seed)
    assert abs(result.squared - FROBENIUS_SQUARED) <= 4 * result.squared_stderr
    assert abs(result.value - math.sqrt(FROBENIUS_SQUARED)) <= 4 * result.stderr
    assert result.value == pytest.approx(math.sqrt(result.squared))
    assert result.stderr == pytest.approx(result.squared_stderr / (2 * result.value))
    assert result.num_matvecs == 100


def test_frobenius_stderr_matches_known_variance():
    """||A z||^2 = z^T A^2 z, so its variance is Avron and Toledo's formula applied to A^2."""
    num_probes = 400
    result = frobenius_norm(OP, num_probes=num_probes, seed=3)
    expected = math.sqrt(hutchinson_variance(OP.matrix @ OP.matrix) / num_probes)
    assert result.squared_stderr == pytest.approx(expected, rel=0.25)


def test_frobenius_of_zero_operator_is_exactly_zero():
    result = frobenius_norm(DenseOperator(torch.zeros(3, 3, dtype=torch.float64)), num_probes=4)
    assert (result.value, result.stderr, result.squared, result.squared_stderr) == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("estimator", [trace, frobenius_norm])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_probes": 0}, "num_probes must be a positive integer"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"target_rel_stderr": -0.1}, "target_rel_stderr must be"),
    ],
)
def test_bad_input_raises_clear_value_error(estimator, kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimator(OP, **kwargs)


def test_numpy_and_tensor_counts_give_the_same_estimate_and_the_old_keyword_is_gone():
    reference = trace(OP, num_probes=12, block_size=5, seed=3)
    for count, block in ((np.int64(12), np.int32(5)), (torch.tensor(12), torch.tensor(5))):
        result = trace(OP, num_probes=count, block_size=block, seed=3)
        assert (result.value, result.stderr, result.num_matvecs) == (
            reference.value,
            reference.stderr,
            reference.num_matvecs,
        )
    with pytest.raises(TypeError, match="batch_size"):
        trace(OP, num_probes=4, batch_size=4)  # renamed block_size: SGD's B is batch_size
    with pytest.raises(ValueError, match="block_size must be a positive integer, got True"):
        trace(OP, num_probes=4, block_size=True)
