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
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scipy.stats import linregress, spearmanr

from sgdstab.experiments.analysis import check, save_analysis, verdict
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
    seed: int = 0
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
    """GD to the common start, then the grid's independent runs (on ``executor``; None: here, in order)."""
    start = None
    start_task = common_start_task(config, root)
    if start_task is not None:
        (start,) = run_stage([start_task], executor, progress)
        if start["train"]["status"] != "converged":
            return save_analysis(root, NAME, analyse([], config, start))
    records = run_stage(grid_tasks(config, root, start), executor, progress)
    progress(NAME, len(records), len(records))
    return save_analysis(root, NAME, analyse(records, config, start))


def common_start_task(config: Config, root: str | os.PathLike) -> FolderTask | None:
    """GD to the common sharp start of every grid run (None without ``start_lr``)."""
    if config.start_lr is None:
        return None
    start_spec = recipe_spec(
        config,
        lr=config.start_lr,
        batch_size=None,
        max_steps=config.start_max_steps,
        loss_goal=config.start_loss_goal,
        eval_every=config.start_eval_every,
    )
    work = functools.partial(_train_measure_and_name_folder, spec=start_spec, measure=config.measure)
    run_config = spec_config(start_spec, measure=to_dict(config.measure))
    return FolderTask(os.fspath(root), NAME, "gd-start", run_config, work)


def _train_measure_and_name_folder(folder: RunFolder, spec: TrainSpec, measure: MeasureConfig) -> dict:
    return {**train_and_measure(folder, spec, measure), "folder": str(folder.path)}


def grid_tasks(config: Config, root: str | os.PathLike, start: dict | None) -> list[FolderTask]:
    """One run per (eta, B) of the grid, from ``start``'s minimum when there is one."""
    grid = [(lr, b) for b in config.batch_sizes for lr in config.lrs]
    warmup_steps = 0 if start is None else config.start_warmup_steps
    units = []
    for lr, batch_size in grid:
        label = f"lr{lr:g}-B{batch_size}"
        spec = recipe_spec(
            config,
            lr=lr,
            batch_size=batch_size,
            sampling=config.sampling,
            max_steps=config.max_steps,
            loss_goal=config.loss_goal,
            init_from=None if start is None else start["folder"],
        )
        run_config = spec_config(spec, measure=to_dict(config.measure), **_warmup_entry(config, start))
        units.append(
            FolderTask(os.fspath(root), NAME, label, run_config, _work(spec, config.measure, warmup_steps))
        )
    return units


def _warmup_entry(config: Config, start: dict | None) -> dict:
    """The warm-up as a run setting (in the run-id hash) when it applies, nothing otherwise."""
    return {} if start is None else {"warmup_steps": config.start_warmup_steps}


def _work(spec: TrainSpec, measure: MeasureConfig, warmup_steps: int) -> Callable[[RunFolder], dict]:
    """``train_and_measure`` (picklable), with the warm-up of a run from the common start (see Config)."""
    if not warmup_steps:
        return functools.partial(train_and_measure, spec=spec, measure=measure)
    return functools.partial(train_and_measure, spec=spec, measure=measure, warmup_steps=warmup_steps)


def analyse(records: list[dict], config: Config, start: dict | None = None) -> dict:
    start_curvature = None if start is None else start.get("curvature")
    rows = []
    for record in records:
        spec = record["config"]["train"]
        lr, batch_size = spec["lr"], spec["batch_size"]
        noise = batch_noise_factor(spec["data"]["n"], batch_size, spec["sampling"])
        row = {
            "run_id": record["run_id"],
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
        rows.append(row)

    converged = [r for r in rows if "frobenius" in r]
    below = [r for r in converged if r["frobenius"] <= r["bound"]]
    diverged = [r for r in rows if r["status"] == "diverged"]
    if converged:
        worst = max(converged, key=lambda r: r["ratio"])
        bound_check = check(
            "||H||_F <= sqrt(B/mu)/eta at every converged run",
            len(below) == len(converged),
            f"{len(below)}/{len(converged)} converged runs lie below their bound; the closest is eta={worst['lr']:g}, "
            f"B={worst['batch_size']} with ||H||_F = {worst['frobenius']:.3g} = {worst['ratio']:.2f} x its bound "
            f"{worst['bound']:.3g} (mu = {worst['mu']:.3g}); {len(diverged)}/{len(rows)} runs diverged",
        )
    else:
        bound_check = check("||H||_F <= sqrt(B/mu)/eta at every converged run", None, "no run converged")
    if len({r["sqrt_b_over_lr"] for r in converged}) >= 3:
        rho = float(
            spearmanr([r["sqrt_b_over_lr"] for r in converged], [r["frobenius"] for r in converged]).statistic
        )
        trend_check = check(
            "||H||_F grows with sqrt(B)/eta",
            rho > 0,
            f"Spearman rank correlation of ||H||_F with sqrt(B)/eta over {len(converged)} minima: {rho:.2f}",
        )
    else:
        trend_check = check(
            "||H||_F grows with sqrt(B)/eta", None, "fewer than 3 distinct sqrt(B)/eta among converged runs"
        )
    checks = [bound_check, trend_check]
    if start is not None:
        checks += start_checks(converged, start_curvature, config)
    return verdict(
        NAME,
        TITLE,
        CLAIM,
        checks,
        config,
        rows=rows,
        fraction_below=len(below) / len(converged) if converged else None,
        start=None if start is None else {"train": start["train"], "curvature": start_curvature},
    )


def start_checks(converged: list[dict], start: dict | None, config: Config) -> list[dict]:
    """The checks that need a common sharp start: settling near a binding bound, the slope, staying put."""
    claims = (
        f"runs whose bound lies below the start settle with ||H||_F / bound in "
        f"[{config.ratio_band[0]:g}, {config.ratio_band[1]:g}]",
        f"log-log slope of ||H||_F against sqrt(B)/eta over those runs in "
        f"[{config.slope_band[0]:g}, {config.slope_band[1]:g}]",
        f"runs whose bound lies above {config.stay_margin:g} x the start's ||H||_F stay within "
        f"{config.stay_tolerance:.0%} of it",
    )
    if start is None:
        return [check(claim, None, "GD did not reach the common start") for claim in claims]
    binding = [r for r in converged if r["binding"]]
    free = [r for r in converged if r["start_bound"] >= config.stay_margin * start["frobenius"]]
    low, high = config.ratio_band
    inside = [r for r in binding if low <= r["ratio"] <= high]
    ratios = ", ".join(f"eta={r['lr']:g} B={r['batch_size']}: {r['ratio']:.2f}" for r in binding)
    settle = check(
        claims[0],
        len(inside) == len(binding) if binding else None,
        f"{len(inside)}/{len(binding)} binding runs (start ||H||_F = {start['frobenius']:.3g}); ratios {ratios}"
        if binding
        else "no converged run had its bound below the start",
    )
    if len({r["sqrt_b_over_lr"] for r in binding}) >= 3:
        fit = linregress(
            [math.log(r["sqrt_b_over_lr"]) for r in binding], [math.log(r["frobenius"]) for r in binding]
        )
        slope = check(
            claims[1],
            bool(config.slope_band[0] <= fit.slope <= config.slope_band[1]),
            f"slope {fit.slope:.2f} +- {2 * fit.stderr:.2f} (2 standard errors) over {len(binding)} runs",
        )
    else:
        slope = check(claims[1], None, "fewer than 3 distinct sqrt(B)/eta among the binding runs")
    moved = [r for r in free if abs(r["frobenius"] / start["frobenius"] - 1) > config.stay_tolerance]
    stay = check(
        claims[2],
        not moved if free else None,
        f"{len(free) - len(moved)}/{len(free)} stayed; ||H||_F / start: "
        + ", ".join(f"{r['frobenius'] / start['frobenius']:.2f}" for r in free)
        if free
        else f"no converged run had its bound above {config.stay_margin:g} x the start",
    )
    return [settle, slope, stay]
