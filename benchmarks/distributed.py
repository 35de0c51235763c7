"""Data-parallel curvature on 2 gloo ranks against one process, in one run, on one machine.

    python benchmarks/distributed.py [--n 8192] [--repeats 5] [--widths 256,128,128,10]

Two processes (one torch thread each) join a gloo group on 127.0.0.1. In every repeat, first rank
0 alone applies the whole-data ``hessian(Problem)`` (the baseline; rank 1 waits at a barrier),
then both ranks apply ``hessian(ShardedProblem)`` on their halves; the same for a Lanczos
lambda_max (``top_eigenvalues(k=1, tol=1e-3)``). Baseline and distributed runs alternate, so
the speed-up (median over repeats of baseline time / distributed time) is robust to a shared,
noisy machine. The time in ``all_reduce`` is measured inside ``reduce_sum``, after a barrier
that absorbs the ranks' imbalance (reported separately as "wait"), so "all_reduce" is the
communication alone. "CPU ratio" is the baseline's CPU time over rank 0's: the share of the
work one rank does, which a loaded machine leaves intact while it stretches wall times. Workload: an MLP with tanh on Gaussian inputs, square loss, float32, chunks
of 1024 samples. Writes ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing
from torch import Tensor, nn

from sgdstab.distributed import ShardedProblem
from sgdstab.estimators import top_eigenvalues
from sgdstab.operators import hessian
from sgdstab.problem import Problem

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"
WORLD_SIZE = 2


class TimedShardedProblem(ShardedProblem):
    """A ShardedProblem that clocks its reductions: the wait for the other rank, then the all_reduce."""

    wait_s = 0.0
    all_reduce_s = 0.0

    def reduce_sum(self, local: Tensor) -> Tensor:
        start = time.perf_counter()
        dist.barrier(group=self.group)
        synchronized = time.perf_counter()
        total = super().reduce_sum(local)
        self.wait_s += synchronized - start
        self.all_reduce_s += time.perf_counter() - synchronized
        return total


def _workload(n: int, widths: list[int]) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(n, widths[0], generator=generator)
    targets = torch.randn(n, widths[-1], generator=generator)
    return model, inputs, targets


def _apply(kind: str, problem: Problem, vector: Tensor) -> tuple[float, float, Tensor, int]:
    """Wall and CPU seconds, result and Hessian products of one full-data HVP ("hvp") or Lanczos
    lambda_max.
    """
    operator = hessian(problem, cache_graph=False)
    start, cpu_start = time.perf_counter(), time.process_time()
    if kind == "hvp":
        result = operator @ vector
    else:
        result = top_eigenvalues(operator, k=1, tol=1e-3, seed=0).values
    return time.perf_counter() - start, time.process_time() - cpu_start, result, operator.num_matvecs


def _rank(rank: int, port: int, args: argparse.Namespace, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    model, inputs, targets = _workload(args.n, args.widths)
    whole = Problem(model, inputs, targets, chunk_size=args.chunk_size)
    sharded = TimedShardedProblem.from_global(model, inputs, targets, chunk_size=args.chunk_size)
    vector = torch.randn(whole.num_params, generator=torch.Generator().manual_seed(2))
    rows: dict[str, list[dict]] = {"hvp": [], "lanczos": []}
    for kind, repeats in (("hvp", args.repeats), ("lanczos", args.lanczos_repeats)):
        for _ in range(repeats + 1):  # the first repeat warms up and is dropped
            dist.barrier()
            if rank == 0:
                single_s, single_cpu_s, single, _ = _apply(kind, whole, vector)
            dist.barrier()
            sharded.wait_s = sharded.all_reduce_s = 0.0
            sharded_s, sharded_cpu_s, result, matvecs = _apply(kind, sharded, vector)
            if rank == 0:
                difference = ((result - single).norm() / single.norm()).item()
                rows[kind].append(
                    {
                        "single_s": single_s,
                        "sharded_s": sharded_s,
                        "single_cpu_s": single_cpu_s,
                        "sharded_cpu_s": sharded_cpu_s,
                        "all_reduce_s": sharded.all_reduce_s,
                        "wait_s": sharded.wait_s,
                        "matvecs": matvecs,
                        "relative_difference": difference,
                    }
                )
    if rank == 0:
        for kind in rows:
            rows[kind] = rows[kind][1:]
        Path(folder, "rows.json").write_text(json.dumps({"rows": rows, "num_params": whole.num_params}))
    dist.destroy_process_group()


def _summary(rows: list[dict]) -> dict:
    return {
        "single_s": statistics.median(r["single_s"] for r in rows),
        "sharded_s": statistics.median(r["sharded_s"] for r in rows),
        "speedup": statistics.median(r["single_s"] / r["sharded_s"] for r in rows),
        "cpu_ratio": statistics.median(r["single_cpu_s"] / r["sharded_cpu_s"] for r in rows),
        "all_reduce_share": statistics.median(r["all_reduce_s"] / r["sharded_s"] for r in rows),
        "wait_share": statistics.median(r["wait_s"] / r["sharded_s"] for r in rows),
        "matvecs": statistics.median(r["matvecs"] for r in rows),
        "max_relative_difference": max(r["relative_difference"] for r in rows),
    }


def print_table(results: dict) -> None:
    print(
        f"\nn={results['args']['n']}, MLP {results['args']['widths']} (p={results['num_params']:,}), "
        f"float32, 1 thread per rank, median of {results['args']['repeats']} (HVP) / "
        f"{results['args']['lanczos_repeats']} (Lanczos) repeats; load average before "
        f"{results['load_before']}, after {results['load_after']} on {results['cpu_count']} CPUs"
    )
    header = (
        f"{'':<18}{'1 rank s':>10}{'2 ranks s':>11}{'speed-up':>10}{'CPU ratio':>11}"
        f"{'all_reduce':>12}{'wait':>8}{'rel. diff':>11}"
    )
    print(header)
    for name, label in (("hvp", "full-data HVP"), ("lanczos", "Lanczos lam_max")):
        s = results["summary"][name]
        print(
            f"{label:<18}{s['single_s']:>10.3f}{s['sharded_s']:>11.3f}{s['speedup']:>9.2f}x{s['cpu_ratio']:>10.2f}x"
            f"{s['all_reduce_share']:>11.1%}{s['wait_share']:>8.1%}{s['max_relative_difference']:>11.1e}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument(
        "--widths", type=lambda s: [int(w) for w in s.split(",")], default=[256, 128, 128, 10]
    )
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lanczos-repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.spawn(_rank, args=(port, args, folder), nprocs=WORLD_SIZE)
        measured = json.loads(Path(folder, "rows.json").read_text())
    results = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "num_params": measured["num_params"],
        "summary": {kind: _summary(rows) for kind, rows in measured["rows"].items()},
        "repeats": measured["rows"],
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - start,
    }
    print_table(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output} ({results['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
