"""Sweeps: independent training runs in run folders, handed to an executor (local processes or SLURM).

A run is a picklable task (``TrainTask``) that trains in its own run folder
``<root>/<experiment>/<label>-<hash of its config>/``. The folder is the source of truth: a
finished run (``final.json`` present) is never started again, and a half-finished one resumes
from the trainer's ``checkpoint.pt``, bit for bit, whoever runs it next. Executors therefore only
decide *where* tasks run:

- ``LocalExecutor(jobs=N)``: a pool of N worker processes on this machine; ``jobs=1`` runs the
  tasks in this process, one after another, in the order given.
- ``SubmititExecutor(cluster="slurm", ...)``: one SLURM job per run, submitted as one job array
  through ``submitit``. A preempted or timed-out job is requeued (``submitit.helpers.Checkpointable``)
  and a job SLURM restarts from scratch (``scontrol requeue``, node failure) finds its run folder
  and resumes. ``cluster="local"`` runs the same code path as submitit subprocesses, without SLURM.

Dependencies are stages: ``executor.run([stage_1, stage_2])`` starts stage 2 once every task of
stage 1 has finished (e.g. E4's settling runs after its GD run).

Workers may be shared: two sweeps started at once on one folder, or a stage that names one run
twice. A task takes its run's lease (``sgdstab.io.lease``) before it trains; a task whose run
another live worker holds returns ``Held`` at once, and its executor polls until that run is
finished (or its holder died: then it runs the task again). So every run is trained once.

``sweep`` is a user's own grid over the arguments of ``sgdstab train``: one run per grid point,
trained and measured at its minimum, then one table (CSV and Parquet) and the E2-style figure of
||H||_F against sqrt(B)/eta with each run's stability bound 1/(eta sqrt(p_B mu)) (Wu, Wang & Su 2022).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import submitit
import torch

from sgdstab.errors import InputError, SgdstabError
from sgdstab.experiments.config import DataConfig, MeasureConfig, ModelConfig, to_dict
from sgdstab.experiments.runs import RunTask, TrainSpec, run_id, spec_config, train_and_measure, try_execute
from sgdstab.io import FINAL_FILE, Held, RunFolder, atomic_write, lease, read_json
from sgdstab.stability import batch_noise_factor, frobenius_bound

# ------------------------------------------------------------------------------------- tasks


class Task(Protocol):
    """What an executor runs: a picklable callable that writes its outcome to ``path/final.json``.

    It returns that record, or ``Held`` when another live worker holds the run's lease.
    """

    @property
    def path(self) -> Path: ...

    def __call__(self) -> dict | Held: ...


class SweepError(SgdstabError, RuntimeError):
    """Some runs of a stage did not finish; their folders keep what they did, so a rerun resumes them."""


def is_finished(task: Task) -> bool:
    return (task.path / FINAL_FILE).exists()


@dataclass(frozen=True)
class TrainTask(RunTask):
    """One training run of ``spec`` in ``<root>/<experiment>/<label>-<config hash>/``.

    ``measure``: the curvature summary to take at the minimum when the run converges (None:
    train only). ``checkpoint_every`` bounds the steps a killed run redoes; it changes no number,
    so it is not part of the run's identity. Being a ``RunTask``, a SLURM job running it is
    requeued on preemption or time-out; the rerun resumes from the folder's checkpoint.
    """

    root: str
    experiment: str
    label: str
    spec: TrainSpec
    measure: MeasureConfig | None = None
    checkpoint_every: int = 200

    @property
    def config(self) -> dict:
        extra = {} if self.measure is None else {"measure": to_dict(self.measure)}
        return spec_config(self.spec, **extra)

    @property
    def path(self) -> Path:
        return RunFolder(self.root, self.experiment, run_id(self.label, self.config)).path

    def __call__(self) -> dict | Held:
        """Train (and measure) in the run folder: the final record, or ``Held`` (see ``Task``)."""

        def work(folder: RunFolder) -> dict:
            return train_and_measure(folder, self.spec, self.measure, checkpoint_every=self.checkpoint_every)

        return try_execute(self.root, self.experiment, self.label, self.config, work)


@dataclass(frozen=True)
class _Pinned(RunTask):
    """``task`` with torch's CPU threads set first: runs on a worker or a SLURM job use exactly ``threads``."""

    task: Task
    threads: int

    def __call__(self) -> dict | Held:
        torch.set_num_threads(self.threads)
        return self.task()


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _results(tasks: Sequence[Task]) -> list[dict]:
    return [read_json(task.path / FINAL_FILE) for task in tasks]


#: What running some tasks gives: each task's outcome (its record or ``Held``) and the reasons of
#: those that failed, by run folder.
Outcomes = tuple[dict[Path, "dict | Held"], dict[Path, str]]


def _run_stage(
    index: int, tasks: Sequence[Task], run_tasks: Callable[[Sequence[Task]], Outcomes], poll_s: float
) -> None:
    """Run a stage's unfinished tasks with ``run_tasks``; those held by other workers, once freed.

    Raises ``SweepError`` naming every run that did not finish.
    """
    # One task per run folder: a stage may name a run twice (E3's base point is in both sweeps).
    pending = list({task.path: task for task in tasks if not is_finished(task)}.values())
    failures: dict[Path, str] = {}
    while pending:
        outcomes, failed = run_tasks(pending)
        failures.update(failed)
        held = [task for task in pending if isinstance(outcomes.get(task.path), Held)]
        pending = _await_leases(held, poll_s)
    _raise_unfinished(index, tasks, failures)


def _await_leases(held: Sequence[Task], poll_s: float) -> list[Task]:
    """Poll until each held run is finished or its lease is free; the free, unfinished ones."""
    waiting, free = list(held), list[Task]()
    while waiting:
        still_held: list[Task] = []
        for task in waiting:
            if is_finished(task):
                continue
            (still_held if lease(task.path).is_held() else free).append(task)
        waiting = still_held
        if waiting:
            time.sleep(poll_s)
    return free


def _raise_unfinished(stage: int, tasks: Sequence[Task], failures: dict[Path, str]) -> None:
    unfinished = [task for task in tasks if not is_finished(task)]
    if not unfinished:
        return
    reasons = "; ".join(f"{task.path.name}: {failures.get(task.path, 'not run')}" for task in unfinished)
    raise SweepError(
        f"{len(unfinished)} of {len(tasks)} runs of stage {stage + 1} did not finish ({reasons}); "
        "their folders keep their progress: run the same sweep again to resume them"
    )


# ------------------------------------------------------------------------------------- executors
class Executor(Protocol):
    def run(self, stages: Sequence[Sequence[Task]]) -> list[list[dict]]:
        """Run every stage's unfinished tasks, stage after stage; the final records, in task order.

        A run that another worker holds is waited for (polled every ``poll_s`` seconds).
        """
        ...


@dataclass(frozen=True)
class LocalExecutor:
    """Runs tasks on this machine: ``jobs`` worker processes (``jobs=1``: in this process, in order).

    Workers (see ``_worker_pool``) use ``threads_per_job`` torch threads each, as does the in-process path, so the numbers do not
    depend on ``jobs``. A worker that dies (killed, out of memory) breaks the pool: the stage
    stops with ``SweepError`` naming the unfinished runs, and a rerun resumes them.
    """

    jobs: int = 1
    threads_per_job: int = 1
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("jobs", "threads_per_job"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        _check_poll(self.poll_s)

    def run(self, stages: Sequence[Sequence[Task]]) -> list[list[dict]]:
        with contextlib.ExitStack() as stack:
            pool = None
            for index, tasks in enumerate(stages):
                if self.jobs == 1:
                    _run_stage(index, tasks, self._run_in_process, self.poll_s)
                else:
                    pool = pool or stack.enter_context(_worker_pool(self.jobs))
                    _run_stage(index, tasks, functools.partial(self._run_in_pool, pool), self.poll_s)
        return [_results(tasks) for tasks in stages]

    def _run_in_process(self, tasks: Sequence[Task]) -> Outcomes:
        outcomes: dict[Path, dict | Held] = {}
        failures = {}
        with _threads(self.threads_per_job):
            for task in tasks:
                try:
                    outcomes[task.path] = task()
                except Exception as err:  # one failed run must not stop the others
                    failures[task.path] = f"{type(err).__name__}: {err}"
        return outcomes, failures

    def _run_in_pool(self, pool: ProcessPoolExecutor, tasks: Sequence[Task]) -> Outcomes:
        outcomes: dict[Path, dict | Held] = {}
        failures: dict[Path, str] = {}
        futures = [(task, pool.submit(_Pinned(task, self.threads_per_job))) for task in tasks]
        for task, future in futures:
            try:
                outcomes[task.path] = future.result()
            except BrokenProcessPool:
                failures[task.path] = "its worker process died (killed or out of memory)"
            except Exception as err:
                failures[task.path] = f"{type(err).__name__}: {err}"
        return outcomes, failures


def _check_poll(poll_s: float) -> None:
    if not (isinstance(poll_s, (int, float)) and math.isfinite(poll_s) and poll_s > 0):
        raise InputError(f"poll_s must be a positive number of seconds, got {poll_s!r}")


def _worker_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` fresh worker processes, forked from a server that has imported sgdstab once.

    Not forked from this process: a fork of a process whose torch has started OpenMP threads can
    deadlock. The fork server has started none, and forking it costs no second ``import torch``.
    Where there is no fork server (Windows), workers are spawned.
    """
    context: multiprocessing.context.BaseContext
    if "forkserver" in multiprocessing.get_all_start_methods():
        forkserver = multiprocessing.get_context("forkserver")
        forkserver.set_forkserver_preload(["sgdstab.sweeps"])
        context = forkserver
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=jobs, mp_context=context)


@dataclass(frozen=True)
class SubmititExecutor:
    """Runs each stage as one job array through ``submitit``: ``cluster="slurm"`` or ``"local"``.

    One job per run, ``cpus_per_run`` cores (and as many torch threads), ``gpus_per_run`` GPUs,
    ``time_min`` minutes, ``mem_gb`` memory (None: the partition's default), at most
    ``array_parallelism`` jobs at once. ``folder`` holds submitit's job files and logs; use a
    fresh one per cluster (SLURM job ids restart at 1 with a new cluster, and submitit would read
    an old job's result). On SLURM's USR2 (submitit asks for it 90 s before the time limit; a
    cluster with ``preempt_send_user_signal`` also sends it at preemption) a job requeues itself
    and its rerun resumes the run: a preempted job every time, a timed-out one up to
    ``max_requeues`` times (submitit takes every USR2 for a time-out when ``time_min <= 10``).
    """

    folder: str
    cluster: str = "slurm"
    partition: str | None = None
    gpus_per_run: int = 0
    cpus_per_run: int = 1
    time_min: int = 60
    mem_gb: float | None = None
    array_parallelism: int = 256
    max_requeues: int = 3
    poll_s: float = 5.0

    def __post_init__(self) -> None:
        if self.cluster not in ("slurm", "local"):
            raise InputError(f"cluster must be 'slurm' or 'local', got {self.cluster!r}")
        _check_poll(self.poll_s)

    def executor(self) -> submitit.AutoExecutor:
        # cluster= always: AutoExecutor picks SLURM whenever srun is on PATH, even with no cluster.
        executor = submitit.AutoExecutor(
            folder=self.folder,
            cluster=self.cluster,
            slurm_max_num_timeout=self.max_requeues,
            local_max_num_timeout=self.max_requeues,
        )
        parameters: dict[str, Any] = {
            "name": "sgdstab",
            "timeout_min": self.time_min,
            "cpus_per_task": self.cpus_per_run,
            "gpus_per_node": self.gpus_per_run,
            "slurm_array_parallelism": self.array_parallelism,
        }
        if self.partition is not None:
            parameters["slurm_partition"] = self.partition
        if self.mem_gb is not None:
            parameters["mem_gb"] = self.mem_gb
        executor.update_parameters(**parameters)
        return executor

    def submit(self, tasks: Sequence[Task]) -> list[submitit.Job]:
        """Submit ``tasks`` as one job array; the jobs, in task order."""
        executor = self.executor()
        with executor.batch():
            jobs = [executor.submit(_Pinned(task, self.cpus_per_run)) for task in tasks]
        return jobs

    def run(self, stages: Sequence[Sequence[Task]]) -> list[list[dict]]:
        for index, tasks in enumerate(stages):
            _run_stage(index, tasks, self._run_jobs, self.poll_s)
        return [_results(tasks) for tasks in stages]

    def _run_jobs(self, tasks: Sequence[Task]) -> Outcomes:
        outcomes: dict[Path, dict | Held] = {}
        failures: dict[Path, str] = {}
        for task, job in zip(tasks, self.submit(tasks), strict=True):
            try:
                outcomes[task.path] = job.result()
            except Exception as err:
                failures[task.path] = f"job {job.job_id} failed: {str(err).strip().splitlines()[-1:]}"
        return outcomes, failures


def make_executor(
    kind: str = "local", jobs: int = 1, folder: str | os.PathLike | None = None, **slurm: Any
) -> Executor:
    """``LocalExecutor(jobs)`` for "local"; ``SubmititExecutor(folder, "slurm", **slurm)`` for "slurm"."""
    if kind == "local":
        if slurm:
            raise InputError(f"{', '.join(slurm)} apply to the slurm executor only")
        return LocalExecutor(jobs=jobs)
    if kind == "slurm":
        if folder is None:
            raise InputError("the slurm executor needs a folder for its job files (on shared storage)")
        return SubmititExecutor(folder=os.fspath(folder), cluster="slurm", **slurm)
    raise InputError(f"unknown executor {kind!r}; choose 'local' or 'slurm'")


# ------------------------------------------------------------------------------------- user sweeps
#: The arguments of ``sgdstab train`` (and their defaults) that a sweep grid may vary.
TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "mlp",
    "model_args": {},
    "dataset": "mnist",
    "n": 500,
    "classes": (0, 1),
    "targets": "pm1",
    "data_dir": None,
    "lr": 0.02,
    "batch_size": 8,
    "sampling": "with_replacement",
    "max_steps": 10_000,
    "loss_goal": 1e-4,
    "seed": 0,
    "device": "cpu",
    "dtype": "float32",
}
SWEEP_FOLDER = "runs"
TABLE_COLUMNS = (
    "run_id",
    "status",
    "steps",
    "final_loss",
    "sqrt_b_over_lr",
    "frobenius",
    "frobenius_stderr",
    "lambda_max",
    "trace",
    "mu",
    "bound",
)


def train_spec(**arguments: Any) -> TrainSpec:
    """The ``TrainSpec`` that ``sgdstab train`` builds from these arguments (missing ones: its defaults).

    As in ``sgdstab train``, ``seed`` draws the data subset, the initial weights and the batches;
    ``batch_size`` None or 0 is full-batch GD.
    """
    unknown = sorted(set(arguments) - set(TRAIN_DEFAULTS))
    if unknown:
        raise InputError(f"unknown train argument(s) {unknown}; choose from {sorted(TRAIN_DEFAULTS)}")
    a = {**TRAIN_DEFAULTS, **arguments}
    classes = tuple(a["classes"]) if a["classes"] is not None else None
    return TrainSpec(
        data=DataConfig(a["dataset"], a["n"], classes, a["targets"], a["data_dir"], a["seed"]),
        model=ModelConfig(a["model"], dict(a["model_args"])),
        lr=float(a["lr"]),
        batch_size=a["batch_size"] or None,
        sampling=a["sampling"],
        max_steps=a["max_steps"],
        loss_goal=a["loss_goal"],
        seed=a["seed"],
        device=a["device"],
        dtype=a["dtype"],
    )


def grid_points(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key varying fastest."""
    for key, values in grid.items():
        if key not in TRAIN_DEFAULTS:
            raise InputError(
                f"grid key {key!r} is not a train argument; choose from {sorted(TRAIN_DEFAULTS)}"
            )
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise InputError(f"grid[{key!r}] must be a non-empty list of values, got {values!r}")
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word: mlp, mnist


def parse_assignments(items: Sequence[str], grid: bool) -> dict[str, Any]:
    """Command-line ``KEY=VALUE`` items as a dict, values parsed as JSON (a bare word stays text).

    ``grid=True``: ``lr=0.01,0.02`` gives ``{"lr": [0.01, 0.02]}``; a value that is one JSON
    list, ``classes=[[0,1],[3,5]]``, gives its items.
    """
    parsed: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key:
            raise InputError(f"expected KEY=VALUE (e.g. lr=0.01,0.02), got {item!r}")
        if not grid:
            parsed[key] = _value(text)
        elif text.startswith("["):
            values = _value(text)
            if not isinstance(values, list):
                raise InputError(f"{item!r}: a list of grid values must be valid JSON")
            parsed[key] = values
        else:
            parsed[key] = [_value(part) for part in text.split(",")]
    return parsed


def sweep_tasks(
    out: str | os.PathLike,
    grid: dict[str, Sequence[Any]],
    measure: MeasureConfig | None = None,
    checkpoint_every: int = 200,
    **fixed: Any,
) -> list[TrainTask]:
    """One ``TrainTask`` per grid point, in ``<out>/runs/``; ``fixed``: the other train arguments."""
    clash = sorted(set(grid) & set(fixed))
    if clash:
        raise InputError(f"{clash} are both in the grid and fixed; give each argument once")
    tasks = []
    for point in grid_points(grid):
        label = "-".join(f"{key}{value}" for key, value in point.items()).replace("/", "_")
        tasks.append(
            TrainTask(
                os.fspath(out),
                SWEEP_FOLDER,
                label,
                train_spec(**fixed, **point),
                measure,
                checkpoint_every,
            )
        )
    return tasks


@dataclass(frozen=True)
class SweepResult:
    rows: list[dict[str, Any]]
    csv: Path
    parquet: Path
    figure: Path
    records: list[dict] = field(repr=False, default_factory=list)


def sweep(
    out: str | os.PathLike,
    grid: dict[str, Sequence[Any]],
    executor: Executor | None = None,
    measure: MeasureConfig | None = None,
    **fixed: Any,
) -> SweepResult:
    """Train one run per point of ``grid`` (e.g. ``{"lr": [0.01, 0.02], "batch_size": [1, 4]}``) and tabulate.

    ``fixed``: the other arguments of ``sgdstab train`` (``TRAIN_DEFAULTS`` names them). Each
    converged run is measured at its minimum (``measure``, default ``MeasureConfig()``). Writes
    ``<out>/sweep.csv``, ``<out>/sweep.parquet`` (one row per point: its grid values, status,
    ||H||_F, lambda_max, tr H, mu and the bound 1/(eta sqrt(p_B mu))) and ``<out>/sweep.png``
    (||H||_F against sqrt(B)/eta, as E2). Rerunning skips finished runs and resumes the others.
    """
    tasks = sweep_tasks(out, grid, measure if measure is not None else MeasureConfig(), **fixed)
    records = (executor or LocalExecutor()).run([tasks])[0]
    points = grid_points(grid)
    rows = [{**point, **measurement_row(record)} for point, record in zip(points, records, strict=True)]
    out = Path(out)
    paths = write_table(rows, out / "sweep.csv", out / "sweep.parquet")
    figure = plot_sweep(rows, out / "sweep.png")
    return SweepResult(rows, *paths, figure, records)


def measurement_row(record: dict) -> dict[str, Any]:
    """The final measurements of one run's record (its ``final.json``), as one flat table row."""
    spec = record["config"]["train"]
    train = record["train"]
    batch_size = spec["batch_size"] or spec["data"]["n"]
    sampling = spec["sampling"] if spec["batch_size"] else "without_replacement"
    noise = batch_noise_factor(spec["data"]["n"], batch_size, sampling)
    row: dict[str, Any] = dict.fromkeys(TABLE_COLUMNS, math.nan)
    row.update(
        run_id=record["run_id"],
        status=train["status"],
        steps=train["steps"],
        final_loss=train["final_loss"],
        sqrt_b_over_lr=1 / (spec["lr"] * math.sqrt(noise)) if noise > 0 else math.inf,
        batch_size=batch_size,
    )
    curvature = record.get("curvature")
    if curvature is not None:
        row.update(
            {key: curvature[key] for key in ("frobenius", "frobenius_stderr", "lambda_max", "trace", "mu")}
        )
        row["bound"] = frobenius_bound(spec["lr"], noise, curvature["mu"])
    return row


def write_table(rows: list[dict[str, Any]], csv_path: Path, parquet_path: Path) -> tuple[Path, Path]:
    """``rows`` as CSV and as Parquet (via pyarrow), each written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(key for row in rows for key in row))
    flat = [{key: _cell(row.get(key)) for key in columns} for row in rows]
    with atomic_write(csv_path) as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    with atomic_write(parquet_path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(flat), f)
    return csv_path, parquet_path


def _cell(value: Any) -> Any:
    """Lists and dicts (e.g. ``model_args``, ``classes``) as text: one scalar per table cell."""
    if isinstance(value, (list, tuple, dict)):
        from sgdstab.io import dumps

        return dumps(value)
    return value


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> Path:
    """The E2 figure for a sweep: ||H||_F of each minimum against sqrt(B)/eta, with its bound."""
    from matplotlib.figure import Figure

    from sgdstab.report import plot_e2, save_figure

    figure = Figure(figsize=(7, 5))
    # plot_e2 takes a row without "frobenius" for a run that did not converge.
    plotted = [
        row if math.isfinite(row["frobenius"]) else {k: v for k, v in row.items() if k != "frobenius"}
        for row in rows
    ]
    plot_e2({"rows": plotted}, figure)
    save_figure(figure, path)
    return path


__all__ = [
    "Executor",
    "Held",
    "LocalExecutor",
    "RunTask",
    "SubmititExecutor",
    "SweepError",
    "SweepResult",
    "Task",
    "TrainTask",
    "make_executor",
    "parse_assignments",
    "sweep",
    "sweep_tasks",
    "train_spec",
]
