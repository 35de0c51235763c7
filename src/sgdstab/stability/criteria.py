"""Every SGD stability criterion of SPEC.md section 3, as data.

One registry, read by ``stability()``, the experiments (E5's ordering check and its claim), the
report and the tests.

Each entry names a criterion, says what kind of statement it is about the exact threshold eta*,
cites its source and computes its threshold (the largest stable learning rate it allows) from the
second-moment map of a minimum. Adding a criterion is adding one entry.

Kinds:
- "exact": eta* itself;
- "necessary": every stable lr lies below it, so eta* <= threshold;
- "sufficient": every lr below it is stable, so threshold <= eta*;
- "reported": the paper's own criterion, with no proven order against eta* here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sgdstab.errors import InputError
from sgdstab.stability.mulayoff2023 import mulayoff15_threshold, mulayoff16_threshold, mulayoff24_threshold
from sgdstab.stability.second_moment import SecondMomentMap
from sgdstab.stability.wu2018 import wme_threshold
from sgdstab.stability.wu2022 import frobenius_criterion

KINDS = ("exact", "necessary", "sufficient", "reported")


def exact_threshold(second_moment: SecondMomentMap) -> float:
    """eta* = 1 / lambda_max(A^+ D) (Ma & Ying 2021; Mulayoff & Michaeli 2023): ``SecondMomentMap.threshold``."""
    return second_moment.threshold()


def gd_threshold(lambda_max: float) -> float:
    """2 / lambda_max(H): the stability edge of gradient descent (Cohen et al., ICLR 2021)."""
    return 2 / lambda_max


def trace_threshold(trace: float, batch_noise: float) -> float:
    """2 / (p_B tr H): the trace criterion tr H <= 2/(p_B eta) in its form for general B (Wu & Su 2023)."""
    denominator = batch_noise * trace
    return math.inf if denominator <= 0 else 2 / denominator


@dataclass(frozen=True)
class Criterion:
    """One stability criterion.

    name: its key in ``StabilityResult.thresholds`` and in every table.
    kind: "exact", "necessary", "sufficient" or "reported" (module docstring).
    label: a short column header. title: the words a claim uses for it.
    citation: the paper it comes from.
    threshold: the largest stable lr it allows at the minimum of a second-moment map.
    """

    name: str
    kind: str
    label: str
    title: str
    citation: str
    threshold: Callable[[SecondMomentMap], float]


STABILITY_CRITERIA: dict[str, Criterion] = {
    criterion.name: criterion
    for criterion in (
        Criterion(
            "exact",
            "exact",
            "eta*",
            "the exact threshold eta*",
            "Ma & Ying 2021; Mulayoff & Michaeli 2023",
            exact_threshold,
        ),
        Criterion(
            "frobenius",
            "necessary",
            "frobenius",
            "Frobenius with mu_min",
            "Wu, Wang & Su 2022",
            lambda second_moment: frobenius_criterion(
                second_moment.hessian_frobenius, second_moment.batch_noise, second_moment.mu_min
            ),
        ),
        Criterion(
            "gd",
            "necessary",
            "gd",
            "GD 2/lambda_max",
            "Cohen et al. 2021",
            lambda second_moment: gd_threshold(second_moment.lambda_max),
        ),
        Criterion(
            "trace",
            "reported",
            "trace",
            "trace 2/(p_B tr H)",
            "Wu & Su 2023",
            lambda second_moment: trace_threshold(second_moment.trace, second_moment.batch_noise),
        ),
        Criterion(
            "mulayoff15",
            "necessary",
            "(15)",
            "Mulayoff-Michaeli (15)",
            "Mulayoff & Michaeli 2023, their (15)",
            mulayoff15_threshold,
        ),
        Criterion(
            "mulayoff16",
            "necessary",
            "(16)",
            "Mulayoff-Michaeli (16)",
            "Mulayoff & Michaeli 2023, their (16)",
            mulayoff16_threshold,
        ),
        Criterion(
            "mulayoff24",
            "necessary",
            "(24)",
            "Mulayoff-Michaeli (24)",
            "Mulayoff & Michaeli 2023, their (24)",
            mulayoff24_threshold,
        ),
        Criterion(
            "wme",
            "sufficient",
            "wme",
            "Wu-Ma-E",
            "Wu, Ma & E 2018",
            wme_threshold,
        ),
    )
}
#: The names of every criterion, in the registry's order (the keys of ``StabilityResult.thresholds``).
CRITERIA = tuple(STABILITY_CRITERIA)


def criteria_of_kind(kind: str) -> tuple[str, ...]:
    """The names of the criteria of one kind ("exact", "necessary", "sufficient" or "reported")."""
    if kind not in KINDS:
        raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
    return tuple(name for name, criterion in STABILITY_CRITERIA.items() if criterion.kind == kind)


def all_thresholds(second_moment: SecondMomentMap) -> dict[str, float]:
    """The threshold of every criterion at the minimum of ``second_moment``, in the registry's order."""
    return {name: criterion.threshold(second_moment) for name, criterion in STABILITY_CRITERIA.items()}
