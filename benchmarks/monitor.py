"""Overhead of ``sgdstab.Monitor`` inside a plain SGD loop, and warm- against cold-started Lanczos.

    python benchmarks/monitor.py [--steps 1000] [--every 100] [--repeats 3] [--output benchmarks/results/monitor.json]

Workload: the quick-scale MLP of E1/E2 (``build_model("mlp", width=64, activation="tanh")``,
784-64-1, float32) on MNIST 0 vs 1 (n = 500, +-1 targets), plain SGD (lr 0.05, B = 8, batches of
``torch.randint`` with replacement). The same loop runs without a monitor and with one measuring
lambda_max + ||H||_F + mu (tr H comes from the same products) every ``every`` steps on the whole
set with the Monitor's default accuracy; each repeat runs both, alternating, and the ratio is the
median over repeats of (time with) / (time without); "in run" is the same run's
(time with) / (time with less the CPU time inside ``monitor.step``), which a change of load
between the two runs does not move. The second table splits one measurement into
its parts, with the relative accuracy each reports and the ``every`` at which it alone would cost
10% of training; the third gives the passes a measurement is built from (the floor of its cost);
the fourth times a per-measure schedule that gives each measure a third of a 10% budget (periods
rounded up to multiples of 100, trained for twice the longest period). The last compares Lanczos
Hessian-vector products warm-started from the previous top vector against a cold start at the same
checkpoints. Times are process CPU seconds of one torch thread (``time.process_time``): the
machine is shared, and wall time of a one-thread process under load measures the load. Prints
tables and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import sgdstab

LR, BATCH_SIZE, N = 0.05, 8, 500
MEASURES = ["lambda_max", "frobenius", "mu"]


DATA = sgdstab.load_dataset("mnist", n=N, classes=[0, 1], targets="pm1", flatten=True)


def train(model, data, steps, monitor=None):
    """(CPU seconds of the loop, CPU seconds of it spent in ``monitor.step``)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(0)
    in_monitor = 0.0
    started = time.process_time()
    for step in range(1, steps + 1):
        index = torch.randint(N, (BATCH_SIZE,), generator=g)
        opt.zero_grad()
        (0.5 * (model(data.inputs[index]) - data.targets[index]).pow(2).sum() / BATCH_SIZE).backward()
        opt.step()
        if monitor is not None:
            entered = time.process_time()
            monitor.step(step)
            in_monitor += time.process_time() - entered
    return time.process_time() - started, in_monitor


def make_monitor(model, data, every, measures=MEASURES, warm_start=True):
    return sgdstab.Monitor(
        model,
        (data.inputs, data.targets),
        every=every,
        lr=LR,
        batch_size=BATCH_SIZE,
        sampling="with_replacement",
        measures=measures,
        warm_start=warm_start,
    )


def timed_training(make_watched, steps, repeats):
    """Plain and watched CPU seconds of ``repeats`` alternating runs, with two ratios each.

    ratio: (watched run) / (plain run), two runs; in_run: (watched run) / (watched run less its
    time in the monitor), one run, so a change of machine load between runs does not enter it.
    """
    plain_times, watched_times, ratios, in_run = [], [], [], []
    for _ in range(repeats):
        plain = sgdstab.build_model("mlp", input_shape=784, num_outputs=1, width=64, activation="tanh")
        plain_times.append(train(plain, DATA, steps)[0])
        watched = sgdstab.build_model("mlp", input_shape=784, num_outputs=1, width=64, activation="tanh")
        total, in_monitor = train(watched, DATA, steps, make_watched(watched))
        watched_times.append(total)
        ratios.append(total / plain_times[-1])
        in_run.append(total / (total - in_monitor))
    return plain_times, watched_times, ratios, in_run, watched


def cpu_ms(function, repeats=5):
    times = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        times.append(time.process_time() - started)
    return 1e3 * statistics.median(times)


def floor_costs(model):
    """CPU ms of the passes every measurement is built from, on the whole measurement set."""
    problem = sgdstab.Problem(model, DATA.inputs, DATA.targets)
    vector = torch.randn(problem.num_params, 1, generator=torch.Generator().manual_seed(0))
    cached = sgdstab.hessian(problem, cache_graph=True)
    cached @ vector
    kernel = sgdstab.ntk(problem)
    block = torch.randn(N, 10, generator=torch.Generator().manual_seed(1))
    return {
        "forward (loss)": cpu_ms(problem.loss),
        "gradient graph + 1 HVP": cpu_ms(lambda: sgdstab.hessian(problem, cache_graph=True) @ vector),
        "1 HVP on a cached graph": cpu_ms(lambda: cached @ vector),
        "1 NTK product (in a block of 10)": cpu_ms(lambda: kernel @ block) / 10,
    }


def budget_schedule(parts, step_time, budget=0.1):
    """Periods (multiples of 100) that give each of the three measures a third of the budget."""
    share = budget / len(MEASURES) * step_time
    return {m: 100 * math.ceil(parts[m] / share / 100) for m in MEASURES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/monitor.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]

    plain_times, watched_times, ratios, in_run, watched = timed_training(
        lambda model: make_monitor(model, DATA, args.every), args.steps, args.repeats
    )
    step_time = statistics.median(plain_times) / args.steps

    # One measurement split into its parts, at the trained point of the last repeat, with the
    # relative accuracy each reports (standard error / value; Lanczos: its stopping tolerance).
    parts, accuracy = {}, {}
    for label, due in [
        ("lambda_max", "lambda_max"),
        ("frobenius", "frobenius"),
        ("mu", "mu"),
        ("all three", None),
    ]:
        # Every measure runs at step 0 (the warm start's vector); the timed steps 1-3 run only
        # ``due``, as a per-measure schedule does (||H||_F then deflates the step-0 top vector).
        every = 1 if due is None else {m: 1 if m == due else 1000 for m in MEASURES}
        monitor = make_monitor(watched, DATA, every)
        monitor.step(0)
        times, rows = [], []
        for k in (1, 2, 3):
            started = time.process_time()
            rows.append(monitor.step(k))
            times.append(time.process_time() - started)
        parts[label] = statistics.median(times)
        row = rows[-1]
        accuracy[label] = {
            "lambda_max": monitor.tol,
            "frobenius": row.get("hessian_frobenius_stderr", 0) / row.get("hessian_frobenius", 1),
            "mu": row.get("mu_stderr", 0) / row.get("mu", 1),
        }.get(label)
    floors = floor_costs(watched)

    # A per-measure schedule that fits 10%, timed the same way over enough steps to measure each twice.
    schedule = budget_schedule(parts, step_time)
    schedule_steps = 2 * max(schedule.values())
    _, _, schedule_ratios, schedule_in_run, _ = timed_training(
        lambda model: make_monitor(model, DATA, schedule), schedule_steps, args.repeats
    )

    # Warm against cold Lanczos along one training run, at every checkpoint.
    model = sgdstab.build_model("mlp", input_shape=784, num_outputs=1, width=64, activation="tanh")
    data = DATA
    warm = make_monitor(model, data, args.every, measures=["lambda_max"])
    cold = make_monitor(model, data, args.every, measures=["lambda_max"], warm_start=False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(0)
    warm.step(0)
    warm_hvps, cold_hvps = [], []
    for step in range(1, args.steps + 1):
        index = torch.randint(N, (BATCH_SIZE,), generator=g)
        opt.zero_grad()
        (0.5 * (model(data.inputs[index]) - data.targets[index]).pow(2).sum() / BATCH_SIZE).backward()
        opt.step()
        w, c = warm.step(step), cold.step(step)
        if w is not None:
            warm_hvps.append(int(w["lambda_max_matvecs"]))
            cold_hvps.append(int(c["lambda_max_matvecs"]))

    print(
        f"training {args.steps} SGD steps (B={BATCH_SIZE}, n={N}), monitor every {args.every}, load {load:.1f}"
    )
    print(f"{'CPU seconds':>28} {'without':>9} {'with':>9} {'ratio':>7} {'in run':>7}")
    for i, (a, b, r, q) in enumerate(zip(plain_times, watched_times, ratios, in_run, strict=True)):
        print(f"{'repeat ' + str(i):>28} {a:9.2f} {b:9.2f} {r:7.2f} {q:7.2f}")
    print(
        f"{'median ratio':>28} {'':>9} {'':>9} {statistics.median(ratios):7.2f} "
        f"{statistics.median(in_run):7.2f}  (target <= 1.10)"
    )
    print(f"\none SGD step: {1e3 * step_time:.2f} ms")
    print(f"{'measurement':>28} {'CPU ms':>9} {'rel. accuracy':>14} {'every for 10%':>14}")
    for name, seconds in parts.items():
        rel = "" if accuracy[name] is None else f"{accuracy[name]:.3f}"
        print(f"{name:>28} {1e3 * seconds:9.1f} {rel:>14} {seconds / (0.1 * step_time):14.0f}")
    print(f"\n{'pass on n=' + str(N):>34} {'CPU ms':>9}")
    for name, ms in floors.items():
        print(f"{name:>34} {ms:9.2f}")
    print(
        f"\nschedule {schedule} over {schedule_steps} steps: ratios "
        f"{[round(r, 3) for r in schedule_ratios]}, median {statistics.median(schedule_ratios):.3f}; "
        f"in run {[round(r, 3) for r in schedule_in_run]}, median {statistics.median(schedule_in_run):.3f}"
    )
    print(f"\nLanczos HVPs per checkpoint (every {args.every} steps): warm {warm_hvps}")
    print(f"{'':>46}cold {cold_hvps}")
    print(f"total warm / cold: {sum(warm_hvps)} / {sum(cold_hvps)} = {sum(warm_hvps) / sum(cold_hvps):.2f}")

    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": 1,
        "clock": "process_time",
        "load_average": load,
        "steps": args.steps,
        "every": args.every,
        "train_seconds_without": plain_times,
        "train_seconds_with": watched_times,
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "in_run_ratios": in_run,
        "median_in_run_ratio": statistics.median(in_run),
        "step_seconds": step_time,
        "measurement_seconds": parts,
        "relative_accuracy": accuracy,
        "every_for_10_percent": {k: v / (0.1 * step_time) for k, v in parts.items()},
        "floor_ms": floors,
        "schedule": schedule,
        "schedule_steps": schedule_steps,
        "schedule_ratios": schedule_ratios,
        "schedule_median_ratio": statistics.median(schedule_ratios),
        "schedule_in_run_ratios": schedule_in_run,
        "schedule_median_in_run_ratio": statistics.median(schedule_in_run),
        "warm_hvps": warm_hvps,
        "cold_hvps": cold_hvps,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
