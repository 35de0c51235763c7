"""E3: size independence of the SGD bound (Wu, Wang & Su 2022; SPEC.md section 4).

At one (eta, B), SGD and full-batch GD train the same network family at several widths (at the
base n) and several n (at the base width), each to a loss goal. At every minimum reached:
||H||_F, lambda_max and tr H (``curvature_summary``) and mu. The claim: SGD's ||H||_F stays below
sqrt(B/mu)/eta whatever the width and n, while GD is only held to lambda_max <= 2/eta (Cohen et
al. 2021), so its ||H||_F and tr H are free to be larger and to grow with size.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

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

NAME = "E3"
TITLE = "Size independence: SGD against GD over width and n"
CLAIM = (
    "At fixed (eta, B), ||H||_F of SGD minima stays below sqrt(B/mu)/eta as width and n grow, while GD minima "
    "are only held to lambda_max <= 2/eta, so their ||H||_F and tr H can be larger and grow."
)
OPTIMIZERS = ("SGD", "GD")


@dataclass(frozen=True)
class Config:
    data: DataConfig
    model: ModelConfig  # its "width" argument is swept; the one given is the base width
    widths: tuple[int, ...]
    ns: tuple[int, ...]
    lr: float
    batch_size: int
    sampling: str = "with_replacement"
    width_key: str = "width"
    max_steps: int = 15_000
    gd_max_steps: int = 8000
    gd_eval_every: int = 10  # full-data loss checks between GD steps: each one is a pass and a metrics row
    loss_goal: float = 2e-4
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"


def default_config(scale: str) -> Config:
    quick = Config(
        data=quick_data(),
        model=ModelConfig("mlp", {"width": 64, "activation": "tanh"}),
        widths=(16, 64, 256),
        ns=(125, 250, 500, 1000),
        lr=0.03,
        batch_size=4,
    )
    full = Config(
        data=full_data(),
        model=ModelConfig("vgg", {"depth": 11, "width": 16}),
        widths=(8, 16, 32, 64),
        ns=(500, 1000, 2000, 4000),
        lr=0.02,
        batch_size=16,
        max_steps=100_000,
        gd_max_steps=50_000,
        measure=MeasureConfig(alignment="stochastic"),
        device="cuda",
    )
    return preset(scale, quick, full)


def _points(config: Config) -> list[tuple[str, int, int]]:
    """(sweep, width, n): the width sweep at the base n, then the n sweep at the base width."""
    base_width, base_n = config.model.kwargs[config.width_key], config.data.n
    return [("width", w, base_n) for w in config.widths] + [("n", base_width, n) for n in config.ns]


def run(config: Config, root: str | os.PathLike, progress: Progress = no_progress) -> dict:
    units = [(sweep, width, n, opt) for sweep, width, n in _points(config) for opt in OPTIMIZERS]
    records = []
    for index, (sweep, width, n, optimizer) in enumerate(units):
        label = f"{optimizer}-w{width}-n{n}"
        progress(f"{NAME} {label}", index, len(units))
        sgd = optimizer == "SGD"
        spec = TrainSpec(
            data=dataclasses.replace(config.data, n=n),
            model=dataclasses.replace(config.model, kwargs={**config.model.kwargs, config.width_key: width}),
            lr=config.lr,
            batch_size=config.batch_size if sgd else None,
            sampling=config.sampling,
            max_steps=config.max_steps if sgd else config.gd_max_steps,
            loss_goal=config.loss_goal,
            eval_every=None if sgd else config.gd_eval_every,
            seed=config.seed,
            device=config.device,
            dtype=config.dtype,
        )
        # The run at the base width and base n belongs to both sweeps: execute finds it the second time.
        record = execute(
            root,
            NAME,
            label,
            spec_config(spec, measure=to_dict(config.measure)),
            lambda folder: train_and_measure(folder, spec, config.measure),
        )
        records.append({**record, "sweep": sweep, "optimizer": optimizer, "width": width, "n": n})
    progress(NAME, len(units), len(units))
    return save_analysis(root, NAME, analyse(records, config))


def analyse(records: list[dict], config: Config) -> dict:
    rows = []
    for record in records:
        row = {k: record[k] for k in ("sweep", "optimizer", "width", "n")}
        row.update(
            run_id=record["run_id"],
            status=record["train"]["status"],
            steps=record["train"]["steps"],
            loss=record["train"]["final_loss"],
        )
        curvature = record.get("curvature")
        if curvature is not None:
            noise = batch_noise_factor(record["n"], config.batch_size, config.sampling)
            row.update(
                frobenius=curvature["frobenius"],
                lambda_max=curvature["lambda_max"],
                trace=curvature["trace"],
                mu=curvature["mu"],
                sgd_bound=frobenius_bound(config.lr, noise, curvature["mu"]),
            )
        rows.append(row)
    # The base point is in both sweeps: count each run once.
    measured = list({r["run_id"]: r for r in rows if "frobenius" in r}.values())
    sgd = [r for r in measured if r["optimizer"] == "SGD"]
    gd = [r for r in measured if r["optimizer"] == "GD"]
    # Spread along each sweep (the base point belongs to both).
    spread = {
        sweep: {
            opt: _spread(
                [r for r in rows if r["sweep"] == sweep and r["optimizer"] == opt and "frobenius" in r]
            )
            for opt in OPTIMIZERS
        }
        for sweep in ("width", "n")
    }
    checks = [
        _sgd_bounded(sgd),
        _gd_edge(gd, config.lr),
        _sgd_flatter(sgd, gd),
        *(_steadier(sweep, spread[sweep]) for sweep in ("width", "n")),
    ]
    return {
        "experiment": NAME,
        "title": TITLE,
        "claim": CLAIM,
        "holds": overall(checks),
        "checks": checks,
        "config": to_dict(config),
        "rows": rows,
        "spread": spread,
        "gd_limit": 2 / config.lr,
    }


def _spread(group: list[dict]) -> dict:
    """max/min over sizes of each curvature measure: 1 means size-independent (None: under 2 sizes)."""
    return {
        key: max(r[key] for r in group) / min(r[key] for r in group) if len(group) >= 2 else None
        for key in ("frobenius", "lambda_max", "trace")
    }


def _steadier(sweep: str, spread: dict) -> dict:
    claim = f"SGD's ||H||_F varies less than GD's along the {sweep} sweep (max/min over sizes)"
    sgd, gd = spread["SGD"]["frobenius"], spread["GD"]["frobenius"]
    if sgd is None or gd is None:
        return check(claim, None, f"fewer than 2 converged sizes for SGD or GD along the {sweep} sweep")
    return check(
        claim,
        sgd <= gd,
        f"||H||_F spread along {sweep}: SGD {sgd:.2f}, GD {gd:.2f}; "
        f"tr H spread: SGD {spread['SGD']['trace']:.2f}, GD {spread['GD']['trace']:.2f}",
    )


def _sgd_bounded(sgd: list[dict]) -> dict:
    claim = "SGD: ||H||_F <= sqrt(B/mu)/eta at every width and n"
    if not sgd:
        return check(claim, None, "no SGD run converged")
    worst = max(sgd, key=lambda r: r["frobenius"] / r["sgd_bound"])
    below = sum(r["frobenius"] <= r["sgd_bound"] for r in sgd)
    return check(
        claim,
        below == len(sgd),
        f"{below}/{len(sgd)} SGD minima below the bound; the largest ratio is {worst['frobenius'] / worst['sgd_bound']:.2f} "
        f"(width {worst['width']}, n {worst['n']}, ||H||_F = {worst['frobenius']:.3g})",
    )


def _gd_edge(gd: list[dict], lr: float) -> dict:
    claim = "GD: lambda_max <= 2/eta at every width and n"
    if not gd:
        return check(claim, None, "no GD run converged")
    below = sum(r["lambda_max"] <= 2 / lr for r in gd)
    return check(
        claim,
        below == len(gd),
        f"{below}/{len(gd)} GD minima have lambda_max <= 2/eta = {2 / lr:.3g} (largest {max(r['lambda_max'] for r in gd):.3g})",
    )


def _sgd_flatter(sgd: list[dict], gd: list[dict]) -> dict:
    claim = "SGD minima are flatter than GD minima (||H||_F) at the same width and n"
    pairs = [(s, g) for s in sgd for g in gd if (s["width"], s["n"]) == (g["width"], g["n"])]
    if not pairs:
        return check(claim, None, "no size where both SGD and GD converged")
    flatter = sum(s["frobenius"] <= g["frobenius"] for s, g in pairs)
    ratios = ", ".join(f"{g['frobenius'] / s['frobenius']:.2f}" for s, g in pairs)
    return check(
        claim, flatter == len(pairs), f"{flatter}/{len(pairs)} sizes; GD/SGD ||H||_F ratios: {ratios}"
    )
