"""Run folders of the recipes: one folder per unit of work, skipped once it has finished.

A suite lives in ``results/<run>/``; each recipe writes ``<run>/<experiment>/<run-id>/`` with
``config.json`` (what was asked, written first), ``metrics.jsonl`` (rows appended as the run goes,
by the trainer), ``checkpoint.pt`` (the trainer's, so a killed training resumes mid-way) and
``final.json`` (the outcome, written last and atomically by ``sgdstab.io``). A run-id is a
readable label plus a hash of the run's whole config (data, model, training settings, every
recipe setting its work uses, and ``sgdstab.io.RESULT_FORMAT_VERSION``), so a changed setting gets
a fresh folder and a resumed suite finds exactly the runs it already finished. Paths stored in a
run (``init_from``, a record's "folder") are relative to the suite root, so a moved suite resumes.

Many workers may share a suite (processes of a pool, SLURM jobs, two sweeps started at once): a
worker takes a run's lease (``.lock``, renewed by a heartbeat) before it works on the run, so a
run is never trained by two workers at once, and a dead worker's lease is taken over.

Every training run is described by a ``sgdstab.run_spec.TrainSpec`` (re-exported here with the
rest of that module's training-run helpers, for the recipes).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from sgdstab.experiments.config import MeasureConfig
from sgdstab.io import (
    FINAL_FILE,
    RESULT_FORMAT_VERSION,
    Held,
    RunFolder,
    append_jsonl,
    config_id,
    lease,
    read_json,
    release_held_locks,
    remove_temporaries,
)

# The training-run layer, re-exported for the recipes (its home is sgdstab.run_spec).
from sgdstab.run_spec import Progress as Progress
from sgdstab.run_spec import TrainSpec as TrainSpec
from sgdstab.run_spec import build as build
from sgdstab.run_spec import finished_checkpoint as finished_checkpoint
from sgdstab.run_spec import load_run as load_run
from sgdstab.run_spec import run_training as run_training
from sgdstab.run_spec import spec_config as spec_config
from sgdstab.run_spec import suite_progress as suite_progress
from sgdstab.run_spec import train_run as train_run
from sgdstab.summary import curvature_summary

if TYPE_CHECKING:
    from sgdstab.sweeps import Executor


def no_progress(label: str, done: int, total: int) -> None:
    """The default progress callback: silent."""


def run_id(label: str, config: dict) -> str:
    """``<label>-<8 hex digits of the config hash>``: readable, and unique per config and result format."""
    return f"{label}-{config_id({'config': config, 'format': RESULT_FORMAT_VERSION}, length=8)}"


#: One line per time a worker starts (or resumes) a run's work: host, pid, time.
ATTEMPTS_FILE = "attempts.jsonl"


def try_execute(
    root: str | os.PathLike, experiment: str, label: str, config: dict, work: Callable[[RunFolder], dict]
) -> dict | Held:
    """Run ``work(folder)`` unless the run is finished or another live worker holds it.

    Returns the final record (the stored one when ``final.json`` exists) or ``Held``. The worker
    holds the folder's lease (with a heartbeat) from before it re-checks ``final.json`` until
    ``final.json`` is written, so two workers, processes or SLURM jobs never train one run at
    once; a lease whose holder died (SIGKILL, node failure) is taken over, and the run resumes
    from its checkpoint. ``work`` may append metrics to the folder and use it as a checkpoint
    directory; what it returns becomes ``final.json`` (with the run-id, label and config beside
    it). Each start of ``work`` appends a line to ``attempts.jsonl``.
    """
    folder = RunFolder(root, experiment, run_id(label, config))
    finished = folder.read_final()
    if finished is not None:
        return finished
    run_lease = lease(folder.path)
    if not run_lease.try_acquire():
        return Held(folder.path, run_lease.holder())
    try:
        # Another worker may have finished it between our first look and the lease.
        finished = folder.read_final()
        if finished is not None:
            return finished
        # Temporaries of a killed write (the lease makes this worker the folder's only writer).
        remove_temporaries(folder.path)
        folder.write_config(config)
        append_jsonl(
            folder.path / ATTEMPTS_FILE,
            {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()},
        )
        final = {"run_id": folder.path.name, "label": label, "config": config, **work(folder)}
        folder.write_final(final)
        return final
    finally:
        run_lease.release()


def execute(
    root: str | os.PathLike,
    experiment: str,
    label: str,
    config: dict,
    work: Callable[[RunFolder], dict],
    poll_s: float = 1.0,
) -> dict:
    """``try_execute``, waiting while another worker holds the run: its record, or ours once it is free."""
    while True:
        outcome = try_execute(root, experiment, label, config, work)
        if not isinstance(outcome, Held):
            return outcome
        time.sleep(poll_s)


def train_and_measure(
    folder: RunFolder, spec: TrainSpec, measure: MeasureConfig | None, **overrides: Any
) -> dict:
    """Train ``spec``; at a converged run, summarise the curvature and alignment of the minimum.

    Runs that diverged or ran out of steps are recorded without measurements: the analysis
    of SPEC.md sections 2-3 is about minima. ``measure`` None: train only. ``overrides``: train
    arguments that change no number, e.g. ``checkpoint_every`` (see ``run_training``).
    """
    # A relative ``init_from`` names a folder of the suite, wherever the suite lies now.
    problem, result = run_training(folder.path, spec, root=folder.root, **overrides)
    final = {"train": result.summary()}
    if measure is not None and result.status == "converged":
        final["curvature"] = curvature_summary(problem, **measure.kwargs()).to_dict()
    return final


# ------------------------------------------------------------------------------------- tasks
class RunTask(submitit.helpers.Checkpointable):
    """A task that SLURM may requeue (preemption, time-out): it first gives up its run's lease.

    submitit calls ``checkpoint`` in the job before it requeues it; releasing the lease there
    lets the rerun, on any node, take the run at once rather than after the lease expires.
    """

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        release_held_locks()
        return super().checkpoint(*args, **kwargs)


@dataclass(frozen=True)
class FolderTask(RunTask):
    """One unit of a recipe as a task for an executor: ``try_execute`` of ``work`` in its run folder.

    ``work`` must pickle (a module-level function, or a ``functools.partial`` of one, with
    picklable arguments): worker processes and SLURM jobs receive it pickled.
    """

    root: str
    experiment: str
    label: str
    config: dict
    work: Callable[[RunFolder], dict]

    @property
    def path(self) -> Path:
        return RunFolder(self.root, self.experiment, run_id(self.label, self.config)).path

    def __call__(self) -> dict | Held:
        return try_execute(self.root, self.experiment, self.label, self.config, self.work)


def recipe_spec(config: Any, *, seed: int, **fields: Any) -> TrainSpec:
    """A TrainSpec on the data, model, device and dtype a recipe config has, for one of its ``seeds``;
    ``fields`` set the rest (the learning rate, batch size, step caps) and may override those.
    """
    shared = {
        name: getattr(config, name) for name in ("data", "model", "device", "dtype") if hasattr(config, name)
    }
    return TrainSpec(**{**shared, **fields, "seed": seed})


def run_stage(
    tasks: Sequence[FolderTask], executor: Executor | None = None, progress: Progress = no_progress
) -> list[dict]:
    """The final records of ``tasks``, independent runs of one recipe stage, in task order.

    ``executor`` None: each in this process, in order, reporting ``progress`` per task (waiting
    for any run another worker holds); otherwise ``executor.run`` (a pool of workers, SLURM).
    Either way the records are read back from ``final.json``, as a resumed suite reads them, so
    an analysis never depends on who ran its runs.
    """
    if executor is None:
        for index, task in enumerate(tasks):
            progress(f"{task.experiment} {task.label}", index, len(tasks))
            execute(task.root, task.experiment, task.label, task.config, task.work)
    else:
        if tasks:
            progress(f"{tasks[0].experiment} {len(tasks)} runs on {type(executor).__name__}", 0, len(tasks))
        executor.run([tasks])
    return [read_json(task.path / FINAL_FILE) for task in tasks]
