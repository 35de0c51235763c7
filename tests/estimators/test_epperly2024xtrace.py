"""XTrace (Epperly, Tropp and Webber 2024) against known spectra, in float64."""

import math

import pytest
import torch
from known_spectra import hessian_like_spectrum, with_spectrum

from sgdstab.estimators import trace, xtrace, xtrace_to_error
from sgdstab.estimators.epperly2024xtrace import STOPPING_FACTOR, _hutchinson_result, _XTraceSketch

D = 300
DECAYING = torch.tensor([10.0 / (i + 1) ** 1.5 for i in range(D)], dtype=torch.float64)
FLAT = 1.0 + 0.3 * torch.rand(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
HESSIAN_LIKE = hessian_like_spectrum(D)
SPECTRA = {"decaying": DECAYING, "flat": FLAT, "hessian_like": HESSIAN_LIKE}

#: Flat and indefinite, as the benchmark MLP's Hessian: stable rank tr^2 / ||A||_F^2 about 800,
#: one Gaussian probe's relative standard deviation about 5%. Deflation cannot pay.
FLAT_INDEFINITE = 1.0 + 0.5 * torch.randn(
    1000, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
)
#: The same with one large negative eigenvalue: stable rank about 330, near the free stop's
#: threshold (400 at 5% and 8 tests), so runs end either way, and draws that miss the outlier
#: must not stop on a too-small error.
FLAT_WITH_NEGATIVE_OUTLIER = torch.cat([torch.tensor([-40.0], dtype=torch.float64), FLAT_INDEFINITE[1:]])
FREE_STOP_SPECTRA = {
    "flat_indefinite": FLAT_INDEFINITE,
    "flat_with_negative_outlier": FLAT_WITH_NEGATIVE_OUTLIER,
}

#: The advertised calibration (module docstring): |error| <= 3 x estimate in >= 90% of draws.
COVERAGE_FACTOR = 3.0
COVERAGE_RATE = 0.90
NUM_SEEDS = 200


def test_leave_one_out_formula_matches_explicit_bases():
    """Each t_i equals Hutch++ with Q_i = orth(Y without y_i) and probe w_i, formed explicitly."""
    op = with_spectrum(hessian_like_spectrum(60), seed=3)
    sketch = _XTraceSketch(op, torch.Generator().manual_seed(0), block_size=4)
    sketch.grow(5)
    sketch.grow(3)  # a second round: the extended basis must give the same estimates
    images = op.matrix @ sketch.tests
    expected = []
    for i in range(sketch.num_tests):
        basis, _ = torch.linalg.qr(torch.cat([images[:, :i], images[:, i + 1 :]], dim=1))
        probe = sketch.tests[:, i]
        rest = probe - basis @ (basis.T @ probe)
        expected.append(torch.trace(basis.T @ op.matrix @ basis) + rest @ op.matrix @ rest)
    assert torch.allclose(sketch.estimates(), torch.stack(expected), atol=1e-10, rtol=1e-10)


def test_exact_on_low_rank_matrix():
    spectrum = torch.zeros(200, dtype=torch.float64)
    spectrum[:5] = torch.tensor([4.0, -3.0, 2.0, 1.0, 0.5])
    result = xtrace(with_spectrum(spectrum, seed=1), num_matvecs=20)
    assert result.value == pytest.approx(4.5, abs=1e-10)
    assert result.stderr < 1e-10
    assert result.num_matvecs == 20


def test_test_vectors_spanning_the_space_give_the_exact_trace():
    spectrum = torch.linspace(-1, 3, 20, dtype=torch.float64)
    result = xtrace(with_spectrum(spectrum, seed=2), num_matvecs=100)
    assert result.value == pytest.approx(float(spectrum.sum()), abs=1e-10)
    assert result.stderr == 0.0
    assert result.num_matvecs == 40


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_error_estimate_is_calibrated(name):
    """Over 200 seeds the true error is within 3 x the estimate at least 90% of the time (with a
    three-binomial-standard-error tolerance), and the estimate is not vacuous: the error exceeds
    one estimate in a sizeable fraction of draws."""
    spectrum = SPECTRA[name]
    op = with_spectrum(spectrum, seed=0)
    exact = float(spectrum.sum())
    ratios = torch.tensor(
        [
            abs(r.value - exact) / r.stderr
            for r in (xtrace(op, num_matvecs=40, seed=s) for s in range(NUM_SEEDS))
        ]
    )
    binomial_se = math.sqrt(COVERAGE_RATE * (1 - COVERAGE_RATE) / NUM_SEEDS)
    assert float((ratios <= COVERAGE_FACTOR).double().mean()) >= COVERAGE_RATE - 3 * binomial_se
    # A normal error within one standard error 68% of the time; an inflated estimate would
    # cover nearly always.
    assert float((ratios <= 1).double().mean()) <= 0.9


def test_more_accurate_than_hutchinson_at_equal_cost_on_decaying_spectrum():
    op = with_spectrum(DECAYING, seed=0)
    exact = float(DECAYING.sum())
    errors = [abs(xtrace(op, num_matvecs=60, seed=s).value - exact) for s in range(10)]
    assert max(errors) < trace(op, num_probes=60, seed=0).stderr / 3


@pytest.mark.parametrize("name", ["decaying", "hessian_like"])
def test_stopping_rule_meets_target_with_far_fewer_products_than_hutchinson(name):
    spectrum = SPECTRA[name]
    op = with_spectrum(spectrum, seed=0)
    exact = float(spectrum.sum())
    target = 0.01
    results = [xtrace_to_error(op, target_rel_error=target, seed=s) for s in range(20)]
    hutchinson = trace(op, num_probes=8, block_size=8, target_rel_stderr=target, seed=0)
    for result in results:
        assert STOPPING_FACTOR * result.stderr <= target * abs(result.value)
    errors = torch.tensor([abs(r.value - exact) / exact for r in results])
    # Met in truth in most runs (about 90% measured over 100 seeds), never missed by 3x.
    assert float((errors <= target).double().mean()) >= 0.75
    assert float(errors.max()) <= 3 * target
    assert max(r.num_matvecs for r in results) * 10 < hutchinson.num_matvecs


def test_stopping_rule_stops_at_budget():
    op = with_spectrum(HESSIAN_LIKE, seed=0)
    result = xtrace_to_error(op, target_rel_error=1e-9, initial_tests=4, tests_per_round=4, max_matvecs=30)
    assert result.num_matvecs == 30  # the last round cut to 1 test vector to fit the budget
    assert result.stderr > 1e-9 * abs(result.value)


def test_trace_with_target_rel_error_uses_xtrace():
    op = with_spectrum(DECAYING, seed=0)
    assert trace(op, target_rel_error=0.02, seed=4) == xtrace_to_error(op, target_rel_error=0.02, seed=4)


def test_same_seed_same_estimate():
    op = with_spectrum(DECAYING, seed=0)
    assert xtrace(op, num_matvecs=30, seed=7) == xtrace(op, num_matvecs=30, seed=7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_matvecs": 3}, "num_matvecs >= 4"),
        ({"num_matvecs": 0}, "positive integer"),
    ],
)
def test_bad_budget_raises_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        xtrace(with_spectrum(DECAYING, seed=0), **kwargs)


def test_bad_stopping_arguments_raise_clear_value_errors():
    op = with_spectrum(DECAYING, seed=0)
    with pytest.raises(ValueError, match="target_rel_error"):
        xtrace_to_error(op, target_rel_error=0.0)
    with pytest.raises(ValueError, match="initial_tests must be >= 2"):
        xtrace_to_error(op, target_rel_error=0.1, initial_tests=1)
    with pytest.raises(ValueError, match="raise max_matvecs"):
        xtrace_to_error(op, target_rel_error=0.1, initial_tests=8, max_matvecs=10)
    with pytest.raises(ValueError, match="not both"):
        trace(op, target_rel_error=0.1, target_rel_stderr=0.1)


def test_free_hutchinson_variance_matches_monte_carlo():
    """Sphere test vectors: Var(w^T A w) = 2d/(d+2) (||A||_F^2 - tr(A)^2/d), and the plug-in
    stderr of ``_hutchinson_result`` estimates it, both against 20000 draws of a known spectrum."""
    spectrum = torch.linspace(-1.0, 3.0, 20, dtype=torch.float64)
    op = with_spectrum(spectrum, seed=4)
    d, draws = 20, 20_000
    tests, images = _XTraceSketch(op, torch.Generator().manual_seed(0), block_size=draws).draw(draws)
    quadratic_forms = (tests * images).sum(dim=0)
    exact = 2 * d / (d + 2) * (float(spectrum.pow(2).sum()) - float(spectrum.sum()) ** 2 / d)
    # The sample variance's standard error, from the sample fourth central moment.
    centred = quadratic_forms - quadratic_forms.mean()
    variance_se = math.sqrt(float((centred**4).mean() - centred.pow(2).mean() ** 2) / draws)
    assert abs(float(quadratic_forms.var()) - exact) <= 4 * variance_se
    plug_in = _hutchinson_result(tests, images, num_matvecs=draws).stderr ** 2 * draws
    assert abs(plug_in - exact) <= 4 * variance_se
    assert float(quadratic_forms.mean()) == pytest.approx(
        float(spectrum.sum()), abs=4 * math.sqrt(exact / draws)
    )


@pytest.mark.parametrize("name", sorted(FREE_STOP_SPECTRA))
def test_stop_on_free_hutchinson_samples_is_calibrated(name):
    """At a 5% target over 200 seeds: the target is met in truth in >= 90% of runs, the true
    error is within 3 reported standard errors in >= 90% and not always within one (three-
    binomial-standard-error tolerances), whichever exit a run took."""
    spectrum = FREE_STOP_SPECTRA[name]
    op = with_spectrum(spectrum, seed=0)
    exact = float(spectrum.sum())
    target = 0.05
    results = [xtrace_to_error(op, target_rel_error=target, seed=s) for s in range(NUM_SEEDS)]
    errors = torch.tensor([abs(r.value - exact) for r in results])
    ratios = errors / torch.tensor([r.stderr for r in results])
    binomial_se = math.sqrt(COVERAGE_RATE * (1 - COVERAGE_RATE) / NUM_SEEDS)
    assert float((errors <= target * abs(exact)).double().mean()) >= COVERAGE_RATE - 3 * binomial_se
    assert float((ratios <= COVERAGE_FACTOR).double().mean()) >= COVERAGE_RATE - 3 * binomial_se
    assert float((ratios <= 1).double().mean()) <= 0.9
    free_stops = sum(r.num_matvecs == 8 for r in results)
    if name == "flat_indefinite":
        assert free_stops == NUM_SEEDS  # 8 products where XTrace alone needs 16
    else:
        assert 0 < free_stops < NUM_SEEDS  # both exits taken


@pytest.mark.parametrize("name", ["decaying", "hessian_like"])
def test_no_free_stop_where_deflation_pays(name):
    """On decaying and Hessian-like spectra the free samples never meet the rule: the result is
    XTrace's from the same test vectors, as without the free look."""
    op = with_spectrum(SPECTRA[name], seed=0)
    for s in range(10):
        result = xtrace_to_error(op, target_rel_error=0.05, seed=s)
        assert result.num_matvecs >= 16
        if result.num_matvecs == 16:
            assert result == xtrace(op, num_matvecs=16, seed=s)
