"""Overhead of ``sgdstab.Monitor`` inside a plain SGD loop, and warm- against cold-started Lanczos.

    python benchmarks/monitor.py [--steps 1000] [--every 100] [--repeats 3] [--output benchmarks/results/monitor.json]

Workload: the quick-scale MLP of E1/E2 (``build_model("mlp", width=64, activation="tanh")``,
784-64-1, float32) on MNIST 0 vs 1 (n = 500, +-1 targets), plain SGD (lr 0.05, B = 8, batches of
``torch.randint`` with replacement). The same loop runs without a monitor and with one measuring
lambda_max + ||H||_F + mu (tr H comes from the same products) every ``every`` steps on the whole
set; each repeat runs both, alternating, and the ratio is the median over repeats of
(time with) / (time without). The second table splits one measurement into its parts and gives the
``every`` at which the monitor would cost 10% of training. The last compares Lanczos
Hessian-vector products warm-started from the previous top vector against a cold start at the same
checkpoints. Times are process CPU seconds of one torch thread (``time.process_time``): the
machine is shared, and wall time of a one-thread process under load measures the load. Prints
tables and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import sgdstab

LR, BATCH_SIZE, N = 0.05, 8, 500
MEASURES = ["lambda_max", "frobenius", "mu"]


def setup():
    data = sgdstab.load_dataset("mnist", n=N, classes=[0, 1], targets="pm1", flatten=True)
    model = sgdstab.build_model("mlp", input_shape=784, num_outputs=1, width=64, activation="tanh")
    return data, model


def train(model, data, steps, monitor=None):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(0)
    started = time.process_time()
    for step in range(1, steps + 1):
        index = torch.randint(N, (BATCH_SIZE,), generator=g)
        opt.zero_grad()
        (0.5 * (model(data.inputs[index]) - data.targets[index]).pow(2).sum() / BATCH_SIZE).backward()
        opt.step()
        if monitor is not None:
            monitor.step(step)
    return time.process_time() - started


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/monitor.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, template = setup()
    load = os.getloadavg()[0]

    ratios, plain_times, watched_times = [], [], []
    for _ in range(args.repeats):
        plain = sgdstab.build_model("mlp", input_shape=784, num_outputs=1, width=64, activation="tanh")
        plain_times.append(train(plain, data, args.steps))
        watched = sgdstab.build_model("mlp", input_shape=784, num_outputs=1, width=64, activation="tanh")
        monitor = make_monitor(watched, data, args.every)
        watched_times.append(train(watched, data, args.steps, monitor))
        ratios.append(watched_times[-1] / plain_times[-1])
    step_time = statistics.median(plain_times) / args.steps

    # One measurement split into its parts, at the trained point of the last repeat.
    parts = {}
    for label, measures in [
        ("lambda_max", ["lambda_max"]),
        ("frobenius", ["frobenius"]),
        ("mu", ["mu"]),
        ("all three", MEASURES),
    ]:
        monitor = make_monitor(watched, data, 1, measures=measures)
        monitor.step(0)  # the warm start's first vector; the timed calls are warm ones
        times = []
        for k in (1, 2, 3):
            started = time.process_time()
            monitor.step(k)
            times.append(time.process_time() - started)
        parts[label] = statistics.median(times)

    # Warm against cold Lanczos along one training run, at every checkpoint.
    model = sgdstab.build_model("mlp", input_shape=784, num_outputs=1, width=64, activation="tanh")
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
    print(f"{'CPU seconds':>28} {'without':>9} {'with':>9} {'ratio':>7}")
    for i, (a, b, r) in enumerate(zip(plain_times, watched_times, ratios, strict=True)):
        print(f"{'repeat ' + str(i):>28} {a:9.2f} {b:9.2f} {r:7.2f}")
    print(f"{'median ratio':>28} {'':>9} {'':>9} {statistics.median(ratios):7.2f}  (target <= 1.10)")
    print(f"\none SGD step: {1e3 * step_time:.2f} ms")
    print(f"{'measurement':>28} {'CPU s':>9} {'every for 10%':>14}")
    for name, seconds in parts.items():
        print(f"{name:>28} {seconds:9.3f} {seconds / (0.1 * step_time):14.0f}")
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
        "step_seconds": step_time,
        "measurement_seconds": parts,
        "every_for_10_percent": {k: v / (0.1 * step_time) for k, v in parts.items()},
        "warm_hvps": warm_hvps,
        "cold_hvps": cold_hvps,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
