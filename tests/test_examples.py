"""The scripts under examples/ run as users will run them (at their tiny size)."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_analyse_a_minimum_finds_the_minimum_sgd_trained_to_stable() -> None:
    main = runpy.run_path(str(EXAMPLES / "analyse_a_minimum.py"))["main"]
    figures = main(tiny=True)
    assert figures["loss"] <= 1e-4
    # SGD converged at this (lr, B), so the minimum it found must be linearly stable there.
    assert figures["exact_threshold"] >= 0.05
    assert figures["growth_factor"] <= 1 + 1e-6
    assert 0 < figures["mu"] < 2
