"""Run folders of the recipes: one folder per unit of work, skipped once it has finished.

A suite lives in ``results/<run>/``; each recipe writes ``<run>/<experiment>/<run-id>/`` with
``config.json`` (what was asked, written first), ``metrics.jsonl`` (rows appended as the run goes,
by the trainer), ``checkpoint.pt`` (the trainer's, so a killed training resumes mid-way) and
``final.json`` (the outcome, written last and atomically by ``sgdstab.io``). A run-id is a
readable label plus a hash of the run's whole config (data, model, training settings, every
recipe setting its work uses, and ``sgdstab.io.RESULT_FORMAT_VERSION``), so a changed setting gets
a fresh folder and a resumed suite finds exactly the runs it already finished. Paths stored in a
run (``init_from``, a record's "folder") are relative to the suite root, so a moved suite resumes.

Every training run is described by a ``TrainSpec``; ``load_run`` rebuilds the trained model and
its data from a run folder, which is what ``sgdstab measure`` and ``sgdstab stability`` read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sgdstab.data import DataSet
from sgdstab.errors import DataError, RunFolderError
from sgdstab.experiments.config import DataConfig, MeasureConfig, ModelConfig, to_dict
from sgdstab.io import (
    CONFIG_FILE,
    FINAL_FILE,
    RESULT_FORMAT_VERSION,
    FolderLock,
    RunFolder,
    config_id,
    load_checkpoint,
    read_json,
    remove_temporaries,
    write_json_atomic,
)
from sgdstab.problem import Problem
from sgdstab.stability import check_sgd_arguments
from sgdstab.summary import curvature_summary
from sgdstab.training import CHECKPOINT_FILE, Measure, TrainConfig, TrainResult, check_device, train

#: progress(label, done, total): called as units start and finish, so a front end can draw bars.
Progress = Callable[[str, int, int], None]


def no_progress(label: str, done: int, total: int) -> None:
    """The default progress callback: silent."""


#: Where ``run_training`` reports the trainer's steps, as ``progress("training <run> loss <l>",
#: step, max_steps)``, when its caller passes no ``progress`` of its own; ``reproduce`` sets it
#: to the suite's callback so a front end shows progress inside long runs too.
suite_progress: ContextVar[Progress | None] = ContextVar("suite_progress", default=None)


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


# ------------------------------------------------------------------------------------- training runs
@dataclass(frozen=True, kw_only=True)
class TrainSpec(TrainConfig):
    """One training run: data, model, device and the ``TrainConfig`` of ``sgdstab.training.train``.

    ``batch_size=None`` is full-batch GD. ``seed`` draws the model's initial weights and the
    batches. ``init_from``: a run folder whose trained weights are the starting point instead of
    a fresh initialisation (the escape experiment starts SGD at a minimum found by GD); a relative
    path is relative to the suite root passed to ``build``/``run_training``.
    """

    data: DataConfig
    model: ModelConfig
    device: str = "cpu"
    dtype: str = "float32"
    init_from: str | None = None

    @classmethod
    def from_dict(cls, config: dict) -> TrainSpec:
        return cls(
            **{
                **config,
                "data": DataConfig(**_tuples(config["data"])),
                "model": ModelConfig(**config["model"]),
            }
        )


def _tuples(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


@functools.lru_cache(maxsize=8)
def load_data(data: DataConfig, device: str, dtype: str) -> DataSet:
    """The data set of a config, read once per process (recipes train many models on one data set)."""
    return data.load(device, dtype)


def build(spec: TrainSpec, root: str | os.PathLike | None = None) -> tuple[DataSet, nn.Module]:
    """The data and the initial model of ``spec`` (weights from ``init_from``'s checkpoint if set).

    A relative ``init_from`` is taken relative to ``root`` (the suite folder).
    """
    check_device(spec.device)
    data = load_data(spec.data, spec.device, spec.dtype)
    model = spec.model.build(data, seed=spec.seed, device=spec.device, dtype=spec.dtype)
    if spec.init_from is not None:
        source = Path(spec.init_from)
        if root is not None and not source.is_absolute():
            source = Path(root) / source
        model.load_state_dict(finished_checkpoint(source)["model"])
    return data, model


def finished_checkpoint(folder: Path) -> dict:
    """The checkpoint of a run that ended at a point worth analysing.

    Raises RunFolderError when there is none or the run is unfinished (killed mid-way), and
    DataError when it diverged (its weights are not finite, or far from any minimum).
    """
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise RunFolderError(f"{folder} holds no {CHECKPOINT_FILE}: it is not a finished training run")
    state = load_checkpoint(path)
    if state.get("status") == "diverged":
        raise DataError(
            f"the run in {folder} diverged at step {state.get('step')}: its weights are no point to analyse"
        )
    if state.get("status") is None:
        raise RunFolderError(
            f"the run in {folder} is unfinished (it stopped at step {state.get('step')} without an outcome); "
            "finish it by running the command that made it again"
        )
    return state


def run_training(
    folder: str | os.PathLike,
    spec: TrainSpec,
    measure: Measure | list | None = None,
    progress: Callable[[dict], None] | None = None,
    root: str | os.PathLike | None = None,
    **overrides,
) -> tuple[Problem, TrainResult]:
    """Train ``spec`` with ``folder`` as checkpoint directory (a killed run resumes there).

    ``overrides`` replace ``train`` arguments of this call only, e.g. ``loss_goal=None`` for a
    phase that must run a fixed number of steps. ``root``: the suite folder a relative
    ``init_from`` is relative to. Returns the Problem at the trained parameters.
    """
    data, model = build(spec, root)
    arguments = spec.arguments()
    arguments.update(overrides)
    report = suite_progress.get()
    if progress is None and report is not None:
        name, steps = "/".join(Path(folder).parts[-2:]), arguments["max_steps"]

        def progress(row: dict) -> None:
            report(f"training {name} loss {row['loss']:.3g}", row["step"], steps)

    result = train(
        model,
        data.inputs,
        data.targets,
        measure=measure,
        checkpoint_dir=folder,
        progress=progress,
        **arguments,
    )
    return Problem(model, data.inputs, data.targets), result


def train_run(
    folder: str | os.PathLike, spec: TrainSpec, progress: Callable[[dict], None] | None = None
) -> dict:
    """Train ``spec`` in its own run folder (``sgdstab train``): config.json, checkpoint, metrics, final.json.

    A folder that already holds another run's config is refused rather than overwritten; the
    same config resumes (or returns the finished result). The whole spec is checked before
    ``config.json`` is written, so a refused command leaves nothing behind and its corrected
    version runs. One process at a time writes the folder (``FolderLock``).
    """
    folder = Path(folder)
    config = spec_config(spec)
    # Refuse a bad data set, model, device, target kind or training argument before the folder is claimed.
    data, model = build(spec)
    check_sgd_arguments(len(data), spec.lr, spec.batch_size or len(data), spec.sampling)
    spec.validate()
    Problem(model, data.inputs, data.targets)
    with FolderLock(folder):
        if (folder / CONFIG_FILE).exists() and read_json(folder / CONFIG_FILE) != config:
            raise RunFolderError(f"{folder} already holds a different run; choose another output folder")
        write_json_atomic(folder / CONFIG_FILE, config)
        _, result = run_training(folder, spec, progress=progress)
        final = {"train": result.summary()}
        write_json_atomic(folder / FINAL_FILE, final)
    return final


def spec_config(spec: TrainSpec, **extra) -> dict:
    """The ``config.json`` of a training run: the spec under "train", plus recipe settings."""
    return {"train": to_dict(spec), **extra}


def load_run(path: str | os.PathLike, device: str | None = None) -> tuple[Problem, TrainSpec]:
    """The trained model of a run folder (or its ``checkpoint.pt``) as a Problem on its training data."""
    folder = Path(path)
    if folder.name == CHECKPOINT_FILE:
        folder = folder.parent
    if not (folder / CONFIG_FILE).is_file():
        raise RunFolderError(
            f"{folder} is not a run folder: it has no {CONFIG_FILE} (make one with `sgdstab train`)"
        )
    config = read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict) or "train" not in config:
        raise RunFolderError(f"{folder} is not a training run: its {CONFIG_FILE} has no 'train' section")
    spec = TrainSpec.from_dict(config["train"])
    if device is not None:
        spec = dataclasses.replace(spec, device=device)
    # The run's own checkpoint holds its trained weights: build the model as if starting from there.
    data, model = build(dataclasses.replace(spec, init_from=str(folder.resolve())))
    return Problem(model, data.inputs, data.targets), spec


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
