"""Data-parallel curvature (sgdstab.distributed) on 2 gloo ranks on CPU, float64, loopback only.

One spawned group per module: each rank runs every check of ``_rank_checks`` on its shard and
saves what it got; the tests compare the ranks with each other (bitwise) and with one process
holding the union of the shards (to 1e-12 relative), with n = 37 split 19 + 18.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from distributed_problems import CHUNK_SIZE, model_and_data, whole_problem
from sgdstab.alignment import alignment
from sgdstab.distributed import ShardedProblem, broadcast_from_main, shard_bounds
from sgdstab.errors import InputError
from sgdstab.estimators import (
    frobenius_norm,
    hutchpp_trace,
    power_iteration,
    spectral_density,
    top_eigenvalues,
    trace,
)
from sgdstab.io import dumps
from sgdstab.operators import gauss_newton, hessian, noise_covariance, ntk
from sgdstab.problem import Problem
from sgdstab.stability import stability
from sgdstab.summary import curvature_summary

WORLD_SIZE = 2
RELATIVE_TOLERANCE = 1e-12
LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _measurements(problem: Problem) -> dict[str, torch.Tensor]:
    """Every operator product and estimator, as float64 tensors keyed by name."""
    generator = torch.Generator().manual_seed(2)
    columns = torch.randn(problem.num_params, 3, generator=generator, dtype=torch.float64)
    sample_columns = torch.randn(
        problem.num_samples * problem.num_outputs, 2, generator=generator, dtype=torch.float64
    )
    curvature = hessian(problem)
    top = top_eigenvalues(curvature, k=2, tol=1e-6, seed=0)
    power = power_iteration(curvature, tol=1e-4, seed=0)
    hutchinson = trace(curvature, num_probes=12, seed=0)
    hutchpp = hutchpp_trace(curvature, num_matvecs=15, seed=0)
    frobenius = frobenius_norm(gauss_newton(problem), num_probes=12, seed=1)
    density = spectral_density(curvature, num_probes=2, num_steps=12, seed=0, num_grid=50)
    aligned = alignment(problem, method="stochastic", num_probes=8, sketch_size=3, seed=0, hessian=True)
    scalars = {
        "loss": problem.loss(),
        "hutchinson trace": hutchinson.value,
        "hutchinson stderr": hutchinson.stderr,
        "hutch++ trace": hutchpp.value,
        "frobenius": frobenius.value,
        "frobenius stderr": frobenius.stderr,
        "stochastic mu": aligned.mu,
        "stochastic mu stderr": aligned.stderr,
        "stochastic mu hessian": aligned.mu_hessian,
        "stochastic tr(Sigma G)": aligned.trace_sigma_g,
    }
    tensors = {
        "gradient": problem.gradient(),
        "residuals": problem.residuals(),
        "H v (double backward)": curvature @ columns,
        "H v (forward over reverse)": hessian(problem, backend="forward_over_reverse") @ columns,
        "G v": gauss_newton(problem) @ columns,
        "Sigma v": noise_covariance(problem) @ columns,
        "K u": ntk(problem) @ sample_columns,
        "lanczos top 2": top.values,
        "lanczos vectors": top.vectors,
        "power iteration": power.values,
        "slq density": density.density,
        "slq nodes": density.nodes,
    }
    return {**{k: torch.tensor(v, dtype=torch.float64) for k, v in scalars.items()}, **tensors}


def _refusals(problem: Problem) -> dict[str, str]:
    """The messages of the calls a shard must refuse."""
    messages = {}
    for name, call in {
        "alignment exact": lambda: alignment(problem, method="exact"),
        "stability": lambda: stability(problem, lr=0.1, batch_size=4),
    }.items():
        try:
            call()
            messages[name] = "not refused"
        except InputError as err:
            messages[name] = str(err)
    return messages


def _rank_checks(rank: int, port: int, folder: str) -> None:
    os.environ.update(LOOPBACK, MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        model, inputs, targets = model_and_data()
        problem = ShardedProblem.from_global(model, inputs, targets, chunk_size=CHUNK_SIZE)
        results = {
            "measurements": _measurements(problem),
            "refusals": _refusals(problem),
            "shard sizes": problem.shard_sizes,
            "num samples": problem.num_samples,
            "broadcast": broadcast_from_main({"rank": rank}),
        }
        try:  # rank 1 brings no sample
            ShardedProblem(model, inputs if rank == 0 else inputs[:0], targets if rank == 0 else targets[:0])
            results["empty shard"] = "not refused"
        except InputError as err:
            results["empty shard"] = str(err)
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks measured on its shard."""
    folder = tmp_path_factory.mktemp("distributed")
    torch.multiprocessing.spawn(_rank_checks, args=(_free_port(), str(folder)), nprocs=WORLD_SIZE)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process() -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measurements(whole_problem())
    finally:
        torch.set_num_threads(threads)


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    return (
        (value - reference).abs().max().item() / scale
        if scale > 0
        else (value - reference).abs().max().item()
    )


def test_shard_bounds_cover_the_data_once_with_unequal_sizes():
    bounds = [shard_bounds(37, rank, 3) for rank in range(3)]
    assert bounds == [(0, 13), (13, 25), (25, 37)]


def test_shards_are_contiguous_and_unequal(ranks):
    assert ranks[0]["shard sizes"] == ranks[1]["shard sizes"] == [19, 18]
    assert ranks[0]["num samples"] == ranks[1]["num samples"] == 37


def test_every_product_and_estimator_equals_the_single_process_result(ranks, single_process):
    measured = ranks[0]["measurements"]
    assert measured.keys() == single_process.keys()
    errors = {name: _relative_error(measured[name], single_process[name]) for name in single_process}
    assert max(errors.values()) <= RELATIVE_TOLERANCE, errors


def test_ranks_return_bitwise_identical_results(ranks):
    first, second = ranks[0]["measurements"], ranks[1]["measurements"]
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different


def test_broadcast_from_main_gives_rank_0s_value_everywhere(ranks):
    assert [rank["broadcast"] for rank in ranks] == [{"rank": 0}, {"rank": 0}]


def test_a_rank_without_samples_is_named_on_every_rank(ranks):
    for rank in ranks:
        assert "rank 1 of 2 has no sample" in rank["empty shard"]


def test_exact_sample_space_paths_refuse_a_shard(ranks):
    for rank in ranks:
        for message in rank["refusals"].values():
            assert "needs every sample in one process" in message
            assert "method='stochastic'" in message


#: ``sgdstab measure`` options and the ``curvature_summary`` arguments they stand for.
MEASURE_OPTIONS = ["--top-k", "2", "--num-probes", "6", "--no-density", "--alignment", "stochastic"]
SUMMARY_ARGUMENTS = {"top_k": 2, "num_probes": 6, "density": False, "alignment": "stochastic"}


def test_cli_under_torchrun_gives_the_single_process_numbers_and_prints_once():
    env = {**os.environ, **LOOPBACK}
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(WORLD_SIZE),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "--local-addr",
        "127.0.0.1",
        "-m",
        "sgdstab",
        "measure",
        "--problem",
        "distributed_problems:whole_problem",
        *MEASURE_OPTIONS,
        "--json",
    ]
    sharded = subprocess.run(
        launcher, cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert sharded.returncode == 0, sharded.stderr
    printed = json.loads(sharded.stdout)  # fails unless rank 0 alone printed its one document
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = json.loads(dumps(curvature_summary(whole_problem(), **SUMMARY_ARGUMENTS).to_dict()))
    finally:
        torch.set_num_threads(threads)
    assert printed.keys() == reference.keys()
    assert printed["num_samples"] == reference["num_samples"] == 37
    for key, value in reference.items():
        if isinstance(value, float):
            assert printed[key] == pytest.approx(value, rel=RELATIVE_TOLERANCE, abs=0), key
        elif isinstance(value, list):
            assert printed[key] == pytest.approx(value, rel=RELATIVE_TOLERANCE, abs=0), key
        else:
            assert printed[key] == value, key
