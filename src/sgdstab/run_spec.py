"""A training run as data, and its folder: what ``sgdstab train``, ``measure`` and ``stability`` use.

``DataConfig`` and ``ModelConfig`` name a data set and a model family with their arguments;
``TrainSpec`` adds a ``sgdstab.training.TrainConfig`` and the device. ``train_run`` trains a spec
into a run folder (``config.json``, ``checkpoint.pt``, ``metrics.jsonl``, ``final.json``, one
writer at a time); ``load_run`` rebuilds the trained model of such a folder as a ``Problem``,
refusing a run that diverged or did not finish. The recipes of ``sgdstab.experiments`` build on
these; the plain commands need nothing from there.

Layer: with ``training``, ``data`` and ``models`` (it imports those, ``problem``, ``stability``'s
argument checks and ``io``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sgdstab._checks import check_sgd_arguments
from sgdstab.data import DataSet, load_dataset
from sgdstab.errors import DataError, RunFolderError
from sgdstab.io import CONFIG_FILE, FINAL_FILE, FolderLock, load_checkpoint, read_json, write_json_atomic
from sgdstab.models import build_model
from sgdstab.problem import Problem
from sgdstab.training import CHECKPOINT_FILE, Measure, TrainConfig, TrainResult, check_device, train

DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: progress(label, done, total): called as units start and finish, so a front end can draw bars.
Progress = Callable[[str, int, int], None]

#: Where ``run_training`` reports the trainer's steps, as ``progress("training <run> loss <l>",
#: step, max_steps)``, when its caller passes no ``progress`` of its own; ``reproduce`` sets it
#: to the suite's callback so a front end shows progress inside long runs too.
suite_progress: ContextVar[Progress | None] = ContextVar("suite_progress", default=None)


@dataclass(frozen=True)
class DataConfig:
    """Arguments of ``sgdstab.data.load_dataset``; ``data_dir`` None means the data set's default."""

    name: str = "mnist"
    n: int = 1000
    classes: tuple[int, ...] | None = (0, 1)
    targets: str = "pm1"
    data_dir: str | None = None
    seed: int = 0
    normalize: bool | str = True  # True: the data set's default; a mode of sgdstab.data.NORMALIZATIONS

    def load(self, device: str = "cpu", dtype: str = "float32") -> DataSet:
        data = load_dataset(
            self.name,
            n=self.n,
            classes=self.classes,
            targets=self.targets,
            data_dir=self.data_dir,
            seed=self.seed,
            dtype=DTYPES[dtype],
            normalize=self.normalize,
        )
        return dataclasses.replace(data, inputs=data.inputs.to(device), targets=data.targets.to(device))


@dataclass(frozen=True)
class ModelConfig:
    """``build_model(name, **kwargs)``; input shape and number of outputs come from the data."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def build(self, data: DataSet, seed: int = 0, device: str = "cpu", dtype: str = "float32") -> nn.Module:
        model = build_model(
            self.name, input_shape=data.input_shape, num_outputs=data.num_outputs, seed=seed, **self.kwargs
        )
        return model.to(device=device, dtype=DTYPES[dtype])

    @property
    def title(self) -> str:
        return self.label or self.name


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
    # Through JSON: tuples become lists, as they read back from config.json.
    return {"train": json.loads(json.dumps(dataclasses.asdict(spec))), **extra}


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
