"""E1: the alignment factor mu along SGD training, per model family (Wu, Wang & Su 2022; SPEC.md section 4).

mu(theta) = tr(Sigma G) / (2 L ||G||_F^2) (SPEC.md section 2) is measured on a schedule through
the trainer's ``measure`` hook while SGD trains each family (linear, random features, fully
connected, CNN) with square loss. The claim: mu stays of order 1, bounded away from 0, along the
whole of training, for every family. "Bounded away from 0" is tested as min mu >= ``mu_floor``.

Multi-class arm: with C one-hot outputs mu is about 1/C (SPEC.md section 4.1), so the families
above use 2 classes with +-1 targets (C = 1) and a separate arm trains on C-class data
(``multiclass_data``) to measure which normalisation is of order one. At each measurement it
builds the NTK K once (nC x nC, ``sample_space.gram_matrix``) and records the exact mu, C mu, the
alignment factor of each output alone (mu_a: SPEC.md section 2's formula on the n x n block
K_aa of output a and its residuals e_a) and the share of ||K||_F^2 in the output-diagonal blocks
(``output_alignment``). When K is block-diagonal over outputs with equal blocks and residuals,
mu = mean_a mu_a / C exactly, so C mu is the quantity of order one, and the bound
||H||_F <= sqrt(B/mu)/eta of SPEC.md section 3 reads sqrt(C B / (C mu))/eta: larger by sqrt(C)
than for one output, as ||H||_F itself is (C blocks of the same size).

Every seed of ``seeds`` trains every family and every multi-class run from its own
initialisation and batches; each check reports "k/m seeds" and holds on every seed; the
normalisation figures pool the seeds' runs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sgdstab.alignment import alignment
from sgdstab.data import DatasetNotFoundError
from sgdstab.errors import InputError
from sgdstab.experiments.analysis import check, over_seeds, save_analysis, verdict
from sgdstab.experiments.config import (
    FULL_MODELS,
    DataConfig,
    ModelConfig,
    full_data,
    full_fashion_data,
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
    run_training,
    spec_config,
)
from sgdstab.io import RunFolder
from sgdstab.problem import Problem
from sgdstab.run_spec import load_data
from sgdstab.sample_space import DEFAULT_MAX_JACOBIAN_ENTRIES, gram_matrix

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
    seeds: tuple[int, ...] = (0, 1, 2)  # each seed: every family's and arm's own initialisation and batches
    device: str = "cpu"
    dtype: str = "float32"
    # The multi-class arm: every family of multiclass_families on every data set of
    # multiclass_data (one-hot targets, C outputs), measured exactly (K is nC x nC).
    multiclass_data: tuple[DataConfig, ...] = ()
    multiclass_families: tuple[ModelConfig, ...] = ()
    multiclass_lrs: tuple[float, ...] = ()  # one per multiclass family
    multiclass_max_steps: int = 600
    multiclass_measure_every: int = 200
    # A multi-class data set whose files are absent is skipped (and the report says so) rather
    # than failing the suite: the quick scale must run on a fresh clone without root.
    skip_missing_data: bool = False
    max_jacobian_entries: int = DEFAULT_MAX_JACOBIAN_ENTRIES


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
        # Two n on MNIST (the trend in n) and Fashion-MNIST when its files are installed;
        # about 40 s of one CPU core in all (measured 2026-11-29).
        multiclass_data=(
            quick_data(n=50, classes=None, targets="onehot"),
            quick_data(n=100, classes=None, targets="onehot"),
            quick_data(name="fashion_mnist", n=100, classes=None, targets="onehot"),
        ),
        multiclass_families=(
            ModelConfig("mlp", {"width": 32, "activation": "tanh"}, label="fully connected"),
        ),
        multiclass_lrs=(0.05,),
        skip_missing_data=True,
    )
    full = Config(
        data=full_data(),
        families=(
            ModelConfig("linear", label="linear"),
            ModelConfig("random_features", {"num_features": 4096}, label="random features"),
            FULL_MODELS["mlp"],
            FULL_MODELS["vgg"],
            FULL_MODELS["resnet"],
        ),
        # The CNNs at about half of 2/lambda_max(H) at initialisation measured on 2-class Fashion-MNIST
        # (n = 256, +-1 targets; CPU, 2026-11-29: VGG-11 1577, ResNet-20 1092), a stand-in until a
        # curvature scan on CIFAR-10 itself; the tanh net at half of 10-class Fashion-MNIST's edge.
        lrs=(0.001, 0.002, 0.005, 0.0006, 0.0009),
        batch_size=64,
        max_steps=20_000,
        measure_every=1000,
        alignment="stochastic",
        device="cuda",
        # Fashion-MNIST, 10 classes, at two n: exact K of nC = 2560 and 5120 on the GPU.
        multiclass_data=(full_fashion_data(n=256), full_fashion_data(n=512)),
        multiclass_families=(FULL_MODELS["mlp"], FULL_MODELS["vgg"]),
        # About half of 2/lambda_max(H) at initialisation on Fashion-MNIST n = 256, C = 10 (measured
        # on a CPU, 2026-11-29: lambda_max 180 for the tanh net, 2636 for VGG-11).
        multiclass_lrs=(0.005, 0.0004),
        multiclass_max_steps=10_000,
        multiclass_measure_every=1000,
        max_jacobian_entries=2**31,  # 8 GiB of float32 Jacobian rows on one GPU
    )
    return preset(scale, quick, full)


def output_alignment(gram: Tensor, residuals: Tensor) -> dict[str, float]:
    """mu, C mu, the alignment of each output alone, and K's share in the output-diagonal blocks.

    ``gram``: K (nC x nC, sample-major: row i*C + a is output a of sample i); ``residuals``: e
    (n x C). mu is SPEC.md section 2's exact form, n sum_i ||a_i - mean_j a_j||^2 / (||e||^2 ||K||_F^2)
    with a_i = K[:, block i] e_i; mu_a is the same formula for the model's output a alone, whose
    NTK is the block K_aa (n x n) and whose residuals are e_a. ``block_share`` is
    sum_a ||K_aa||_F^2 / ||K||_F^2 (1 when outputs share no curvature). nan where e is zero.
    """
    n, outputs = residuals.shape
    gram = gram.to(torch.float64)
    residuals = residuals.to(torch.float64)

    def mu_of(kernel: Tensor, errors: Tensor) -> float:
        per_sample = torch.einsum("icj,ic->ij", kernel.reshape(n, errors.shape[1], -1), errors)
        numerator = n * (per_sample - per_sample.mean(dim=0)).pow(2).sum().item()
        denominator = errors.pow(2).sum().item() * kernel.pow(2).sum().item()
        return numerator / denominator if denominator > 0 else math.nan

    blocks = gram.reshape(n, outputs, n, outputs)
    per_output = [mu_of(blocks[:, a, :, a], residuals[:, a : a + 1]) for a in range(outputs)]
    diagonal = sum(blocks[:, a, :, a].pow(2).sum().item() for a in range(outputs))
    mu = mu_of(gram, residuals)
    return {
        "mu": mu,
        "c_mu": outputs * mu,
        "mu_output_mean": sum(per_output) / outputs,
        "mu_output_min": min(per_output),
        "block_share": diagonal / gram.pow(2).sum().item(),
    }


MULTICLASS_KEYS = ("mu", "c_mu", "mu_output_mean", "mu_output_min", "block_share")


def run(
    config: Config,
    root: str | os.PathLike,
    progress: Progress = no_progress,
    executor: Executor | None = None,
) -> dict:
    """Train every family and the multi-class arm (independent runs, on ``executor``; None: here,
    in order) and analyse.
    """
    family_tasks = tasks(config, root)
    arm_tasks, skipped = multiclass_tasks(config, root)
    records = run_stage([*family_tasks, *arm_tasks], executor, progress)
    progress(NAME, len(records), len(records))
    multiclass = [*records[len(family_tasks) :], *skipped]
    return save_analysis(root, NAME, analyse(records[: len(family_tasks)], config, multiclass))


def tasks(config: Config, root: str | os.PathLike) -> list[FolderTask]:
    """One run per (seed, family): SGD with mu measured along the way."""
    if len(config.lrs) != len(config.families):
        raise InputError(
            f"E1 needs one learning rate per family: {len(config.families)} families, {len(config.lrs)} lrs"
        )
    units = []
    for seed, (family, lr) in itertools.product(config.seeds, zip(config.families, config.lrs, strict=True)):
        spec = _spec(config, config.data, family, lr, config.max_steps, config.measure_every, seed)
        # The alignment settings change the recorded mu curve: they belong to the run's identity.
        run_config = spec_config(
            spec, family_label=family.title, alignment=config.alignment, num_probes=config.num_probes
        )
        work = functools.partial(_train_measuring_mu, spec=spec, config=config)
        units.append(FolderTask(os.fspath(root), NAME, f"{family.name}-s{seed}", run_config, work))
    return units


def multiclass_tasks(config: Config, root: str | os.PathLike) -> tuple[list[FolderTask], list[dict]]:
    """One run per (seed, C-class data set, family), and a record for each data set whose files are missing."""
    if len(config.multiclass_lrs) != len(config.multiclass_families):
        raise InputError(
            f"E1 needs one learning rate per multi-class family: {len(config.multiclass_families)} families, "
            f"{len(config.multiclass_lrs)} multiclass_lrs"
        )
    units, skipped = [], []
    for data in config.multiclass_data:
        # Classes given as a JSON list (an override) must hash: the data set is cached per config.
        data = dataclasses.replace(data, classes=None if data.classes is None else tuple(data.classes))
        for family, lr in zip(config.multiclass_families, config.multiclass_lrs, strict=True):
            try:
                load_data(data, config.device, config.dtype)
            except DatasetNotFoundError as err:
                if not config.skip_missing_data:
                    raise
                skipped.append(
                    {"skipped": True, "data": to_dict(data), "family_label": family.title, "reason": str(err)}
                )
                continue
            for seed in config.seeds:
                spec = _spec(
                    config,
                    data,
                    family,
                    lr,
                    config.multiclass_max_steps,
                    config.multiclass_measure_every,
                    seed,
                )
                run_config = spec_config(spec, family_label=family.title, multiclass=True)
                work = functools.partial(_train_measuring_outputs, spec=spec, config=config)
                label = f"{family.name}-C{data.name}-s{seed}"
                units.append(FolderTask(os.fspath(root), NAME, label, run_config, work))
    return units, skipped


def _alignment(problem: Problem, config: Config, seed: int) -> dict[str, float]:
    result = alignment(
        problem, method=config.alignment, num_probes=config.num_probes, seed=seed, hessian=False
    )
    return {"mu": result.mu, "mu_stderr": result.stderr}


def _output_alignment(problem: Problem, config: Config) -> dict[str, float]:
    gram = gram_matrix(problem, max_jacobian_entries=config.max_jacobian_entries)
    residuals = problem.residuals(problem.parameters().detach()).reshape(problem.num_samples, -1)
    return output_alignment(gram, residuals)


def _train_measuring_mu(folder: RunFolder, spec: TrainSpec, config: Config) -> dict:
    measure = functools.partial(_alignment, config=config, seed=spec.seed)
    _, result = run_training(folder.path, spec, measure=measure)
    return {"train": result.summary(), "mu_curve": _curve(result, ("mu", "mu_stderr"))}


def _train_measuring_outputs(folder: RunFolder, spec: TrainSpec, config: Config) -> dict:
    _, result = run_training(folder.path, spec, measure=functools.partial(_output_alignment, config=config))
    return {"train": result.summary(), "mu_curve": _curve(result, MULTICLASS_KEYS)}


def _spec(
    config: Config, data: DataConfig, family: ModelConfig, lr: float, steps: int, every: int, seed: int
) -> TrainSpec:
    return recipe_spec(
        config,
        seed=seed,
        data=data,
        model=family,
        lr=lr,
        batch_size=config.batch_size,
        sampling=config.sampling,
        max_steps=steps,
        loss_goal=config.loss_goal,
        measure_every=every,
    )


def _curve(result, keys: tuple[str, ...]) -> list[dict]:
    """The measured rows of a run, one per step, with ``keys`` beside the step and loss."""
    rows = [row for row in (*result.history, result.final) if "mu" in row]
    # The final row repeats the last history row when the run stopped on a measurement step.
    unique = list({row["step"]: row for row in rows}.values())
    return [{k: row[k] for k in ("step", "loss", *keys)} for row in unique]


def analyse(records: list[dict], config: Config, multiclass: list[dict] | None = None) -> dict:
    """Each seed's checks, reported as "k/m seeds"; the multi-class normalisation over every seed's runs.

    ``multiclass``: the multi-class arm's records and the skipped data sets' entries.
    """
    multiclass = multiclass or []
    skipped = [r for r in multiclass if r.get("skipped")]
    per_seed = []
    for seed in config.seeds:
        mine = [r for r in records if r["config"]["train"]["seed"] == seed]
        arm = [r for r in multiclass if not r.get("skipped") and r["config"]["train"]["seed"] == seed]
        per_seed.append(_seed_checks(mine, config, [*arm, *skipped]))
    checks = [
        over_seeds(
            config.seeds,
            per_seed[0][index]["claim"],
            [(seed_checks[index]["holds"], seed_checks[index]["detail"]) for seed_checks in per_seed],
        )
        for index in range(len(per_seed[0]))
    ]
    rows = _family_rows(records)
    multiclass_rows, _, normalisation = _analyse_multiclass(
        multiclass, config, [r for r in rows if r["mu_min"] is not None]
    )
    return verdict(
        NAME,
        TITLE,
        CLAIM,
        checks,
        config,
        rows=rows,
        multiclass_rows=multiclass_rows,
        multiclass_skipped=[
            {
                "data": r["data"]["name"],
                "n": r["data"]["n"],
                "family": r["family_label"],
                "reason": r["reason"],
            }
            for r in skipped
        ],
        normalisation=normalisation,
    )


def _family_rows(records: list[dict]) -> list[dict]:
    rows = []
    for record in records:
        curve = [
            point for point in record["mu_curve"] if point["mu"] == point["mu"]
        ]  # drop nan (zero residual)
        mus = [point["mu"] for point in curve]
        rows.append(
            {
                "family": record["config"]["family_label"],
                "seed": record["config"]["train"]["seed"],
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
    return rows


def _seed_checks(records: list[dict], config: Config, multiclass: list[dict]) -> list[dict]:
    """One seed's checks: mu's floor for every family, then the multi-class arm's."""
    measured = [r for r in _family_rows(records) if r["mu_min"] is not None]
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
    return checks + _analyse_multiclass(multiclass, config, measured)[1]


#: C mu is taken to be the order-one normalisation when every measurement lies in this range.
ORDER_ONE = (0.5, 2.0)


def _analyse_multiclass(
    multiclass: list[dict], config: Config, binary_rows: list[dict]
) -> tuple[list[dict], list[dict], dict]:
    """Rows, checks and the measured normalisation of the multi-class arm (empty when it has no runs)."""
    rows = []
    for record in multiclass:
        if record.get("skipped"):
            continue
        curve = [point for point in record["mu_curve"] if point["mu"] == point["mu"]]
        data = record["config"]["train"]["data"]
        outputs = round(curve[0]["c_mu"] / curve[0]["mu"]) if curve else None
        final = curve[-1] if curve else {}
        rows.append(
            {
                "family": record["config"]["family_label"],
                "seed": record["config"]["train"]["seed"],
                "data": data["name"],
                "n": data["n"],
                "C": outputs,
                "lr": record["config"]["train"]["lr"],
                "status": record["train"]["status"],
                "final_loss": record["train"]["final_loss"],
                "mu_min": min((p["mu"] for p in curve), default=None),
                "mu_max": max((p["mu"] for p in curve), default=None),
                "c_mu_min": min((p["c_mu"] for p in curve), default=None),
                "c_mu_max": max((p["c_mu"] for p in curve), default=None),
                "c_mu_final": final.get("c_mu"),
                "mu_output_min": min((p["mu_output_min"] for p in curve), default=None),
                "mu_output_mean_final": final.get("mu_output_mean"),
                "block_share_final": final.get("block_share"),
                "curve": record["mu_curve"],
            }
        )
    if not multiclass:
        return rows, [], {}
    skipped = [f"{r['data']['name']} (n={r['data']['n']})" for r in multiclass if r.get("skipped")]
    note = f"; skipped, files absent: {', '.join(skipped)}" if skipped else ""
    measured = [r for r in rows if r["mu_min"] is not None]
    claims = (
        f"C mu along training >= {config.mu_floor:g} on every C-class run",
        f"each output's own mu_a along training >= {config.mu_floor:g} on every C-class run",
        f"C mu, not mu, is of order one: every C mu in [{ORDER_ONE[0]:g}, {ORDER_ONE[1]:g}] on every C-class run",
    )
    if not measured:
        return rows, [check(claim, None, "no multi-class run was measured" + note) for claim in claims], {}
    label = lambda r: f"{r['family']} {r['data']} n={r['n']}"  # noqa: E731
    c_mu_min = min(r["c_mu_min"] for r in measured)
    c_mu_max = max(r["c_mu_max"] for r in measured)
    checks = [
        check(
            claims[0],
            c_mu_min >= config.mu_floor,
            "min C mu: " + "; ".join(f"{label(r)}: {r['c_mu_min']:.3g}" for r in measured) + note,
        ),
        check(
            claims[1],
            min(r["mu_output_min"] for r in measured) >= config.mu_floor,
            "min over outputs and training: "
            + "; ".join(f"{label(r)}: {r['mu_output_min']:.3g}" for r in measured)
            + note,
        ),
        check(
            claims[2],
            ORDER_ONE[0] <= c_mu_min and c_mu_max <= ORDER_ONE[1],
            f"C mu from {c_mu_min:.3g} to {c_mu_max:.3g}; mu itself from "
            f"{min(r['mu_min'] for r in measured):.3g} to {max(r['mu_max'] for r in measured):.3g} "
            f"(1/C = {1 / measured[0]['C']:.3g})" + note,
        ),
    ]
    # The bound sqrt(B/mu)/eta = k sqrt(B)/eta with k = 1/sqrt(mu): its constant at the worst point
    # of training, for C outputs against the binary (C = 1) families of the same experiment.
    binary = min((r["mu_min"] for r in binary_rows), default=None)
    normalisation = {
        "num_outputs": measured[0]["C"],
        "c_mu_range": [c_mu_min, c_mu_max],
        "mu_range": [min(r["mu_min"] for r in measured), max(r["mu_max"] for r in measured)],
        "bound_constant": 1 / math.sqrt(min(r["mu_min"] for r in measured)),
        "bound_constant_binary": None if binary is None else 1 / math.sqrt(binary),
        "c_mu_over_output_mean": [
            r["c_mu_final"] / r["mu_output_mean_final"] for r in measured if r["mu_output_mean_final"]
        ],
        "block_share": [r["block_share_final"] for r in measured],
        "c_mu_order_one": checks[2]["holds"],
    }
    return rows, checks, normalisation
