"""E5: every stability criterion side by side on the same minima (SPEC.md sections 3-4).

A few minima are found (GD and SGD). At each, for each batch size, ``stability`` gives the
largest stable learning rate by every criterion: exact (Ma & Ying 2021; Mulayoff & Michaeli
2023), Frobenius/alignment (Wu, Wang & Su 2022), GD (2/lambda_max, Cohen et al. 2021), trace
(Wu & Su 2023), Mulayoff & Michaeli's (15), (16), (24), and Wu, Ma & E (2018). Beside them, the
empirical threshold: bisection on eta for the growth of E L~ in linearised SGD
(``simulate_linearized_sgd``). Expected: eta* below every necessary criterion (gd, (15), (16),
(24), Frobenius with mu_min), wme <= eta* for the sufficient one, and the empirical threshold at
eta*. Which criteria are necessary, and the words of the claim, come from the registry
``stability.criteria.STABILITY_CRITERIA``.

Every seed of ``seeds`` finds its own minima (its own initialisation and, for SGD, batches) and
runs its own empirical bisection; each check reports "k/m seeds" and holds on every seed.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sgdstab.experiments.analysis import check, over_seeds, quiet_stability, save_analysis, verdict
from sgdstab.experiments.config import DataConfig, ModelConfig, full_data, preset, quick_data, to_dict
from sgdstab.experiments.runs import (
    FolderTask,
    Progress,
    TrainSpec,
    no_progress,
    recipe_spec,
    run_stage,
    run_training,
    spec_config,
)
from sgdstab.io import RunFolder
from sgdstab.problem import Problem
from sgdstab.stability import STABILITY_CRITERIA, criteria_of_kind, simulate_linearized_sgd

if TYPE_CHECKING:
    from sgdstab.sweeps import Executor

NAME = "E5"
TITLE = "Stability criteria side by side"
NECESSARY = criteria_of_kind("necessary")
SUFFICIENT = criteria_of_kind("sufficient")
CLAIM = (
    "On the same minima, the exact threshold eta* lies below every necessary criterion ("
    + ", ".join(STABILITY_CRITERIA[name].title for name in NECESSARY)
    + "), and the empirical threshold of linearised SGD agrees with eta*."
)


@dataclass(frozen=True)
class Minimum:
    """How one minimum is found: GD when batch_size is None, else SGD."""

    label: str
    lr: float
    batch_size: int | None = None


@dataclass(frozen=True)
class Config:
    data: DataConfig
    model: ModelConfig
    minima: tuple[Minimum, ...]
    batch_sizes: tuple[int, ...]  # the SGD batch sizes whose thresholds are computed at every minimum
    sampling: str = "with_replacement"
    max_steps: int = 10_000
    loss_goal: float = 1e-4
    eval_every: int = 10
    simulation_steps: int = 100
    simulation_chains: int = 400
    bisection_steps: int = 5
    agreement_tol: float = 0.2  # |empirical / exact - 1| that counts as agreement
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "cpu"
    dtype: str = "float32"


def default_config(scale: str) -> Config:
    # n = 250 keeps the nC x nC second-moment analysis of stability() to seconds on a CPU.
    quick = Config(
        data=quick_data(n=250),
        model=ModelConfig("mlp", {"width": 64, "activation": "tanh"}),
        minima=(Minimum("GD", 0.03), Minimum("SGD B4", 0.03, 4)),
        batch_sizes=(1, 8),
    )
    full = Config(
        data=full_data(n=1000),
        model=ModelConfig("vgg", {"depth": 11, "width": 16}),
        # Below GD's edge 2/lambda_max = 0.0013 of VGG-11 at initialisation on 2-class Fashion-MNIST
        # (measured on a CPU, 2026-11-29; a stand-in for CIFAR-10 until a curvature scan there).
        minima=(Minimum("GD", 0.0006), Minimum("SGD B32", 0.0008, 32), Minimum("SGD B8", 0.0006, 8)),
        batch_sizes=(1, 8, 32),
        max_steps=100_000,
        simulation_chains=1000,
        bisection_steps=7,
        device="cuda",
    )
    return preset(scale, quick, full)


def run(
    config: Config,
    root: str | os.PathLike,
    progress: Progress = no_progress,
    executor: Executor | None = None,
) -> dict:
    """Every minimum, with its criteria, as an independent run (on ``executor``; None: here, in order)."""
    records = run_stage(tasks(config, root), executor, progress)
    progress(NAME, len(records), len(records))
    return save_analysis(root, NAME, analyse(records, config))


def tasks(config: Config, root: str | os.PathLike) -> list[FolderTask]:
    """One run per (seed, minimum): train to it, then evaluate every criterion there."""
    settings = {
        k: to_dict(config)[k]
        for k in ("batch_sizes", "simulation_steps", "simulation_chains", "bisection_steps")
    }
    units = []
    for seed, minimum in ((seed, minimum) for seed in config.seeds for minimum in config.minima):
        sgd = minimum.batch_size is not None
        spec = recipe_spec(
            config,
            lr=minimum.lr,
            batch_size=minimum.batch_size,
            sampling=config.sampling,
            max_steps=config.max_steps,
            loss_goal=config.loss_goal,
            eval_every=None if sgd else config.eval_every,
            seed=seed,
        )
        units.append(
            FolderTask(
                os.fspath(root),
                NAME,
                f"{minimum.label.replace(' ', '-')}-s{seed}",
                spec_config(spec, minimum_label=minimum.label, **settings),
                functools.partial(_criteria, spec=spec, config=config),
            )
        )
    return units


def _criteria(folder: RunFolder, spec: TrainSpec, config: Config) -> dict:
    problem, result = run_training(folder.path, spec)
    final = {"train": result.summary()}
    if result.status != "converged":
        return final
    rows = []
    for batch_size in config.batch_sizes:
        linear = quiet_stability(problem, lr=spec.lr, batch_size=batch_size, sampling=config.sampling)
        rows.append(
            {
                "batch_size": batch_size,
                "thresholds": linear.thresholds,
                "mu_min": linear.mu_min,
                "warnings": linear.warnings,
                "lambda_max": linear.lambda_max,
                "hessian_frobenius": linear.hessian_frobenius,
                "trace": linear.trace,
                "empirical": empirical_threshold(problem, batch_size, spec.lr, config, spec.seed),
            }
        )
    return {**final, "criteria": rows}


def empirical_threshold(problem: Problem, batch_size: int, start: float, config: Config, seed: int) -> float:
    """The lr where E L~ of linearised SGD stops decaying (chains drawn with ``seed``).

    Brackets by doubling or halving from ``start``, then bisects in log space (resolution: a
    factor 2^(1/2^bisection_steps)).
    """

    def grows(lr: float) -> bool:
        result = simulate_linearized_sgd(
            problem,
            lr,
            batch_size,
            config.sampling,
            num_steps=config.simulation_steps,
            num_chains=config.simulation_chains,
            seed=seed,
        )
        return not result.growth_factor <= 1  # nan (overflow) counts as growth

    if grows(start):
        low, high = start / 2, start
        while grows(low):
            low, high = low / 2, low
    else:
        low, high = start, 2 * start
        while not grows(high):
            low, high = high, 2 * high
    for _ in range(config.bisection_steps):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if grows(middle) else (middle, high)
    return math.sqrt(low * high)


def analyse(records: list[dict], config: Config) -> dict:
    """Every (seed, minimum, B) case as a row; each check per seed, reported as "k/m seeds"."""
    rows = []
    for record in records:
        for criteria in record.get("criteria", []):
            rows.append(
                {
                    "minimum": record["config"]["minimum_label"],
                    "seed": record["config"]["train"]["seed"],
                    "batch_size": criteria["batch_size"],
                    **criteria["thresholds"],
                    "empirical": criteria["empirical"],
                    "mu_min": criteria["mu_min"],
                    "lambda_max": criteria["lambda_max"],
                    "hessian_frobenius": criteria["hessian_frobenius"],
                }
            )
    unconverged = [
        f"{r['config']['minimum_label']} (seed {r['config']['train']['seed']})"
        for r in records
        if r["train"]["status"] != "converged"
    ]
    if not rows:
        checks = [check("ordering", None, f"no minimum was reached ({', '.join(unconverged)})")]
        return verdict(NAME, TITLE, CLAIM, checks, config, rows=rows)
    per_seed = [seed_verdicts([r for r in rows if r["seed"] == seed], config) for seed in config.seeds]
    claims = (
        f"eta* <= min({', '.join(NECESSARY)}) at every minimum and B",
        f"empirical threshold within {config.agreement_tol:.0%} of eta*",
        " and ".join(STABILITY_CRITERIA[name].title for name in SUFFICIENT)
        + " (sufficient) threshold <= eta*",
    )
    checks = [
        over_seeds(config.seeds, claim, [verdicts[index] for verdicts in per_seed])
        for index, claim in enumerate(claims)
    ]
    return verdict(NAME, TITLE, CLAIM, checks, config, rows=rows, unconverged=unconverged)


def seed_verdicts(rows: list[dict], config: Config) -> list[tuple[bool | None, str]]:
    """One seed's (holds, detail) for the ordering, the empirical agreement and the sufficient criterion."""
    if not rows:
        return [(None, "no minimum was reached")] * 3

    def below_all(row: dict) -> bool:
        # Relative slack for the rounding of two eigen-solvers computing the same number.
        return all(row["exact"] <= row[name] * (1 + 1e-6) for name in NECESSARY)

    ordered = [r for r in rows if below_all(r)]
    tightest = {
        f"{r['minimum']} minimum at B={r['batch_size']}": min(NECESSARY, key=lambda name: r[name])
        for r in rows
    }
    errors = [r["empirical"] / r["exact"] - 1 for r in rows]
    agreeing = sum(abs(e) <= config.agreement_tol for e in errors)
    sufficient = sum(all(r[name] <= r["exact"] * (1 + 1e-6) for name in SUFFICIENT) for r in rows)
    return [
        (
            len(ordered) == len(rows),
            f"{len(ordered)}/{len(rows)} cases; the tightest necessary criterion per case: "
            + "; ".join(f"{case}: {name}" for case, name in tightest.items()),
        ),
        (
            agreeing == len(rows),
            f"{agreeing}/{len(rows)} cases; empirical/exact - 1: " + ", ".join(f"{e:+.1%}" for e in errors),
        ),
        (sufficient == len(rows), f"{sufficient}/{len(rows)} cases"),
    ]
