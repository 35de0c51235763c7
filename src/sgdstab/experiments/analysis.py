"""Verdicts of the recipes: one line per check, the overall verdict, and ``analysis.json``.

Each recipe's ``analyse`` turns its run records into checks (``check``), an overall verdict
(``overall``: holds, fails, or undecided when the data cannot decide) and saves them with
``save_analysis`` as ``<root>/<experiment>/analysis.json``, which the report renders.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from sgdstab.experiments.config import to_dict
from sgdstab.io import write_json_atomic
from sgdstab.problem import Problem
from sgdstab.stability import StabilityResult, stability

ANALYSIS_FILE = "analysis.json"


def check(claim: str, holds: bool | None, detail: str) -> dict:
    """One verdict line: ``holds`` is None when the data cannot decide (e.g. no run converged)."""
    return {"claim": claim, "holds": holds, "detail": detail}


def over_seeds(seeds: tuple[int, ...], claim: str, verdicts: list[tuple[bool | None, str]]) -> dict:
    """One check from per-seed verdicts ``(holds, detail)``: holds when it holds on every seed.

    The detail starts with "k/m seeds" (k the seeds where it holds), then each seed's own detail;
    the check is undecided (None) when no seed fails but some cannot decide.
    """
    decided = [v for v, _ in verdicts if v is not None]
    passed = sum(decided)
    holds = None if len(decided) < len(verdicts) and passed == len(decided) else passed == len(verdicts)
    details = "; ".join(f"seed {seed}: {detail}" for seed, (_, detail) in zip(seeds, verdicts, strict=True))
    result = check(claim, holds, f"{passed}/{len(verdicts)} seeds. {details}")
    result["seeds_passed"], result["seeds"] = passed, len(verdicts)
    return result


def overall(checks: list[dict]) -> bool | None:
    """True when every check holds, False when any fails, None when none fails but one is undecided."""
    verdicts = [c["holds"] for c in checks]
    if False in verdicts:
        return False
    return None if None in verdicts else True


def verdict(experiment: str, title: str, claim: str, checks: list[dict], config: Any, **details: Any) -> dict:
    """A recipe's analysis: what it tested, its checks and overall verdict, its config, and its data."""
    return {
        "experiment": experiment,
        "title": title,
        "claim": claim,
        "holds": overall(checks),
        "checks": checks,
        "config": to_dict(config),
        **details,
    }


def save_analysis(root: str | os.PathLike, experiment: str, analysis: dict) -> dict:
    """Write ``<root>/<experiment>/analysis.json`` (what the report renders) and return it."""
    write_json_atomic(Path(root) / experiment / ANALYSIS_FILE, analysis)
    return analysis


def quiet_stability(problem: Problem, **kwargs) -> StabilityResult:
    """``stability`` with its "not a minimum" warning kept in the result instead of printed.

    The recipes store the result's ``warnings``; a run stopped at its loss goal is near, not at,
    loss 0, so the warning is expected there.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stability(problem, **kwargs)
