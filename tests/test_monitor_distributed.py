"""The Monitor under a process group: 2 gloo ranks on CPU, float64, loopback only.

Every rank trains the same model on the same global batches (as data-parallel SGD would) and
calls ``monitor.step`` at the same steps; the Monitor measures on its shard of the measurement
set (n = 37: 19 + 18 samples, chunks of 8). The rows must equal one process's Monitor on the
whole set to 1e-12 (relative), be identical on both ranks, and be written by rank 0 alone.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from distributed_problems import CHUNK_SIZE, model_and_data
from sgdstab.io import read_jsonl
from sgdstab.monitor import Monitor

WORLD_SIZE = 2
RELATIVE_TOLERANCE = 1e-12
LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
#: lambda_max and ||H||_F on different periods, so steps where one is due without the other occur.
SCHEDULE = {"lambda_max": 2, "frobenius": 3, "trace": 3, "mu": 4}
STEPS = 6
TIMING = ("monitor_time_s", "monitor_total_time_s")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _watched_run(folder: Path, schedule: dict[str, int], **options) -> tuple[list[dict], list[dict]]:
    """Train STEPS plain SGD steps with a Monitor; (its history, the rows its callback saw)."""
    model, inputs, targets = model_and_data()
    seen: list[dict] = []
    monitor = Monitor(
        model,
        (inputs, targets),
        every=schedule,
        lr=0.05,
        batch_size=4,
        out=folder,
        sinks=[seen.append],
        chunk_size=CHUNK_SIZE,
        num_probes=6,
        sketch_size=3,
        **options,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(3)
    monitor.step(0)
    for step in range(1, STEPS + 1):
        index = torch.randint(len(inputs), (4,), generator=generator)
        opt.zero_grad()
        (0.5 * (model(inputs[index]) - targets[index]).pow(2).sum() / 4).backward()
        opt.step()
        monitor.step(step)
    monitor.close()
    return monitor.history, seen


def _rank_run(rank: int, port: int, folder: str) -> None:
    os.environ.update(LOOPBACK, MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history, seen = _watched_run(Path(folder) / "run", {**SCHEDULE, "stability": 4})
        messages = [str(w.message) for w in caught if "stability" in str(w.message)]
        torch.save({"history": history, "seen": seen, "warnings": messages}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("monitor_distributed")
    torch.multiprocessing.spawn(_rank_run, args=(_free_port(), str(folder)), nprocs=WORLD_SIZE)
    return folder, [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def test_rows_equal_the_single_process_monitor(ranks, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, _ = _watched_run(tmp_path / "single", SCHEDULE)
    finally:
        torch.set_num_threads(threads)
    sharded = ranks[1][0]["history"]
    assert [row["step"] for row in sharded] == [0, 2, 3, 4, 6]
    assert len(sharded) == len(reference)
    for got, want in zip(sharded, reference, strict=True):
        assert got.keys() == want.keys()
        for name, value in want.items():
            if name not in TIMING:
                assert got[name] == pytest.approx(value, rel=RELATIVE_TOLERANCE, abs=0), (got["step"], name)
    # Step 3 has ||H||_F without lambda_max (deflated with the step-2 vector); step 4 the reverse.
    assert "lambda_max" not in sharded[2] and "hessian_frobenius" in sharded[2]
    assert "hessian_frobenius" not in sharded[3] and "mu" in sharded[3]


def test_ranks_agree_bitwise_and_only_rank_0_writes(ranks):
    folder, results = ranks
    strip = [[{k: v for k, v in row.items() if k not in TIMING} for row in r["history"]] for r in results]
    assert strip[0] == strip[1]
    assert results[0]["seen"] == results[0]["history"]
    assert results[1]["seen"] == []
    written = read_jsonl(folder / "run" / "metrics.jsonl")
    assert [row["step"] for row in written] == [0, 2, 3, 4, 6]
    assert written == results[0]["history"]


def test_stability_is_skipped_with_a_message_on_rank_0(ranks):
    _, results = ranks
    assert len(results[0]["warnings"]) == 1 and "skipped under torchrun" in results[0]["warnings"][0]
    assert results[1]["warnings"] == []
    assert all("eta_star" not in row for row in results[0]["history"])
