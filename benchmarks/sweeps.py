"""A local sweep on 2 worker processes against the same sweep run sequentially in one process.

    python benchmarks/sweeps.py [--repeats 3] [--runs 8] [--steps 1500] [--output benchmarks/results/sweeps.json]

Workload: ``--runs`` independent SGD runs (a grid over lr, B and seed) of an MLP 784-8-1 (tanh)
on 40 MNIST digits 0/1, ``--steps`` steps each, no curvature at the end, one torch thread per
run. ``LocalExecutor(jobs=1)`` (in-process, in order) and ``LocalExecutor(jobs=2)`` (a pool of
two workers forked from a server that imported sgdstab once; its start-up is included) each
train the whole grid into a fresh folder, alternating, ``--repeats`` times. Speed-up = median
sequential time / median pooled time. The results are checked equal (bit for bit, but the wall
clock) before any time is reported. The machine's load average is recorded at the start of
each repeat: on a shared 2-core box the second worker competes with other processes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sgdstab.sweeps import LocalExecutor, sweep_tasks

RESULTS = Path(__file__).resolve().parent / "results" / "sweeps.json"


def grid(runs: int) -> dict:
    lrs, sizes = [0.05, 0.1], [4, 16]
    seeds = list(range(max(1, runs // (len(lrs) * len(sizes)))))
    return {"lr": lrs, "batch_size": sizes, "seed": seeds}


def one_sweep(jobs: int, root: Path, args: argparse.Namespace) -> tuple[float, list[dict]]:
    tasks = sweep_tasks(
        root,
        grid(args.runs),
        n=40,
        model_args={"width": 8, "activation": "tanh"},
        max_steps=args.steps,
        loss_goal=None,
        checkpoint_every=args.steps,
    )
    started = time.perf_counter()
    records = LocalExecutor(jobs=jobs).run([tasks])[0]
    elapsed = time.perf_counter() - started
    for record in records:
        for key in ("wall_time_s", "resumed_from"):
            record["train"].pop(key)
    return elapsed, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    times: dict[int, list[float]] = {1: [], 2: []}
    loads = []
    with tempfile.TemporaryDirectory(prefix="sgdstab-bench-sweeps-") as scratch:
        # Warm-up: the data set is read and cached once, as a real sweep's first run would.
        one_sweep(1, Path(scratch) / "warm-up", argparse.Namespace(runs=1, steps=10))
        for repeat in range(args.repeats):
            loads.append(os.getloadavg()[0])
            results = {}
            for jobs in (1, 2):
                elapsed, results[jobs] = one_sweep(jobs, Path(scratch) / f"jobs{jobs}-{repeat}", args)
                times[jobs].append(elapsed)
            if results[1] != results[2]:
                sys.exit("jobs=2 gave other numbers than jobs=1: the benchmark refuses to report a time")
    sequential, pooled = statistics.median(times[1]), statistics.median(times[2])
    report = {
        "workload": {"runs": len(results[1]), "steps": args.steps, "model": "mlp 784-8-1 tanh", "n": 40},
        "seconds": {"jobs=1": times[1], "jobs=2": times[2]},
        "median_s": {"jobs=1": sequential, "jobs=2": pooled},
        "speedup_jobs2_over_jobs1": sequential / pooled,
        "load_average_1min": loads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    print(f"{'executor':<12}{'median s':>10}{'all repeats (s)':>40}")
    for jobs in (1, 2):
        print(
            f"{f'jobs={jobs}':<12}{report['median_s'][f'jobs={jobs}']:>10.2f}{str([round(t, 2) for t in times[jobs]]):>40}"
        )
    print(f"speed-up jobs=2 / jobs=1: {report['speedup_jobs2_over_jobs1']:.2f}x   (load average {loads})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
