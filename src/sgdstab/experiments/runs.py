"""Run folders of the recipes: one folder per unit of work, skipped once it has finished.

A suite lives in ``results/<run>/``; each recipe writes ``<run>/<experiment>/<run-id>/`` with
``config.json`` (what was asked, written first), ``metrics.jsonl`` (rows appended as the run goes,
by the trainer), ``checkpoint.pt`` (the trainer's, so a killed training resumes mid-way) and
``final.json`` (the outcome, written last and atomically by ``sgdstab.io``). A run-id is a
readable label plus a hash of the run's whole config (data, model, training settings, every
recipe setting its work uses, and ``sgdstab.io.RESULT_FORMAT_VERSION``), so a changed setting gets
a fresh folder and a resumed suite finds exactly the runs it already finished. Paths stored in a
run (``init_from``, a record's "folder") are relative to the suite root, so a moved suite resumes.

Every training run is described by a ``sgdstab.run_spec.TrainSpec`` (re-exported here with the
rest of that module's training-run helpers, for the recipes).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from sgdstab.experiments.config import MeasureConfig
from sgdstab.io import RESULT_FORMAT_VERSION, RunFolder, config_id, remove_temporaries

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


def no_progress(label: str, done: int, total: int) -> None:
    """The default progress callback: silent."""


def run_id(label: str, config: dict) -> str:
    """``<label>-<8 hex digits of the config hash>``: readable, and unique per config and result format."""
    return f"{label}-{config_id({'config': config, 'format': RESULT_FORMAT_VERSION}, length=8)}"


def execute(
    root: str | os.PathLike, experiment: str, label: str, config: dict, work: Callable[[RunFolder], dict]
) -> dict:
    """Run ``work(folder)`` unless the folder's ``final.json`` exists; return the final record.

    ``work`` may append metrics to the folder and use it as a checkpoint directory; what it
    returns becomes ``final.json`` (with the run-id, label and config beside it), so a killed
    suite re-runs only the units that had not finished. The caller holds the suite's lock
    (``sgdstab.io.FolderLock``): temporaries of a killed write are removed before the work resumes.
    """
    folder = RunFolder(root, experiment, run_id(label, config))
    finished = folder.read_final()
    if finished is not None:
        return finished
    remove_temporaries(folder.path)
    folder.write_config(config)
    final = {"run_id": folder.path.name, "label": label, "config": config, **work(folder)}
    folder.write_final(final)
    return final


def train_and_measure(folder: RunFolder, spec: TrainSpec, measure: MeasureConfig) -> dict:
    """Train ``spec``; at a converged run, summarise the curvature and alignment of the minimum.

    Runs that diverged or ran out of steps are recorded without measurements: the analysis
    of SPEC.md sections 2-3 is about minima.
    """
    problem, result = run_training(folder.path, spec)
    final = {"train": result.summary()}
    if result.status == "converged":
        final["curvature"] = curvature_summary(problem, **measure.kwargs()).to_dict()
    return final
