"""benchmarks/gpu.py at a tiny size on CPU, so the script a lent GPU runs cannot rot; and
benchmarks/curvature.py's spectrum diagnostic on a known spectrum, and its --quick smoke run
where the peers are installed (the benchmark virtualenv)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

GPU_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
CURVATURE_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "curvature.py"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_benchmark():
    return _load("gpu_benchmark", GPU_SCRIPT)


@pytest.fixture(scope="module")
def curvature_benchmark():
    return _load("curvature_benchmark", CURVATURE_SCRIPT)


def test_resnet18_has_the_compass_case_size(gpu_benchmark):
    assert sum(p.numel() for p in gpu_benchmark.resnet18().parameters()) == 11_173_962


def test_tiny_run_measures_every_row_and_writes_json(gpu_benchmark, tmp_path):
    output = tmp_path / "gpu.json"
    gpu_benchmark.main([str(output), "--tiny", "--eta-star"])
    results = json.loads(output.read_text())
    assert set(results["rows"]) == set(gpu_benchmark.ROWS)
    for name, row in results["rows"].items():
        ours = row[0]["sgdstab_xtrace" if name == "trace" else "sgdstab"]
        assert ours["time_s"] > 0
    lam = results["rows"]["lambda_max"][0]["sgdstab"]
    assert lam["rel_residual_bound"] <= gpu_benchmark.LAMBDA_TOL
    assert results["rows"]["trace"][0]["sgdstab_xtrace"]["num_matvecs"] <= 16
    # Peers absent from the test environment are skipped with a note, not a failure.
    assert len(results["notes"]) == 2 - len(results["peers"])


def test_unknown_row_is_refused(gpu_benchmark, tmp_path):
    with pytest.raises(SystemExit):
        gpu_benchmark.main([str(tmp_path / "x.json"), "--tiny", "--rows", "nonsense"])


def test_spectrum_shape_on_a_known_spectrum(curvature_benchmark):
    """Top-k share, stable rank and one probe's relative SD against their closed forms, with
    tolerances from the reported stderr of the Frobenius estimate (float64)."""
    with_spectrum = _load(
        "known_spectra", Path(__file__).parent / "estimators" / "known_spectra.py"
    ).with_spectrum
    spectrum = torch.cat(
        [
            torch.tensor([30.0, -20.0, 12.0, -8.0], dtype=torch.float64),
            0.5 + 0.2 * torch.randn(196, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        ]
    )
    trace_value = float(spectrum.sum())
    shape = curvature_benchmark.spectrum_shape(
        with_spectrum(spectrum, seed=1), trace_value, k=4, num_probes=64
    )
    frobenius = float(spectrum.pow(2).sum())
    assert shape["top_k_eigenvalues"] == pytest.approx([30.0, -20.0, 12.0, -8.0], rel=1e-2)
    assert abs(shape["frobenius_squared"] - frobenius) <= 4 * shape["frobenius_squared_stderr"]
    relative = 4 * shape["frobenius_squared_stderr"] / shape["frobenius_squared"] + 2e-2
    top_share = (30.0**2 + 20.0**2 + 12.0**2 + 8.0**2) / frobenius
    assert shape["top_k_share"] == pytest.approx(top_share, rel=relative)
    assert shape["stable_rank"] == pytest.approx(trace_value**2 / frobenius, rel=relative)
    assert shape["probe_rel_sd"] == pytest.approx((2 * frobenius) ** 0.5 / trace_value, rel=relative)
    # The top four carry most of ||A||_F^2 here: deflation pays.
    assert shape["deflation_gain"] > 1


def test_curvature_quick_run_reports_the_spectrum_shape(curvature_benchmark, tmp_path):
    if curvature_benchmark.PEERS_MISSING is not None:
        pytest.skip(f"peers not installed: {curvature_benchmark.PEERS_MISSING}")
    output = tmp_path / "curvature.json"
    curvature_benchmark.main(
        [
            "--quick",
            "--workloads",
            "mlp",
            "--rows",
            "trace,certified_trace",
            "--repeats",
            "2",
            "--output",
            str(output),
        ]
    )
    shape = json.loads(output.read_text())["workloads"]["mlp"]["certified_trace"]["spectrum"]
    assert 0 <= shape["top_k_share"] <= 1
    assert shape["stable_rank"] > 0 and shape["probe_rel_sd"] > 0
