"""E2: the Frobenius bound over a grid of (eta, B) (Wu, Wang & Su 2022; SPEC.md section 4).

One SGD run per (eta, B), trained to a loss goal, from the same initialisation or (``start_lr``
set) from one common sharp minimum found by GD at that small lr, so that the bound binds: where
it lies below the start's ||H||_F, SGD must leave and settle near it (SPEC.md 4.1, E2). At each
minimum reached, ||H||_F is compared with the stability bound

    ||H||_F <= 1 / (eta sqrt(p_B mu))   (= sqrt(B/mu)/eta with replacement),

mu the alignment factor at the minimum (SPEC.md sections 2-3). The claim: every minimum SGD
converges to lies below its bound, and ||H||_F grows with sqrt(B)/eta (SGD sits near its
stability edge). Diverged runs are kept and marked: they are SGD refusing a too-large eta.
From a common start, three more checks: the runs whose bound (with the start's mu) lies below the
start settle with ||H||_F / bound in ``ratio_band``; over them the log-log slope of ||H||_F
against sqrt(B)/eta lies in ``slope_band`` (least squares, with a 2-standard-error interval); the
runs whose bound lies above ``stay_margin`` x the start stay within ``stay_tolerance`` of its ||H||_F.

Every seed of ``seeds`` is a whole replicate (initialisation, common start, grid): each check
reports "k/m seeds" and holds when it holds on every seed, except the slope, which is fitted
once over the binding runs of all seeds (one seed's 5 runs over a 2x range of sqrt(B)/eta give
an interval of about +-0.45, as wide as the band itself; docs/reproduction-notes.md).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scipy.stats import linregress, spearmanr

from sgdstab.errors import InputError
from sgdstab.experiments.analysis import check, over_seeds, save_analysis, verdict
from sgdstab.experiments.config import (
    DataConfig,
    MeasureConfig,
    ModelConfig,
    full_data,
    preset,
    quick_data,
    to_dict,
)
from sgdstab.experiments.runs import (
    FolderTask,
    Progress,
    TrainSpec,
    no_progress,
    recipe_spec,
    run_stage,
    spec_config,
    train_and_measure,
)
from sgdstab.io import RunFolder
from sgdstab.stability import batch_noise_factor, frobenius_bound

if TYPE_CHECKING:
    from sgdstab.sweeps import Executor

NAME = "E2"
TITLE = "Frobenius bound over a grid of (eta, B)"
CLAIM = (
    "The minima SGD converges to satisfy ||H||_F <= sqrt(B/mu)/eta, and ||H||_F grows with sqrt(B)/eta "
    "(SGD sits near its stability edge)."
)


@dataclass(frozen=True)
class Config:
    data: DataConfig
    model: ModelConfig
    lrs: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    sampling: str = "with_replacement"
    max_steps: int = 10_000
    loss_goal: float = 2e-4
    measure: MeasureConfig = field(default_factory=lambda: MeasureConfig(density=True))
    seeds: tuple[int, ...] = (0, 1, 2)  # each seed: its own initialisation, common start and grid
    device: str = "cpu"
    dtype: str = "float32"
    start_lr: float | None = None  # GD lr of the common sharp start; None: every run from the initialisation
    start_max_steps: int = 30_000
    start_loss_goal: float = 2e-5
    start_eval_every: int = 10
    # From the start, a run cannot count as converged before this linear warm-up is over: the start
    # already meets the loss goal, and the ramp lets SGD leave a too-sharp start gently.
    start_warmup_steps: int = 1000
    ratio_band: tuple[float, float] = (0.5, 1.0)
    slope_band: tuple[float, float] = (0.7, 1.3)
    stay_tolerance: float = 0.2
    # The bound is necessary for linear stability, not sufficient: a start just under its bound can
    # still be unstable and leave (pilot: bounds 1.17 x the start's ||H||_F left to 0.74-0.92 of it),
    # so only runs whose bound exceeds the start's ||H||_F by this factor are held to staying.
    stay_margin: float = 1.5


def default_config(scale: str) -> Config:
    # From GD's minimum at lr 0.02 (||H||_F ~ 61-64, mu ~ 0.95 on seeds 0-1), the bounds of eta 0.04
    # and 0.08 and of (0.02, B = 1) lie below the start, those of (0.02, B >= 4) 1.6-2.4 x above it;
    # (0.04, 1), (0.08, 1) and (0.08, 2) diverge (from a start, SGD diverges once the bound is under ~0.4 x its ||H||_F).
    # Pilot: docs/reproduction-notes.md (E2 sections).
    quick = Config(
        data=quick_data(n=250),
        model=ModelConfig("mlp", {"width": 128, "activation": "tanh"}),
        lrs=(0.02, 0.04, 0.08),
        batch_sizes=(1, 2, 4, 8),
        max_steps=20_000,
        start_lr=0.02,
        start_warmup_steps=4000,
    )
    full = Config(
        data=full_data(),
        model=ModelConfig("vgg", {"depth": 11, "width": 16}),
        lrs=(0.01, 0.02, 0.05, 0.1),
        batch_sizes=(8, 32, 128, 512),
        max_steps=100_000,
        device="cuda",
    )
    return preset(scale, quick, full)


def run(
    config: Config,
    root: str | os.PathLike,
    progress: Progress = no_progress,
    executor: Executor | None = None,
) -> dict:
    """GD to each seed's common start, then every seed's grid (independent runs, on ``executor``;
    None: here, in order); analyse.

    Each stage holds the runs of all seeds, so a pool of workers trains seeds side by side; a
    seed whose start did not converge gets no grid (its checks are undecided).
    """
    starts: dict[int, dict] | None = None
    if config.start_lr is not None:
        records = run_stage(
            [common_start_task(config, root, seed) for seed in config.seeds], executor, progress
        )
        starts = dict(zip(config.seeds, records, strict=True))
    grid = [
        task
        for seed in config.seeds
        if starts is None or starts[seed]["train"]["status"] == "converged"
        for task in grid_tasks(config, root, seed)
    ]
    records = run_stage(grid, executor, progress)
    progress(NAME, len(records), len(records))
    return save_analysis(root, NAME, analyse(records, config, starts))


def common_start_task(config: Config, root: str | os.PathLike, seed: int) -> FolderTask:
    """GD to the common sharp start of every grid run of ``seed`` (needs ``start_lr``)."""
    if config.start_lr is None:
        raise InputError("E2 has no common start: set E2.start_lr to GD's learning rate for it")
    start_spec = recipe_spec(
        config,
        lr=config.start_lr,
        batch_size=None,
        max_steps=config.start_max_steps,
        loss_goal=config.start_loss_goal,
        eval_every=config.start_eval_every,
        seed=seed,
    )
    work = functools.partial(train_and_measure, spec=start_spec, measure=config.measure)
    run_config = spec_config(start_spec, measure=to_dict(config.measure))
    return FolderTask(os.fspath(root), NAME, f"gd-start-s{seed}", run_config, work)


def grid_tasks(config: Config, root: str | os.PathLike, seed: int) -> list[FolderTask]:
    """One run per (eta, B) of the grid for ``seed``, from its common start when there is one.

    The start is named relative to the suite root (``E2/<run-id>``), so a moved suite resumes
    and the run ids do not depend on where the suite lies.
    """
    start_folder = None
    if config.start_lr is not None:
        start_folder = f"{NAME}/{common_start_task(config, root, seed).path.name}"
    grid = [(lr, b) for b in config.batch_sizes for lr in config.lrs]
    warmup_steps = 0 if start_folder is None else config.start_warmup_steps
    units = []
    for lr, batch_size in grid:
        spec = recipe_spec(
            config,
            lr=lr,
            batch_size=batch_size,
            sampling=config.sampling,
            max_steps=config.max_steps,
            loss_goal=config.loss_goal,
            init_from=start_folder,
            seed=seed,
        )
        # The warm-up is a run setting (in the run-id hash) only where it applies.
        extra = {} if start_folder is None else {"warmup_steps": warmup_steps}
        run_config = spec_config(spec, measure=to_dict(config.measure), **extra)
        units.append(
            FolderTask(
                os.fspath(root),
                NAME,
                f"lr{lr:g}-B{batch_size}-s{seed}",
                run_config,
                _work(spec, config.measure, warmup_steps),
            )
        )
    return units


def _work(spec: TrainSpec, measure: MeasureConfig, warmup_steps: int) -> Callable[[RunFolder], dict]:
    """``train_and_measure`` (picklable), with the warm-up of a run from the common start (see Config)."""
    if not warmup_steps:
        return functools.partial(train_and_measure, spec=spec, measure=measure)
    return functools.partial(train_and_measure, spec=spec, measure=measure, warmup_steps=warmup_steps)


def _row(record: dict, start_curvature: dict | None) -> dict:
    """One run's table row: its grid point and seed, outcome, curvature and bound."""
    spec = record["config"]["train"]
    lr, batch_size = spec["lr"], spec["batch_size"]
    noise = batch_noise_factor(spec["data"]["n"], batch_size, spec["sampling"])
    row = {
        "run_id": record["run_id"],
        "seed": spec["seed"],
        "lr": lr,
        "batch_size": batch_size,
        "status": record["train"]["status"],
        "steps": record["train"]["steps"],
        "loss": record["train"]["final_loss"],
        "sqrt_b_over_lr": math.sqrt(1 / noise) / lr if noise > 0 else math.inf,
    }
    curvature = record.get("curvature")
    if curvature is not None:
        row.update(
            frobenius=curvature["frobenius"],
            frobenius_stderr=curvature["frobenius_stderr"],
            lambda_max=curvature["lambda_max"],
            top_eigenvalues=curvature["top_eigenvalues"],
            trace=curvature["trace"],
            trace_stderr=curvature["trace_stderr"],
            mu=curvature["mu"],
            mu_min=curvature["mu_min"],
            bound=frobenius_bound(lr, noise, curvature["mu"]),
            density_grid=curvature["density_grid"],
            density=curvature["density"],
        )
        row["ratio"] = row["frobenius"] / row["bound"]
    if start_curvature is not None:
        # Binding or not is decided before the run, by the bound with the start's own mu.
        row["start_bound"] = frobenius_bound(lr, noise, start_curvature["mu"])
        row["binding"] = row["start_bound"] < start_curvature["frobenius"]
    return row


BOUND_CLAIM = "||H||_F <= sqrt(B/mu)/eta at every converged run"
TREND_CLAIM = "||H||_F grows with sqrt(B)/eta"


def analyse(records: list[dict], config: Config, starts: dict[int, dict] | None = None) -> dict:
    """Every seed's checks, each as "k/m seeds", and the slope pooled over the seeds' binding runs.

    ``starts``: each seed's common-start record (None: the runs started from the initialisation).
    """
    seeds = config.seeds
    start_curvatures = {seed: None if starts is None else starts[seed].get("curvature") for seed in seeds}
    rows = [_row(record, start_curvatures[record["config"]["train"]["seed"]]) for record in records]
    by_seed = {seed: [r for r in rows if r["seed"] == seed] for seed in seeds}
    checks = [
        over_seeds(seeds, BOUND_CLAIM, [bound_verdict(by_seed[seed]) for seed in seeds]),
        over_seeds(seeds, TREND_CLAIM, [trend_verdict(by_seed[seed]) for seed in seeds]),
    ]
    if starts is not None:
        claims = start_claims(config)
        settled = [settle_verdict(by_seed[seed], start_curvatures[seed], config) for seed in seeds]
        stayed = [stay_verdict(by_seed[seed], start_curvatures[seed], config) for seed in seeds]
        checks += [
            over_seeds(seeds, claims[0], settled),
            pooled_slope_check(claims[1], by_seed, start_curvatures, config),
            over_seeds(seeds, claims[2], stayed),
        ]
    converged = [r for r in rows if "frobenius" in r]
    return verdict(
        NAME,
        TITLE,
        CLAIM,
        checks,
        config,
        rows=rows,
        fraction_below=sum(r["ratio"] <= 1 for r in converged) / len(converged) if converged else None,
        spread=grid_spread(rows),
        starts=None
        if starts is None
        else {
            seed: {"train": start["train"], "curvature": start.get("curvature")}
            for seed, start in starts.items()
        },
    )


def bound_verdict(rows: list[dict]) -> tuple[bool | None, str]:
    """Every converged run of one seed under its bound."""
    converged = [r for r in rows if "frobenius" in r]
    if not converged:
        return None, "no run converged"
    below = [r for r in converged if r["frobenius"] <= r["bound"]]
    diverged = [r for r in rows if r["status"] == "diverged"]
    worst = max(converged, key=lambda r: r["ratio"])
    return len(below) == len(converged), (
        f"{len(below)}/{len(converged)} converged runs lie below their bound; the closest is eta={worst['lr']:g}, "
        f"B={worst['batch_size']} with ||H||_F = {worst['frobenius']:.3g} = {worst['ratio']:.2f} x its bound "
        f"{worst['bound']:.3g} (mu = {worst['mu']:.3g}); {len(diverged)}/{len(rows)} runs diverged"
    )


def trend_verdict(rows: list[dict]) -> tuple[bool | None, str]:
    """Spearman rank correlation of ||H||_F with sqrt(B)/eta over one seed's minima is positive."""
    converged = [r for r in rows if "frobenius" in r]
    if len({r["sqrt_b_over_lr"] for r in converged}) < 3:
        return None, "fewer than 3 distinct sqrt(B)/eta among converged runs"
    rho = float(
        spearmanr([r["sqrt_b_over_lr"] for r in converged], [r["frobenius"] for r in converged]).statistic
    )
    return rho > 0, f"Spearman rank correlation over {len(converged)} minima: {rho:.2f}"


def start_claims(config: Config) -> tuple[str, str, str]:
    return (
        f"runs whose bound lies below the start settle with ||H||_F / bound in "
        f"[{config.ratio_band[0]:g}, {config.ratio_band[1]:g}]",
        f"log-log slope of ||H||_F against sqrt(B)/eta over those runs, pooled over the seeds, in "
        f"[{config.slope_band[0]:g}, {config.slope_band[1]:g}]",
        f"runs whose bound lies above {config.stay_margin:g} x the start's ||H||_F stay within "
        f"{config.stay_tolerance:.0%} of it",
    )


NO_START = "GD did not reach the common start"


def _binding(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "frobenius" in r and r["binding"]]


def settle_verdict(rows: list[dict], start: dict | None, config: Config) -> tuple[bool | None, str]:
    """One seed's converged binding runs settle with ||H||_F / bound in ``ratio_band``."""
    if start is None:
        return None, NO_START
    binding = _binding(rows)
    if not binding:
        return None, "no converged run had its bound below the start"
    low, high = config.ratio_band
    inside = [r for r in binding if low <= r["ratio"] <= high]
    ratios = ", ".join(f"eta={r['lr']:g} B={r['batch_size']}: {r['ratio']:.2f}" for r in binding)
    return len(inside) == len(binding), (
        f"{len(inside)}/{len(binding)} binding runs (start ||H||_F = {start['frobenius']:.3g}); ratios {ratios}"
    )


def stay_verdict(rows: list[dict], start: dict | None, config: Config) -> tuple[bool | None, str]:
    """One seed's runs with a bound above ``stay_margin`` x the start stay within ``stay_tolerance``."""
    if start is None:
        return None, NO_START
    free = [
        r for r in rows if "frobenius" in r and r["start_bound"] >= config.stay_margin * start["frobenius"]
    ]
    if not free:
        return None, f"no converged run had its bound above {config.stay_margin:g} x the start"
    moved = [r for r in free if abs(r["frobenius"] / start["frobenius"] - 1) > config.stay_tolerance]
    return not moved, f"{len(free) - len(moved)}/{len(free)} stayed; ||H||_F / start: " + ", ".join(
        f"{r['frobenius'] / start['frobenius']:.2f}" for r in free
    )


def log_log_slope(rows: list[dict]) -> tuple[float, float] | None:
    """Least-squares slope of log ||H||_F on log sqrt(B)/eta and its standard error (None: < 3 distinct x)."""
    if len({r["sqrt_b_over_lr"] for r in rows}) < 3:
        return None
    fit = linregress([math.log(r["sqrt_b_over_lr"]) for r in rows], [math.log(r["frobenius"]) for r in rows])
    return float(fit.slope), float(fit.stderr)


def pooled_slope_check(
    claim: str, by_seed: dict[int, list[dict]], starts: dict[int, dict | None], config: Config
) -> dict:
    """The slope over the binding runs of every seed whose start converged, with a 2-s.e. interval.

    One fit with a common intercept: the seeds' starts and bounds agree to a few percent (SPEC.md
    4.1, E2), and ||H||_F ~ c sqrt(B)/eta has one c if SGD settles at a fixed share of its bound.
    Each seed's own slope is in the detail, as "k/m seeds" in the band.
    """
    seeds = [seed for seed in by_seed if starts[seed] is not None]
    binding = [r for seed in seeds for r in _binding(by_seed[seed])]
    low, high = config.slope_band
    per_seed = {seed: log_log_slope(_binding(by_seed[seed])) for seed in seeds}
    in_band = sum(fit is not None and low <= fit[0] <= high for fit in per_seed.values())
    own = "; ".join(
        f"seed {seed}: "
        + ("fewer than 3 distinct sqrt(B)/eta" if fit is None else f"{fit[0]:.2f} +- {2 * fit[1]:.2f}")
        for seed, fit in per_seed.items()
    )
    pooled = log_log_slope(binding)
    if pooled is None:
        return check(
            claim, None, f"fewer than 3 distinct sqrt(B)/eta among the binding runs. Per seed: {own}"
        )
    xs = [r["sqrt_b_over_lr"] for r in binding]
    result = check(
        claim,
        bool(low <= pooled[0] <= high),
        f"pooled slope {pooled[0]:.2f} +- {2 * pooled[1]:.2f} (2 standard errors) over {len(binding)} runs of "
        f"{len(seeds)} seeds, sqrt(B)/eta from {min(xs):.3g} to {max(xs):.3g}. Per seed ({in_band}/{len(by_seed)} "
        f"seeds in the band): {own}",
    )
    result.update(slope=pooled[0], slope_stderr=pooled[1], seeds_passed=in_band, seeds=len(by_seed))
    return result


def grid_spread(rows: list[dict]) -> list[dict]:
    """Per (eta, B): how many seeds converged or diverged, ||H||_F mean and std over seeds, ratio min..max."""
    spread = []
    for lr, batch_size in sorted({(r["lr"], r["batch_size"]) for r in rows}, key=lambda p: (p[1], p[0])):
        group = [r for r in rows if (r["lr"], r["batch_size"]) == (lr, batch_size)]
        measured = [r for r in group if "frobenius" in r]
        entry = {
            "lr": lr,
            "batch_size": batch_size,
            "sqrt_b_over_lr": group[0]["sqrt_b_over_lr"],
            "seeds": len(group),
            "converged": len(measured),
            "diverged": sum(r["status"] == "diverged" for r in group),
        }
        if measured:
            values = [r["frobenius"] for r in measured]
            entry.update(
                frobenius_mean=statistics.fmean(values),
                frobenius_std=statistics.stdev(values) if len(values) > 1 else 0.0,
                ratio_min=min(r["ratio"] for r in measured),
                ratio_max=max(r["ratio"] for r in measured),
                bound_mean=statistics.fmean(r["bound"] for r in measured),
            )
        spread.append(entry)
    return spread
