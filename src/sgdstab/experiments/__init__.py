"""The experiments E1-E5 of Wu, Wang & Su (NeurIPS 2022) as named recipes (SPEC.md section 4).

Each recipe module has ``NAME``, ``TITLE``, ``CLAIM``, a frozen ``Config``, ``default_config(scale)``
for the "quick" (CPU) and "full" (CIFAR-10, GPU) scales, and ``run(config, root, progress)``,
which trains and measures in resumable run folders under ``root/<NAME>/`` and writes the
verdict to ``root/<NAME>/analysis.json``. ``reproduce`` runs a suite and writes the report.

A third scale, "smoke", shrinks the quick configs to seconds (a few dozen MNIST samples, nets
of a few units): it checks an installation and is what the tests run. Its verdicts mean little.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sgdstab.errors import InputError
from sgdstab.experiments import e1_alignment, e2_frobenius_bound, e3_size, e4_escape, e5_criteria
from sgdstab.experiments.analysis import save_analysis
from sgdstab.experiments.config import SCALES, MeasureConfig, ModelConfig, override, quick_data, to_dict
from sgdstab.experiments.e5_criteria import Minimum
from sgdstab.experiments.runs import Progress, no_progress, suite_progress
from sgdstab.io import FolderLock, make_folder, read_json, remove_temporaries, write_json_atomic
from sgdstab.report import FIGURES_DIR, write_report
from sgdstab.training import check_device

if TYPE_CHECKING:
    from sgdstab.sweeps import Executor

EXPERIMENTS: dict[str, ModuleType] = {
    m.NAME: m for m in (e1_alignment, e2_frobenius_bound, e3_size, e4_escape, e5_criteria)
}
SUITE_CONFIG = "config.json"


def configure(
    scale: str = "quick",
    only: Sequence[str] | None = None,
    data_dir: str | None = None,
    device: str | None = None,
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    """The configs of the chosen experiments at ``scale``, with suite-wide and per-field changes.

    ``overrides``: "E2.lrs=[0.02,0.05]" or "E1.data.n=300" (value parsed as JSON), or without the
    experiment prefix ("data.n=300") to apply to every chosen experiment that has the field.
    """
    if scale not in (*SCALES, "smoke"):
        raise InputError(f"unknown scale {scale!r}; choose one of {(*SCALES, 'smoke')}")
    if (
        only is not None
        and not isinstance(only, str)
        and len(only)
        and not any(name.strip() for name in only)
    ):
        raise InputError(f"only names no experiment; choose from {', '.join(EXPERIMENTS)}")
    names = list(EXPERIMENTS) if not only else [name.strip().upper() for name in only if name.strip()]
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        raise InputError(f"unknown experiment {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    if device is not None:
        check_device(device)
    if scale == "smoke":
        configs = {name: config for name, config in smoke_configs().items() if name in names}
    else:
        configs = {name: EXPERIMENTS[name].default_config(scale) for name in names}
    for name, config in configs.items():
        if data_dir is not None:
            config = dataclasses.replace(
                config, data=dataclasses.replace(config.data, data_dir=str(data_dir))
            )
        if device is not None:
            config = dataclasses.replace(config, device=device)
        configs[name] = config
    for item in overrides:
        key, separator, value = item.partition("=")
        if not separator:
            raise InputError(f"an override is KEY=VALUE, e.g. E2.lrs=[0.02,0.05]; got {item!r}")
        head, _, rest = key.partition(".")
        if head.upper() in EXPERIMENTS:
            if head.upper() not in configs:
                raise InputError(f"override {item!r} is for {head.upper()}, which is not being run")
            configs[head.upper()] = override(configs[head.upper()], rest, value)
        else:
            touched = [name for name in configs if _has_field(configs[name], key)]
            if not touched:
                raise InputError(f"no chosen experiment has a setting {key!r}")
            for name in touched:
                configs[name] = override(configs[name], key, value)
    for name, config in configs.items():
        _check_config(name, config)
    return configs


def _check_config(name: str, config: Any) -> None:
    """InputError, before any work, for a grid left empty or a recipe's own ``validate`` refusal."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, tuple) and not value:
            raise InputError(f"{name}.{item.name} is empty: the experiment needs at least one value")
    validate = getattr(EXPERIMENTS[name], "validate", None)
    if validate is not None:
        validate(config)


def smoke_configs() -> dict[str, Any]:
    """The quick configs shrunk to seconds per experiment (see the module docstring)."""
    quick = {name: module.default_config("quick") for name, module in EXPERIMENTS.items()}
    data = quick_data(n=40)
    mlp = ModelConfig("mlp", {"width": 8, "activation": "tanh"})
    measure = MeasureConfig(num_probes=8, density=True, density_probes=1, density_steps=8)
    return {
        "E1": dataclasses.replace(
            quick["E1"],
            data=data,
            max_steps=40,
            measure_every=20,
            families=(
                ModelConfig("linear", label="linear"),
                ModelConfig("vgg", {"depth": [1], "width": 2}, label="CNN"),
            ),
            lrs=(0.002, 0.01),
            multiclass_data=(quick_data(n=20, classes=None, targets="onehot"),),
            multiclass_families=(ModelConfig("mlp", {"width": 4, "activation": "tanh"}),),
            multiclass_lrs=(0.05,),
            multiclass_max_steps=40,
            multiclass_measure_every=20,
            # One seed: its CNN and the full-scale smoke nets dominate the suite (seeds: tested on records).
            seeds=(0,),
        ),
        "E2": dataclasses.replace(
            quick["E2"],
            data=data,
            model=mlp,
            lrs=(0.05, 0.1, 50.0),
            batch_sizes=(4,),
            max_steps=600,
            loss_goal=1e-2,
            measure=measure,
            start_lr=None,  # the common-start path is exercised by test_binding_regime with its own start
        ),
        "E3": dataclasses.replace(
            quick["E3"],
            data=dataclasses.replace(quick["E3"].data, n=40),
            model=mlp,
            widths=(4, 8),
            ns=(20,),
            scan_width=8,
            seeds=(0,),
            warmup_steps=50,
            max_steps=600,
            gd_warmup_steps=20,
            gd_max_steps=600,
            loss_goal=1e-2,
            measure=measure,
        ),
        "E4": dataclasses.replace(
            quick["E4"],
            data=data,
            model=mlp,
            gd_lr=0.05,
            gd_loss_goal=1e-3,
            escape_steps=8,
            fit_start=2,
            repeats=3,
            linearized_chains=20,
            bootstrap=20,
            settle_steps=600,
            settle_loss_goal=1e-2,
            measure=measure,
        ),
        "E5": dataclasses.replace(
            quick["E5"],
            data=quick_data(n=30),
            model=mlp,
            minima=(Minimum("GD", 0.05),),
            batch_sizes=(2,),
            loss_goal=1e-3,
            simulation_steps=20,
            simulation_chains=20,
            bisection_steps=2,
        ),
    }


def _has_field(config: Any, key: str) -> bool:
    head, _, rest = key.partition(".")
    if head not in {f.name for f in dataclasses.fields(config)}:
        return False
    return (
        not rest
        or not dataclasses.is_dataclass(getattr(config, head))
        or _has_field(getattr(config, head), rest)
    )


def reproduce(
    out: str | os.PathLike,
    scale: str = "quick",
    only: Sequence[str] | None = None,
    data_dir: str | None = None,
    device: str | None = None,
    overrides: Iterable[str] = (),
    progress: Progress = no_progress,
    executor: Executor | None = None,
) -> dict[str, dict]:
    """Run the chosen experiments into ``out`` (resuming finished runs) and write the report there.

    ``executor`` (``sgdstab.sweeps``): where each recipe's independent runs train, stage after
    stage (E2: its common start, then the grid; E4: GD, then the escapes); None trains them in
    this process, one after another. Analyses, curvature scans and the report run here.

    ``out/config.json`` keeps every experiment's scale and config (merged with earlier calls
    that ran other experiments into the same folder); an experiment's entry is written once its
    analysis is, so the file never describes results that are not there. Each analysis.json also
    records its scale. One ``reproduce`` at a time writes ``out``: a second one is refused with a
    RunFolderError naming the holder (``sgdstab.io.FolderLock``). Returns the analysis of each
    experiment run.
    """
    configs = configure(scale, only, data_dir, device, overrides)
    out = make_folder(out)
    with FolderLock(out):
        # What a killed write left in the suite's own folders (run folders clean up as they resume).
        for folder in (out, out / FIGURES_DIR, *(out / name for name in configs)):
            remove_temporaries(folder)
        reporting = suite_progress.set(progress)
        try:
            analyses = _run_and_record(out, scale, configs, progress, executor)
        finally:
            suite_progress.reset(reporting)
        write_report(out)
    return analyses


def _run_and_record(
    out: Path, scale: str, configs: dict[str, Any], progress: Progress, executor: Executor | None
) -> dict[str, dict]:
    """Run each experiment, then record its scale in its analysis and its config in the suite's."""
    analyses = {}
    for name, config in configs.items():
        analysis = {**EXPERIMENTS[name].run(config, out, progress, executor), "scale": scale}
        analyses[name] = save_analysis(out, name, analysis)
        suite_path = out / SUITE_CONFIG
        suite = read_json(suite_path) if suite_path.exists() else {"experiments": {}}
        suite["experiments"][name] = {"scale": scale, "config": to_dict(config)}
        write_json_atomic(suite_path, suite)
    return analyses
