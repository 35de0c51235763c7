"""Expected GPU-hours of ``sgdstab reproduce --scale full``, from one timed training unit per model family.

    python benchmarks/full_scale_gpu.py --output benchmarks/results/full_scale_gpu.json [--device cuda]
    python benchmarks/full_scale_gpu.py --tiny --output /tmp/t.json     # seconds on a CPU (what CI runs)

For every training run the full-scale configs (``sgdstab.experiments.configure("full")``) ask for,
this script takes its data set, model and batch size, times ``--steps`` SGD steps (after
``--warmup`` untimed ones) of that model on data of the right shape, and multiplies by the run's
step cap; E1's alignment measurements are timed once per family and multiplied by their number.
Runs sharing (data, model, batch size) are timed once. Data: the real files when present, else
random inputs of the data set's shape (the timing depends on shapes only). The totals are upper
bounds: every run is charged its ``max_steps`` although most stop at their loss goal.
E2-E4 are counted from their config fields (``lrs`` x ``batch_sizes`` runs of ``max_steps``,
``widths``/``ns`` sweeps with ``gd_max_steps``, E4's phases); what a recipe does beyond that
(E5's stability analysis, E2's curvature summaries) is not timed. Every count is multiplied by
the recipe's number of ``seeds``. Prints a table, writes JSON.
``--tiny`` shrinks every model and step count so the script itself is tested on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from sgdstab.alignment import alignment
from sgdstab.data import DatasetNotFoundError
from sgdstab.experiments import configure
from sgdstab.experiments.config import DataConfig, ModelConfig
from sgdstab.experiments.e1_alignment import output_alignment
from sgdstab.models import build_model
from sgdstab.problem import Problem
from sgdstab.run_spec import DTYPES
from sgdstab.sample_space import gram_matrix

#: (channels, height, width, classes) of each data set, for synthetic stand-ins.
SHAPES = {"cifar10": (3, 32, 32, 10), "fashion_mnist": (1, 28, 28, 10), "mnist": (1, 28, 28, 10)}
TINY_MODELS: dict[str, dict[str, Any]] = {
    "vgg": {"depth": [1], "width": 2},
    "resnet": {"depth": [1], "width": 2},
    "mlp": {"width": 4, "depth": 2, "activation": "tanh"},
    "random_features": {"num_features": 8},
}


def inputs_and_targets(
    data: DataConfig, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The data set's samples when its files are here, else Gaussian inputs and targets of its shape."""
    try:
        loaded = dataclasses.replace(data, data_dir=data.data_dir).load(device, "float32")
        return loaded.inputs.to(dtype), loaded.targets.to(dtype), "real"
    except DatasetNotFoundError:
        channels, height, width, classes = SHAPES[data.name]
        outputs = 1 if data.targets == "pm1" else (len(data.classes) if data.classes else classes)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(data.n, channels, height, width, generator=generator, dtype=dtype).to(device)
        y = torch.randn(data.n, outputs, generator=generator, dtype=dtype).to(device)
        return x, y, "synthetic"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int | None,
    steps: int,
    warmup: int,
    device: str,
) -> float:
    """Seconds per plain SGD step (square loss, SPEC's (1/2B) sum ||f - y||^2) of ``batch_size`` samples."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    size = len(x) if batch_size is None else batch_size

    def step() -> None:
        index = torch.randint(len(x), (size,), generator=generator).to(device)
        optimizer.zero_grad()
        (0.5 * (model(x[index]) - y[index]).pow(2).sum() / size).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def time_measurement(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, config: Any, device: str
) -> float:
    """Seconds of one E1 measurement as the recipe takes it (the second call: the first warms up).

    One output: ``alignment`` with E1's method; C outputs: the exact K and ``output_alignment``.
    """
    problem = Problem(model.eval(), x, y)

    def measure() -> None:
        if y.shape[1] == 1:
            alignment(problem, method=config.alignment, num_probes=config.num_probes, hessian=False)
        else:
            gram = gram_matrix(problem, max_jacobian_entries=config.max_jacobian_entries)
            output_alignment(gram, problem.residuals().reshape(len(x), -1))

    measure()
    synchronize(device)
    started = time.perf_counter()
    measure()
    synchronize(device)
    return time.perf_counter() - started


def training_runs(configs: dict[str, Any]) -> list[dict]:
    """(experiment, data, model, batch size, step cap, measurements) of every training run asked for."""
    runs = []

    def add(
        name: str,
        data: DataConfig,
        model: ModelConfig,
        batch: int | None,
        steps: int,
        count: int = 1,
        measurements: int = 0,
    ) -> None:
        runs.append(
            {
                "experiment": name,
                "data": data,
                "model": model,
                "batch_size": batch,
                "steps": steps,
                "count": count,
                "measurements": measurements,
            }
        )

    for name, c in configs.items():
        first = len(runs)
        if name == "E1":
            for family in c.families:
                add(
                    name,
                    c.data,
                    family,
                    c.batch_size,
                    c.max_steps,
                    measurements=c.max_steps // c.measure_every + 1,
                )
            for data in c.multiclass_data:
                for family in c.multiclass_families:
                    add(
                        name,
                        data,
                        family,
                        c.batch_size,
                        c.multiclass_max_steps,
                        measurements=c.multiclass_max_steps // c.multiclass_measure_every + 1,
                    )
        elif name == "E5":
            for minimum in c.minima:
                add(name, c.data, c.model, minimum.batch_size, c.max_steps)
        else:
            # E2-E4: counted from the fields their configs share (see the module docstring).
            fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
            model, steps = fields.get("model"), fields.get("max_steps", 0)
            if model is None:
                continue
            grid = len(fields.get("lrs", (None,))) * len(fields.get("batch_sizes", (None,)))
            sizes = len(fields.get("widths", ())) + len(fields.get("ns", ()))
            batches = fields.get("batch_sizes") or (fields.get("batch_size"),)
            if sizes:
                add(name, c.data, model, batches[0], steps, count=sizes)
                add(name, c.data, model, None, fields.get("gd_max_steps", steps), count=sizes)
            elif "gd_lr" in fields:
                add(name, c.data, model, None, fields.get("gd_max_steps", steps))
                add(
                    name,
                    c.data,
                    model,
                    batches[0],
                    fields.get("escape_steps", 0) * fields.get("repeats", 1) + fields.get("settle_steps", 0),
                )
            else:
                add(name, c.data, model, batches[0], steps, count=grid)
        # Every seed of a recipe repeats all of its runs.
        for run in runs[first:]:
            run["count"] *= len(getattr(c, "seeds", (0,)))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=200, help="timed SGD steps per unit")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="tiny models, 4 steps: tests the script on a CPU")
    parser.add_argument(
        "--skip-measurements",
        action="store_true",
        help="time training steps only (a quick CPU extrapolation)",
    )
    args = parser.parse_args()
    steps, warmup = (4, 1) if args.tiny else (args.steps, args.warmup)
    configs = configure("full", device=args.device)
    runs = training_runs(configs)
    dtype = DTYPES["float32"]
    timed: dict[tuple, dict] = {}
    units = []
    for run in runs:
        model_config: ModelConfig = run["model"]
        data: DataConfig = run["data"]
        if args.tiny:
            model_config = dataclasses.replace(
                model_config, kwargs=TINY_MODELS.get(model_config.name, model_config.kwargs)
            )
            data = dataclasses.replace(data, n=min(data.n, 20))
        batch = run["batch_size"] if run["batch_size"] is None else min(run["batch_size"], data.n)
        key = (
            data.name,
            data.n,
            data.targets,
            data.classes,
            model_config.name,
            json.dumps(model_config.kwargs, sort_keys=True),
            batch,
        )
        if key not in timed:
            x, y, source = inputs_and_targets(data, args.device, dtype)
            model = build_model(
                model_config.name,
                input_shape=tuple(x.shape[1:]),
                num_outputs=y.shape[1],
                seed=0,
                **model_config.kwargs,
            ).to(args.device, dtype)
            per_step = time_steps(model, x, y, batch, steps, warmup, args.device)
            entry = {
                "seconds_per_step": per_step,
                "source": source,
                "params": sum(p.numel() for p in model.parameters()),
            }
            if run["measurements"] and not args.skip_measurements:
                entry["seconds_per_measurement"] = time_measurement(model, x, y, configs["E1"], args.device)
            timed[key] = entry
            # Progress per timed unit: a run cut short by its time limit still shows what it measured.
            print(
                f"timed {run['experiment']} {data.name} {model_config.title} B={batch}: "
                f"{1000 * per_step:.2f} ms/step, {entry.get('seconds_per_measurement', 0.0):.2f} s/measurement",
                flush=True,
            )
        entry = timed[key]
        seconds = run["count"] * (
            run["steps"] * entry["seconds_per_step"]
            + run["measurements"] * entry.get("seconds_per_measurement", 0.0)
        )
        units.append(
            {
                "experiment": run["experiment"],
                "data": data.name,
                "n": data.n,
                "family": model_config.name,
                "label": model_config.title,
                "params": entry["params"],
                "batch_size": batch,
                "runs": run["count"],
                "steps": run["steps"],
                "seconds_per_step": entry["seconds_per_step"],
                "measurements": run["measurements"],
                "seconds_per_measurement": entry.get("seconds_per_measurement")
                if run["measurements"]
                else None,
                "data_source": entry["source"],
                "gpu_hours": seconds / 3600,
            }
        )
    total = sum(u["gpu_hours"] for u in units)
    print(
        f"{'exp':4} {'data':14} {'n':>5} {'model':16} {'params':>9} {'B':>5} {'runs':>4} {'steps':>7} {'ms/step':>8} {'s/meas':>7} {'hours':>7}"
    )
    for u in units:
        meas = f"{u['seconds_per_measurement']:.2f}" if u["seconds_per_measurement"] is not None else "-"
        print(
            f"{u['experiment']:4} {u['data']:14} {u['n']:>5} {u['label'][:16]:16} {u['params']:>9} {str(u['batch_size']):>5} {u['runs']:>4} "
            f"{u['steps']:>7} {1000 * u['seconds_per_step']:>8.2f} {meas:>7} {u['gpu_hours']:>7.3f}"
        )
    by_experiment: dict[str, float] = {}
    for u in units:
        by_experiment[u["experiment"]] = by_experiment.get(u["experiment"], 0.0) + u["gpu_hours"]
    print("GPU-hours per experiment: " + ", ".join(f"{k} {v:.2f}" for k, v in by_experiment.items()))
    print(f"expected GPU-hours of `sgdstab reproduce --scale full` (step caps, upper bound): {total:.2f}")
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    result = {
        "benchmark": "full_scale_gpu",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "tiny": args.tiny,
        "measurements_timed": not args.skip_measurements,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "units": units,
        "gpu_hours_per_experiment": by_experiment,
        "total_gpu_hours": total,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
