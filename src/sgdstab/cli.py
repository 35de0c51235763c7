"""The ``sgdstab`` command line: a thin layer, one library call per command.

    sgdstab reproduce   sgdstab.experiments.reproduce (E1-E5 of Wu, Wang & Su 2022, then the report)
    sgdstab train       sgdstab.run_spec.train_run (GD/SGD in a run folder)
    sgdstab sweep       sgdstab.sweeps.sweep (a grid of train runs on a process pool or SLURM, one table)
    sgdstab measure     sgdstab.summary.curvature_summary (lambda_max, top-k, tr H, ||H||_F, density, mu)
    sgdstab stability   sgdstab.stability.stability (every threshold of SPEC.md section 3)
    sgdstab report      sgdstab.report.write_report

``measure`` and ``stability`` read a run folder made by ``train``/``reproduce``, or
``--problem module:function``, a function of no arguments returning a ``sgdstab.Problem``, so
users analyse their own models. A bad input (lr <= 0, B > n, an unknown model or data set, a
missing or damaged file, a folder another command is writing) raises a ``sgdstab.errors.SgdstabError``
in the library, which exits with status 2 and a one-line reason on stderr; any other exception is
a bug (in sgdstab, or in the user's ``--problem`` function) and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sgdstab.errors import InputError, SgdstabError
from sgdstab.io import dumps

if TYPE_CHECKING:
    from sgdstab.sweeps import Executor

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Curvature, SGD noise alignment and linear stability of SGD (Wu, Wang & Su, NeurIPS 2022).",
)
console = Console()
errors = Console(stderr=True)


@app.callback()
def main(
    threads: int = typer.Option(
        1,
        help="torch CPU threads (0: torch's default). One is fastest for the small ops of SGD on a shared CPU; "
        "raise it for large models.",
    ),
) -> None:
    with user_errors():
        if threads < 0:
            raise InputError(f"--threads must be >= 1 (0: torch's default), got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _is_user_error(err: BaseException) -> bool:
    """Exactly the errors a user can fix (``SgdstabError``); anything else is a bug and keeps its traceback."""
    return isinstance(err, SgdstabError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except Exception as err:
        if not _is_user_error(err):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        errors.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _emit(data: dict, as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(dumps(data, indent=2))
        return
    table = Table(title=title, show_header=False)
    for key, value in data.items():
        if isinstance(value, (list, tuple)) and len(value) > 8:
            value = f"[{len(value)} values]"
        elif isinstance(value, float):
            value = f"{value:.6g}"
        table.add_row(key, str(value))
    console.print(table)


class ProgressBars:
    """Progress on stderr: rich bars on a terminal, else a plain line per task at most every few seconds.

    Nothing is drawn before the first ``update``, so an input error found first stays one line.
    """

    def __init__(self, min_interval_s: float = 5.0):
        self.interactive = errors.is_terminal
        self.min_interval_s = min_interval_s
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=errors,
        )
        self._tasks: dict[str, Any] = {}
        self._last_line = -math.inf
        self._started = time.monotonic()

    def update(self, name: str, done: int, total: int, description: str | None = None) -> None:
        """Set task ``name`` to ``done`` of ``total`` (the task is made on its first update)."""
        description = description or name
        if self.interactive:
            if name not in self._tasks:
                self._bar.start()
                self._tasks[name] = self._bar.add_task(description, total=total)
            self._bar.update(self._tasks[name], completed=done, total=total, description=description)
            return
        now = time.monotonic()
        finished = done >= total and self._tasks.get(name) != done
        if finished or now - self._last_line >= self.min_interval_s:
            self._tasks[name] = done
            self._last_line = now
            errors.print(
                f"{description}  {done}/{total}  {now - self._started:.0f} s",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    def stop(self) -> None:
        if self._bar.live.is_started:
            self._bar.stop()


@contextlib.contextmanager
def progress_bar() -> Iterator[ProgressBars]:
    bars = ProgressBars()
    try:
        yield bars
    finally:
        bars.stop()


# ------------------------------------------------------------------------------------- reproduce
@app.command()
def reproduce(
    scale: str = typer.Option(
        "quick",
        help="quick: CPU, MNIST subset, small nets. full: CIFAR-10, VGG/ResNet, GPU. "
        "smoke: seconds, to check an installation.",
    ),
    only: list[str] | None = typer.Option(
        None, "--only", help="Run only these experiments: E2, or E1,E3; repeatable."
    ),
    data_dir: Path | None = typer.Option(None, help="Data folder (e.g. the parent of cifar-10-batches-py)."),
    out: Path | None = typer.Option(None, help="Suite folder (default: results/<scale>)."),
    device: str | None = typer.Option(None, help="Device for every experiment (cpu, cuda, ...)."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a setting: E2.lrs=[0.02,0.05] or data.n=300; repeatable."
    ),
    download: bool = typer.Option(
        False,
        "--download",
        help="Fetch CIFAR-10 (MD5-checked) into --data-dir first when it is missing; needs internet.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the verdicts as JSON."),
    executor: str | None = typer.Option(
        None,
        help="Where the runs train: local (worker processes) or slurm (job arrays via submitit). "
        "Default: in this process, one after another.",
    ),
    jobs: int | None = typer.Option(
        None, help="Local worker processes, one torch thread each (implies --executor local)."
    ),
    slurm_folder: Path | None = typer.Option(None, help="submitit's job folder, on shared storage (slurm)."),
    partition: str | None = typer.Option(None, help="SLURM partition."),
    gpus_per_run: int = typer.Option(0, help="GPUs per SLURM job."),
    cpus_per_run: int = typer.Option(1, help="CPU cores (and torch threads) per SLURM job."),
    time: int = typer.Option(60, help="Minutes per SLURM job (a timed-out job is requeued and resumes)."),
    mem: float | None = typer.Option(None, help="GB of memory per SLURM job."),
) -> None:
    """Run the experiments E1-E5 (resuming finished runs) and write report.md / report.html in --out."""
    from sgdstab.data import find_cifar10
    from sgdstab.experiments import reproduce as run_suite

    out = out if out is not None else Path("results") / scale
    with user_errors(), progress_bar() as bar:
        if download:
            find_cifar10(data_dir, download=True)
        runner = None
        if executor is not None or jobs is not None:
            runner = _executor(
                executor or "local", jobs or 1, slurm_folder, partition, gpus_per_run, cpus_per_run, time, mem
            )

        def progress(label: str, done: int, total: int) -> None:
            bar.update(label.split()[0], done, total, label)

        chosen = None if only is None else [name for item in only for name in item.split(",")]
        analyses = run_suite(
            out,
            scale=scale,
            only=chosen,
            data_dir=str(data_dir) if data_dir else None,
            device=device,
            overrides=set_ or (),
            progress=progress,
            executor=runner,
        )
    verdicts = {name: {"holds": a["holds"], "checks": a["checks"]} for name, a in analyses.items()}
    if as_json:
        typer.echo(dumps(verdicts, indent=2))
        return
    from sgdstab.report import VERDICTS

    table = Table(title=f"verdicts ({out}/report.html)")
    for column in ("experiment", "verdict", "evidence"):
        table.add_column(column)
    for name, verdict in verdicts.items():
        table.add_row(name, VERDICTS[verdict["holds"]], "\n".join(c["detail"] for c in verdict["checks"]))
    console.print(table)


# ------------------------------------------------------------------------------------- train
def _parse_model_args(pairs: list[str]) -> dict[str, Any]:
    parsed = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise InputError(f"--model-arg takes KEY=VALUE (e.g. width=64), got {pair!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


@app.command()
def train(
    out: Path = typer.Option(
        ..., help="Run folder to write (config.json, checkpoint.pt, metrics.jsonl, final.json)."
    ),
    model: str = typer.Option(
        "mlp", help="Model family: linear, deep_linear, random_features, mlp, vgg, resnet."
    ),
    model_arg: list[str] | None = typer.Option(
        None, help="Model argument KEY=VALUE (e.g. width=64); repeatable."
    ),
    dataset: str = typer.Option("mnist", help="Data set: synthetic, digits, mnist, fashion_mnist, cifar10."),
    n: int = typer.Option(500, help="Number of training samples."),
    classes: str = typer.Option("0,1", help="Comma-separated class ids to keep ('' for all)."),
    targets: str = typer.Option("pm1", help="Targets: pm1 (two classes), onehot."),
    data_dir: Path | None = typer.Option(None, help="Data folder (default: the data set's own)."),
    lr: float = typer.Option(0.02, help="Learning rate eta > 0."),
    batch_size: int = typer.Option(8, help="Batch size B (0: full-batch GD)."),
    sampling: str = typer.Option("with_replacement", help="with_replacement or without_replacement."),
    max_steps: int = typer.Option(10_000, help="Most parameter updates."),
    loss_goal: float = typer.Option(1e-4, help="Stop once the loss is at most this."),
    seed: int = typer.Option(0, help="Seed of the initial weights and the batches."),
    device: str = typer.Option("cpu", help="Device."),
    dtype: str = typer.Option("float32", help="float32 or float64."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a model by GD or SGD into a run folder that `measure` and `stability` can read."""
    from sgdstab.run_spec import DTYPES, DataConfig, ModelConfig, TrainSpec, train_run

    with user_errors():
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        try:
            class_ids = tuple(int(c) for c in classes.split(",")) if classes.strip() else None
        except ValueError:
            raise InputError(
                f"--classes takes comma-separated class ids (e.g. 0,1), got {classes!r}"
            ) from None
        spec = TrainSpec(
            data=DataConfig(dataset, n, class_ids, targets, str(data_dir) if data_dir else None, seed),
            model=ModelConfig(model, _parse_model_args(model_arg or [])),
            lr=lr,
            batch_size=batch_size or None,
            sampling=sampling,
            max_steps=max_steps,
            loss_goal=loss_goal,
            seed=seed,
            device=device,
            dtype=dtype,
        )
        with progress_bar() as bar:

            def progress(row: dict) -> None:
                bar.update("training", row["step"], max_steps, f"training  loss {row['loss']:.3g}")

            final = train_run(out, spec, progress=progress)
            # A run that converges (or diverges) early is done: its bar ends full.
            bar.update("training", max_steps, max_steps, f"training  {final['train']['status']}")
    _emit(final["train"], as_json, f"trained into {out}")


# ------------------------------------------------------------------------------------- sweep
@app.command()
def sweep(
    out: Path = typer.Option(..., help="Sweep folder: runs/<run-id>/, sweep.csv, sweep.parquet, sweep.png."),
    grid: list[str] = typer.Option(
        ..., help="A train argument and its values: lr=0.01,0.02 or classes=[[0,1],[3,5]]; repeatable."
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", help='A fixed train argument: n=500, model=mlp, model_args={"width":64}; repeatable.'
    ),
    executor: str = typer.Option(
        "local", help="local (worker processes) or slurm (a job array via submitit)."
    ),
    jobs: int = typer.Option(1, help="Local worker processes (1: in this process, in grid order)."),
    slurm_folder: Path | None = typer.Option(None, help="submitit's job folder, on shared storage (slurm)."),
    partition: str | None = typer.Option(None, help="SLURM partition."),
    gpus_per_run: int = typer.Option(0, help="GPUs per SLURM job."),
    cpus_per_run: int = typer.Option(1, help="CPU cores (and torch threads) per SLURM job."),
    time: int = typer.Option(60, help="Minutes per SLURM job (a timed-out job is requeued and resumes)."),
    mem: float | None = typer.Option(None, help="GB of memory per SLURM job."),
) -> None:
    """Train one run per grid point on an executor (resuming finished runs), then tabulate and plot them."""
    from sgdstab.sweeps import parse_assignments
    from sgdstab.sweeps import sweep as run_sweep

    with user_errors():
        result = run_sweep(
            out,
            parse_assignments(grid, grid=True),
            _executor(executor, jobs, slurm_folder, partition, gpus_per_run, cpus_per_run, time, mem),
            **parse_assignments(set_ or [], grid=False),
        )
    typer.echo("\n".join(str(p) for p in (result.csv, result.parquet, result.figure)))


def _executor(
    kind: str,
    jobs: int,
    slurm_folder: Path | None,
    partition: str | None,
    gpus_per_run: int,
    cpus_per_run: int,
    time: int,
    mem: float | None,
) -> Executor:
    """The executor of the sweep and reproduce options (the SLURM ones apply to slurm only)."""
    from sgdstab.sweeps import make_executor

    if kind != "slurm":
        return make_executor(kind, jobs, slurm_folder)
    slurm = dict(
        partition=partition, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, time_min=time, mem_gb=mem
    )
    return make_executor(kind, jobs, slurm_folder, **slurm)


# ------------------------------------------------------------------------------------- measure / stability
def load_problem(run: Path | None, problem: str | None, device: str | None = None):
    """The Problem to analyse: a run folder, or ``module:function`` returning a Problem."""
    from sgdstab.problem import Problem
    from sgdstab.run_spec import load_run

    if run is not None and problem is None:
        return load_run(run, device)[0]
    if run is not None or problem is None:
        raise InputError("give either a run folder or --problem module:function (exactly one)")
    module_name, separator, function_name = problem.partition(":")
    if not separator or not module_name or not function_name:
        raise InputError(f"--problem takes module:function (e.g. mymodels:make_problem), got {problem!r}")
    # The current folder first, as `python -m` does, so a user's own module is found.
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"--problem {problem}: cannot import {module_name!r} ({err})") from err
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"--problem {problem}: module {module_name!r} has no function {function_name!r}")
    _check_no_arguments(problem, function)
    try:
        made = function()
    except SystemExit as exit_:
        raise InputError(
            f"--problem {problem}: the function exited ({exit_!r}) instead of returning a Problem"
        ) from None
    if not isinstance(made, Problem):
        raise InputError(f"{problem} returned a {type(made).__name__}, not a sgdstab.Problem")
    return made


def _check_no_arguments(problem: str, function: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin without a signature: let the call decide
    try:
        signature.bind()
    except TypeError:
        raise InputError(
            f"--problem {problem}: the function must take no arguments, but its signature is {signature}"
        ) from None


@app.command()
def measure(
    run: Path | None = typer.Argument(None, help="A run folder (or its checkpoint.pt)."),
    problem: str | None = typer.Option(None, help="module:function returning a sgdstab.Problem."),
    top_k: int = typer.Option(5, help="Number of top eigenvalues."),
    num_probes: int = typer.Option(100, help="Hutchinson probes for tr H and ||H||_F."),
    operator: str = typer.Option("hessian", help="hessian or gauss_newton."),
    alignment: str = typer.Option("exact", help="Alignment factor mu: exact, stochastic or none."),
    density: bool = typer.Option(True, help="Spectral density by stochastic Lanczos quadrature."),
    seed: int = typer.Option(0, help="Seed of the random probes."),
    device: str | None = typer.Option(None, help="Device to load a run folder on."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Curvature summary at a point: lambda_max, top-k, tr H, ||H||_F, spectral density, mu."""
    from sgdstab.distributed import is_main_process, shard_if_launched
    from sgdstab.summary import curvature_summary

    with user_errors():
        # Under torchrun (WORLD_SIZE > 1) each rank measures on its shard; rank 0 alone prints.
        loaded = shard_if_launched(load_problem(run, problem, device))
        quiet = as_json or not is_main_process()
        with console.status("measuring", spinner="dots") if not quiet else contextlib.nullcontext():
            summary = curvature_summary(
                loaded,
                top_k=top_k,
                num_probes=num_probes,
                seed=seed,
                density=density,
                operator=operator,
                alignment=None if alignment == "none" else alignment,
            )
    if is_main_process():
        _emit(summary.to_dict(), as_json, f"curvature summary ({operator})")


@app.command()
def stability(
    run: Path | None = typer.Argument(None, help="A run folder (or its checkpoint.pt)."),
    problem: str | None = typer.Option(None, help="module:function returning a sgdstab.Problem."),
    lr: float = typer.Option(..., help="Learning rate eta at which to test stability."),
    batch_size: int = typer.Option(..., help="Batch size B."),
    sampling: str = typer.Option("with_replacement", help="with_replacement or without_replacement."),
    device: str | None = typer.Option(None, help="Device to load a run folder on."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Linear stability of SGD(lr, B) at a minimum, with the threshold of every criterion."""
    from sgdstab.stability import stability as linear_stability

    with user_errors():
        loaded = load_problem(run, problem, device)
        with (
            warnings.catch_warnings(record=True),
            console.status("analysing", spinner="dots") if not as_json else contextlib.nullcontext(),
        ):
            result = linear_stability(loaded, lr=lr, batch_size=batch_size, sampling=sampling)
    data = dataclasses.asdict(result)
    if not as_json:
        data.update({f"threshold {k}": v for k, v in data.pop("thresholds").items()})
        data["warnings"] = "; ".join(data["warnings"]) or "none"
    _emit(
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()},
        as_json,
        f"linear stability of SGD(eta={lr:g}, B={batch_size})",
    )


@app.command()
def report(
    results: Path = typer.Argument(..., help="A suite folder written by `sgdstab reproduce`."),
) -> None:
    """Re-render report.md, report.html and the figures of a suite folder."""
    from sgdstab.report import write_report

    with user_errors():
        paths = write_report(results)
    typer.echo("\n".join(str(p) for p in paths))
