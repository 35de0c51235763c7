"""E2: the Frobenius bound over a grid of (eta, B) (Wu, Wang & Su 2022; SPEC.md section 4).

One SGD run per (eta, B), from the same initialisation, trained to a loss goal. At each minimum
reached, ||H||_F is compared with the stability bound

    ||H||_F <= 1 / (eta sqrt(p_B mu))   (= sqrt(B/mu)/eta with replacement),

mu the alignment factor at the minimum (SPEC.md sections 2-3). The claim: every minimum SGD
converges to lies below its bound, and ||H||_F grows with sqrt(B)/eta (SGD sits near its
stability edge). Diverged runs are kept and marked: they are SGD refusing a too-large eta.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from scipy.stats import spearmanr

from sgdstab.experiments.analysis import check, overall, save_analysis
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
    Progress,
    TrainSpec,
    execute,
    no_progress,
    spec_config,
    train_and_measure,
)
from sgdstab.stability import batch_noise_factor, frobenius_bound

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


def default_config(scale: str) -> Config:
    quick = Config(
        data=quick_data(),
        model=ModelConfig("mlp", {"width": 64, "activation": "tanh"}),
        lrs=(0.02, 0.04, 0.06, 0.08),
        batch_sizes=(1, 4, 16),
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


def run(config: Config, root: str | os.PathLike, progress: Progress = no_progress) -> dict:
    grid = [(lr, b) for b in config.batch_sizes for lr in config.lrs]
    records = []
    for index, (lr, batch_size) in enumerate(grid):
        label = f"lr{lr:g}-B{batch_size}"
        progress(f"{NAME} {label}", index, len(grid))
        spec = TrainSpec(
            data=config.data,
            model=config.model,
            lr=lr,
            batch_size=batch_size,
            sampling=config.sampling,
            max_steps=config.max_steps,
            loss_goal=config.loss_goal,
            seed=config.seed,
            device=config.device,
            dtype=config.dtype,
        )
        records.append(
            execute(
                root,
                NAME,
                label,
                spec_config(spec, measure=to_dict(config.measure)),
                lambda folder: train_and_measure(folder, spec, config.measure),
            )
        )
    progress(NAME, len(grid), len(grid))
    return save_analysis(root, NAME, analyse(records, config))


def analyse(records: list[dict], config: Config) -> dict:
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
    return {
        "experiment": NAME,
        "title": TITLE,
        "claim": CLAIM,
        "holds": overall(checks),
        "checks": checks,
        "config": to_dict(config),
        "rows": rows,
        "fraction_below": len(below) / len(converged) if converged else None,
    }
