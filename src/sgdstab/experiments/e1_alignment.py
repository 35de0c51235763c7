"""E1: the alignment factor mu along SGD training, per model family (Wu, Wang & Su 2022; SPEC.md section 4).

mu(theta) = tr(Sigma G) / (2 L ||G||_F^2) (SPEC.md section 2) is measured on a schedule through
the trainer's ``measure`` hook while SGD trains each family (linear, random features, fully
connected, CNN) with square loss. The claim: mu stays of order 1, bounded away from 0, along the
whole of training, for every family. "Bounded away from 0" is tested as min mu >= ``mu_floor``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sgdstab.alignment import alignment
from sgdstab.errors import InputError
from sgdstab.experiments.analysis import check, overall, save_analysis
from sgdstab.experiments.config import DataConfig, ModelConfig, full_data, preset, quick_data, to_dict
from sgdstab.experiments.runs import (
    FolderTask,
    Progress,
    TrainSpec,
    no_progress,
    run_stage,
    run_training,
    spec_config,
)
from sgdstab.io import RunFolder
from sgdstab.problem import Problem

if TYPE_CHECKING:
    from sgdstab.sweeps import Executor

NAME = "E1"
TITLE = "Alignment factor along training"
CLAIM = "mu(theta_t) stays of order 1 (bounded away from 0) along SGD training of every model family."


@dataclass(frozen=True)
class Config:
    data: DataConfig
    families: tuple[ModelConfig, ...]
    lrs: tuple[float, ...]  # one per family: each family has its own curvature scale
    batch_size: int = 16
    sampling: str = "with_replacement"
    max_steps: int = 1500
    loss_goal: float = 1e-5
    measure_every: int = 150
    alignment: str = "exact"
    num_probes: int = 50  # for alignment="stochastic"
    mu_floor: float = 0.1
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"


def default_config(scale: str) -> Config:
    # Learning rates about half of 2/lambda_max(H) at initialisation on these data (measured).
    quick = Config(
        data=quick_data(),
        families=(
            ModelConfig("linear", label="linear"),
            ModelConfig("random_features", {"num_features": 512}, label="random features"),
            ModelConfig("mlp", {"width": 64, "activation": "tanh"}, label="fully connected"),
            ModelConfig("vgg", {"depth": [1, 1], "width": 8}, label="CNN (VGG-style)"),
        ),
        lrs=(0.003, 0.006, 0.02, 0.01),
    )
    full = Config(
        data=full_data(),
        families=(
            ModelConfig("linear", label="linear"),
            ModelConfig("random_features", {"num_features": 4096}, label="random features"),
            ModelConfig("mlp", {"width": 512, "depth": 3, "activation": "tanh"}, label="fully connected"),
            ModelConfig("vgg", {"depth": 11, "width": 16}, label="VGG-11"),
            ModelConfig("resnet", {"depth": 20, "width": 16}, label="ResNet-20"),
        ),
        lrs=(0.001, 0.002, 0.01, 0.02, 0.02),
        batch_size=64,
        max_steps=20_000,
        measure_every=1000,
        alignment="stochastic",
        device="cuda",
    )
    return preset(scale, quick, full)


def run(
    config: Config,
    root: str | os.PathLike,
    progress: Progress = no_progress,
    executor: Executor | None = None,
) -> dict:
    """Train every family (one independent run each, on ``executor``; None: here, in order) and analyse."""
    records = run_stage(tasks(config, root), executor, progress)
    progress(NAME, len(records), len(records))
    return save_analysis(root, NAME, analyse(records, config))


def tasks(config: Config, root: str | os.PathLike) -> list[FolderTask]:
    """One run per family: SGD with mu measured along the way."""
    if len(config.lrs) != len(config.families):
        raise InputError(
            f"E1 needs one learning rate per family: {len(config.families)} families, {len(config.lrs)} lrs"
        )
    units = []
    for family, lr in zip(config.families, config.lrs, strict=True):
        spec = TrainSpec(
            data=config.data,
            model=family,
            lr=lr,
            batch_size=config.batch_size,
            sampling=config.sampling,
            max_steps=config.max_steps,
            loss_goal=config.loss_goal,
            measure_every=config.measure_every,
            seed=config.seed,
            device=config.device,
            dtype=config.dtype,
        )
        # The alignment settings change the recorded mu curve: they belong to the run's identity.
        run_config = spec_config(
            spec, family_label=family.title, alignment=config.alignment, num_probes=config.num_probes
        )
        work = functools.partial(_train_measuring_mu, spec=spec, config=config)
        units.append(FolderTask(os.fspath(root), NAME, family.name, run_config, work))
    return units


def _alignment(problem: Problem, config: Config) -> dict[str, float]:
    result = alignment(
        problem, method=config.alignment, num_probes=config.num_probes, seed=config.seed, hessian=False
    )
    return {"mu": result.mu, "mu_stderr": result.stderr}


def _train_measuring_mu(folder: RunFolder, spec: TrainSpec, config: Config) -> dict:
    _, result = run_training(folder.path, spec, measure=functools.partial(_alignment, config=config))
    rows = [row for row in (*result.history, result.final) if "mu" in row]
    # The final row repeats the last history row when the run stopped on a measurement step.
    unique = list({row["step"]: row for row in rows}.values())
    return {
        "train": result.summary(),
        "mu_curve": [{k: row[k] for k in ("step", "loss", "mu", "mu_stderr")} for row in unique],
    }


def analyse(records: list[dict], config: Config) -> dict:
    rows = []
    for record in records:
        curve = [
            point for point in record["mu_curve"] if point["mu"] == point["mu"]
        ]  # drop nan (zero residual)
        mus = [point["mu"] for point in curve]
        rows.append(
            {
                "family": record["config"]["family_label"],
                "model": record["config"]["train"]["model"]["name"],
                "lr": record["config"]["train"]["lr"],
                "status": record["train"]["status"],
                "final_loss": record["train"]["final_loss"],
                "mu_initial": mus[0] if mus else None,
                "mu_final": mus[-1] if mus else None,
                "mu_min": min(mus) if mus else None,
                "mu_max": max(mus) if mus else None,
                "curve": record["mu_curve"],
            }
        )
    measured = [r for r in rows if r["mu_min"] is not None]
    if measured:
        lowest = min(measured, key=lambda r: r["mu_min"])
        per_family = "; ".join(f"{r['family']}: {r['mu_min']:.3g}" for r in measured)
        checks = [
            check(
                f"min mu along training >= {config.mu_floor:g} for every family",
                lowest["mu_min"] >= config.mu_floor,
                f"min mu per family: {per_family}",
            )
        ]
    else:
        checks = [
            check(
                f"min mu along training >= {config.mu_floor:g} for every family", None, "no mu was measured"
            )
        ]
    return {
        "experiment": NAME,
        "title": TITLE,
        "claim": CLAIM,
        "holds": overall(checks),
        "checks": checks,
        "config": to_dict(config),
        "rows": rows,
    }
