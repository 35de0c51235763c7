"""``StabilityCallback``: the ``Monitor`` inside a PyTorch Lightning ``Trainer``.

Install with ``pip install sgdstab[lightning]``; ``import sgdstab`` never imports Lightning. The
callback reads eta from the trainer's first optimizer (its first parameter group) and B from the
training dataloader at every measurement, so learning-rate schedules are followed, measures at the
start of training and every ``every`` optimizer steps (``trainer.global_step``), and logs each row
through every logger of the trainer as ``sgdstab/<name>`` (with TensorBoard, the paired charts of
``sgdstab.monitor.PAIRED_CURVES`` appear in the Custom Scalars tab). Under DDP every rank measures
its shard of the measurement set (as the ``Monitor`` does under torchrun), B is the global batch
(the dataloader's batch size times the number of processes), and only global rank 0 logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from sgdstab.errors import InputError
from sgdstab.monitor import (
    DEFAULT_MAX_MEASURE_SAMPLES,
    Monitor,
    Row,
    Sink,
    add_paired_layout,
)

PREFIX = "sgdstab"


class LoggerSink:
    """Rows to every logger of a Lightning trainer, as ``<prefix>/<name>`` at the row's step."""

    def __init__(self, trainer: pl.Trainer, prefix: str = PREFIX):
        self.trainer = trainer
        self.prefix = prefix
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_custom_scalars"):
                add_paired_layout(experiment, prefix)

    def write(self, row: Row) -> None:
        metrics = {f"{self.prefix}/{name}": value for name, value in row.items() if name != "step"}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=int(row["step"]))

    def close(self) -> None:
        for logger in self.trainer.loggers:
            logger.save()


def _dataset_subset(loader: DataLoader, n_measure: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed seeded subset of the training loader's (map-style) dataset, collated into one batch."""
    dataset = loader.dataset
    total = len(dataset)  # type: ignore[arg-type]
    size = min(total, DEFAULT_MAX_MEASURE_SAMPLES) if n_measure is None else min(n_measure, total)
    indices = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:size].sort().values
    collate = loader.collate_fn
    return collate([dataset[int(i)] for i in indices])


def _sampling(loader: DataLoader) -> str:
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler) and sampler.replacement:
        return "with_replacement"
    return "without_replacement"


class StabilityCallback(pl.Callback):
    """Measure lambda_max, ||H||_F, tr H, mu (and eta*) of the LightningModule during ``fit``.

    Args:
        data: the measurement data ((inputs, targets) or a non-shuffling loader); default a fixed
            seeded subset of the training dataloader's dataset (``n_measure`` samples, or all of
            them up to ``DEFAULT_MAX_MEASURE_SAMPLES``).
        loss: the Problem loss the module minimises ("mse": (1/2n) sum ||f - y||^2, or "cross_entropy").
        every: optimizer steps between measurements, or a period per measure (as for ``sgdstab.Monitor``).
        lr_scale: eta on that loss is the optimizer's lr times this (2/C for ``nn.MSELoss()``).
        sampling: "with_replacement" or "without_replacement"; default from the training sampler.
        out: a run folder for ``metrics.jsonl`` as well.
        measures, n_measure, seed, num_probes, sketch_size, tol: as for ``sgdstab.Monitor``.
        sinks: further sinks (callables taking a row, ``TensorBoardSink``...).
    """

    def __init__(
        self,
        data: tuple[Tensor, Tensor] | Iterable | None = None,
        *,
        loss: str = "mse",
        every: int | Mapping[str, int] = 100,
        lr_scale: float = 1.0,
        sampling: str | None = None,
        out: str | Path | None = None,
        measures: Sequence[str] | None = None,
        sinks: Sequence[Sink | Callable[[Row], Any]] = (),
        n_measure: int | None = None,
        seed: int = 0,
        num_probes: int = 10,
        sketch_size: int = 10,
        tol: float = 1e-3,
    ):
        if not (isinstance(lr_scale, (int, float)) and lr_scale > 0):
            raise InputError(f"lr_scale must be a positive number, got {lr_scale!r}")
        self.data = data
        self.lr_scale = float(lr_scale)
        self.sampling = sampling
        self.options: dict[str, Any] = dict(
            loss=loss,
            every=every,
            out=out,
            measures=measures,
            n_measure=n_measure,
            seed=seed,
            num_probes=num_probes,
            sketch_size=sketch_size,
            tol=tol,
        )
        self.extra_sinks = list(sinks)
        self.monitor: Monitor | None = None
        self._last_step = -1

    def _eta_and_batch_size(self, trainer: pl.Trainer) -> tuple[float, int]:
        if not trainer.optimizers:
            raise InputError(
                "the trainer has no optimizer: StabilityCallback reads eta from configure_optimizers()"
            )
        lr = trainer.optimizers[0].param_groups[0]["lr"] * self.lr_scale
        loader = trainer.train_dataloader
        batch_size = getattr(loader, "batch_size", None)
        if batch_size is None:
            raise InputError(
                "the training dataloader has no batch_size: StabilityCallback needs a DataLoader with one"
            )
        # Data-parallel ranks each draw a batch of this size: SGD steps with their union.
        return float(lr), int(batch_size) * trainer.world_size

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise InputError("StabilityCallback needs a single torch DataLoader for training")
        lr, batch_size = self._eta_and_batch_size(trainer)
        data = self.data
        if data is None:
            data = _dataset_subset(loader, self.options["n_measure"], self.options["seed"])
        self.monitor = Monitor(
            pl_module,
            data,
            lr=lr,
            batch_size=batch_size,
            sampling=self.sampling or _sampling(loader),
            sinks=[LoggerSink(trainer), *self.extra_sinks],
            num_samples=len(loader.dataset),  # type: ignore[arg-type]
            **{**self.options, "n_measure": None if self.data is None else self.options["n_measure"]},
        )
        self._last_step = trainer.global_step
        self.monitor.step(trainer.global_step, force=True)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # With gradient accumulation several batches end at one global step: measure it once.
        if self.monitor is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        lr, batch_size = self._eta_and_batch_size(trainer)
        self.monitor.step(trainer.global_step, lr=lr, batch_size=batch_size)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()
