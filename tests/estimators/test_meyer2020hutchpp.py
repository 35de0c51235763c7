import pytest
import torch
from known_spectra import with_spectrum

from sgdstab.estimators import hutchpp_trace, trace

# Power-law decay, where Hutch++ is meant to beat Hutchinson (Meyer et al. 2021, sec. 1).
DECAYING = torch.tensor([10.0 / (i + 1) ** 1.5 for i in range(300)], dtype=torch.float64)
OP = with_spectrum(DECAYING, seed=0)
TRACE = float(DECAYING.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_within_four_standard_errors_and_spends_the_budget(seed):
    result = hutchpp_trace(OP, num_matvecs=99, seed=seed)
    assert abs(result.value - TRACE) <= 4 * result.stderr
    assert result.num_matvecs == 99


def test_more_accurate_than_hutchinson_at_equal_cost():
    errors = [abs(hutchpp_trace(OP, num_matvecs=90, seed=s).value - TRACE) for s in range(5)]
    hutchinson_stderr = trace(OP, num_probes=90, seed=0).stderr
    assert max(errors) < hutchinson_stderr / 3


def test_z_scores_are_not_all_tiny():
    results = [hutchpp_trace(OP, num_matvecs=60, seed=s) for s in range(20)]
    mean_abs = sum(abs(r.value - TRACE) / r.stderr for r in results) / len(results)
    assert 0.4 < mean_abs < 1.5


def test_exact_on_low_rank_matrix_once_sketch_covers_its_range():
    spectrum = torch.zeros(200, dtype=torch.float64)
    spectrum[:5] = torch.tensor([4.0, -3.0, 2.0, 1.0, 0.5])
    result = hutchpp_trace(with_spectrum(spectrum, seed=1), num_matvecs=30)
    assert result.value == pytest.approx(4.5, abs=1e-10)
    assert result.stderr < 1e-10


def test_sketch_spanning_the_space_is_exact_and_stops_early():
    spectrum = torch.linspace(-1, 3, 20, dtype=torch.float64)
    result = hutchpp_trace(with_spectrum(spectrum, seed=2), num_matvecs=75)
    assert result.value == pytest.approx(float(spectrum.sum()), abs=1e-10)
    assert result.stderr == 0.0
    assert result.num_matvecs == 40


def test_same_seed_same_estimate():
    assert hutchpp_trace(OP, num_matvecs=30, seed=7) == hutchpp_trace(OP, num_matvecs=30, seed=7)


@pytest.mark.parametrize("num_matvecs, message", [(0, "positive integer"), (2, "num_matvecs >= 3")])
def test_bad_budget_raises_clear_value_error(num_matvecs, message):
    with pytest.raises(ValueError, match=message):
        hutchpp_trace(OP, num_matvecs=num_matvecs)
