"""The pieces every recipe config is made of, the two scales, and overrides from the command line.

A recipe config is a frozen dataclass built from ``DataConfig`` and ``ModelConfig`` plus its own
hyperparameters; ``to_dict`` turns it into the JSON written to ``config.json``, and
``override(config, "data.n", "500")`` returns a copy with one field replaced (the value is parsed
as JSON, so ``"[0.05, 0.1]"`` is a list and ``"null"`` is None).

Scales: "quick" is a CPU laptop budget (MNIST subset, 2 classes with +-1 targets so nC = n,
small fully connected and convolutional nets); "full" is CIFAR-10 with VGG/ResNet-style nets for a
GPU. The paper's own hyperparameters are not known (SPEC.md section 4): the presets are choices,
recorded in every run's config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from sgdstab.errors import InputError
from sgdstab.run_spec import DTYPES as DTYPES
from sgdstab.run_spec import DataConfig as DataConfig
from sgdstab.run_spec import ModelConfig as ModelConfig

SCALES = ("quick", "full")


@dataclass(frozen=True)
class MeasureConfig:
    """Arguments of ``sgdstab.summary.curvature_summary`` at the end of a run.

    Hutchinson's ``num_probes`` per estimate; ``alignment`` "exact" builds the nC x nC NTK (cheap
    at nC <= a few thousand), "stochastic" never does.
    """

    top_k: int = 5
    num_probes: int = 50
    density: bool = False
    density_probes: int = 4
    density_steps: int = 80
    alignment: str = "exact"
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def quick_data(**changes: Any) -> DataConfig:
    """MNIST 0 vs 1 with +-1 targets: nC = n keeps the dense sample-space analyses cheap."""
    return dataclasses.replace(DataConfig(name="mnist", n=500, classes=(0, 1), targets="pm1"), **changes)


def full_data(**changes: Any) -> DataConfig:
    """CIFAR-10 airplane vs automobile, +-1 targets (the 2-class CIFAR-10 of Wu, Ma & E 2018)."""
    return dataclasses.replace(DataConfig(name="cifar10", n=2000, classes=(0, 1), targets="pm1"), **changes)


def preset(scale: str, quick: Any, full: Any) -> Any:
    if scale not in SCALES:
        raise InputError(f"unknown scale {scale!r}; choose one of {SCALES}")
    return quick if scale == "quick" else full


# ------------------------------------------------------------------------------------- to and from JSON
def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def override(config: Any, key: str, value: str) -> Any:
    """A copy of ``config`` with the dotted field ``key`` set to ``value`` parsed as JSON.

    A bare word that is not JSON (``mlp``, ``cifar10``) is taken as a string. Lists become
    tuples where the field holds a tuple. Raises InputError naming the valid fields.
    """
    head, _, rest = key.partition(".")
    names = [f.name for f in dataclasses.fields(config)]
    if head not in names:
        raise InputError(f"{type(config).__name__} has no field {head!r}; its fields are {names}")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            if isinstance(current, dict):
                return dataclasses.replace(config, **{head: {**current, rest: _parse(value)}})
            raise InputError(f"{type(config).__name__}.{head} is not a group of settings: drop '.{rest}'")
        return dataclasses.replace(config, **{head: override(current, rest, value)})
    if dataclasses.is_dataclass(current):
        raise InputError(
            f"{type(config).__name__}.{head} is a group of settings: set one of its fields, e.g. {head}.<field>"
        )
    parsed = _parse(value)
    return dataclasses.replace(config, **{head: _like(current, parsed, key)})


def _parse(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _like(current: Any, parsed: Any, key: str) -> Any:
    """Coerce a parsed JSON value to the kind of the field's current value, refusing a mismatch."""
    if dataclasses.is_dataclass(current) and isinstance(parsed, dict):
        cls: Any = type(current)
        try:
            return cls(**parsed)
        except TypeError as err:
            raise InputError(f"{key}: {err}") from None
    if isinstance(current, tuple) and isinstance(parsed, list):
        return tuple(_like(current[0], item, key) if current else item for item in parsed)
    if isinstance(current, tuple) and not isinstance(parsed, list):
        raise InputError(f"{key} is a list: write it as JSON, e.g. [1, 2]")
    if isinstance(current, bool) or parsed is None or current is None:
        return parsed
    if isinstance(current, float) and isinstance(parsed, int):
        return float(parsed)
    if isinstance(current, (int, float, str)) and not isinstance(parsed, type(current)):
        raise InputError(f"{key} takes a value of type {type(current).__name__}, got {parsed!r}")
    return parsed
