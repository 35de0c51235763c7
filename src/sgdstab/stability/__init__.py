"""Linear stability of SGD at a square-loss minimum, in sample space (SPEC.md section 3).

Modules, named after what they hold or after the paper they implement (as curvlinops does):

- ``sgd``: p_B and the checks of SGD's learning rate, batch size and sampling;
- ``second_moment``: the second-moment map T, the exact threshold eta* and rho(T);
- ``criteria``: the registry of every stability criterion (name, kind, citation, threshold),
  with the closed forms of GD (Cohen et al. 2021) and the trace (Wu & Su 2023);
- ``mulayoff2023``: Mulayoff & Michaeli's (15), (16), (24); ``wu2018``: Wu, Ma & E's one-step
  condition; ``wu2022``: the Frobenius bound and criterion and the escape factor of Wu, Wang & Su;
- ``analysis``: ``stability()``, which fills every threshold from the registry;
- ``simulation``: Monte Carlo chains of linearised SGD.
"""

from sgdstab.stability.analysis import StabilityResult, stability
from sgdstab.stability.criteria import (
    CRITERIA,
    KINDS,
    STABILITY_CRITERIA,
    Criterion,
    all_thresholds,
    criteria_of_kind,
    exact_threshold,
    gd_threshold,
    trace_threshold,
)
from sgdstab.stability.mulayoff2023 import mulayoff15_threshold, mulayoff16_threshold, mulayoff24_threshold
from sgdstab.stability.second_moment import DENSE_EIGEN_MAX_DIM, EIGEN_SOLVERS, SecondMomentMap
from sgdstab.stability.sgd import SAMPLINGS, batch_noise_factor, check_sgd_arguments
from sgdstab.stability.simulation import SimulationResult, simulate_linearized_sgd
from sgdstab.stability.wu2018 import wme_threshold
from sgdstab.stability.wu2022 import escape_factor, escape_learning_rate, frobenius_bound, frobenius_criterion

__all__ = [
    "CRITERIA",
    "DENSE_EIGEN_MAX_DIM",
    "EIGEN_SOLVERS",
    "KINDS",
    "SAMPLINGS",
    "STABILITY_CRITERIA",
    "Criterion",
    "SecondMomentMap",
    "SimulationResult",
    "StabilityResult",
    "all_thresholds",
    "batch_noise_factor",
    "check_sgd_arguments",
    "criteria_of_kind",
    "escape_factor",
    "escape_learning_rate",
    "exact_threshold",
    "frobenius_bound",
    "frobenius_criterion",
    "gd_threshold",
    "mulayoff15_threshold",
    "mulayoff16_threshold",
    "mulayoff24_threshold",
    "simulate_linearized_sgd",
    "stability",
    "trace_threshold",
    "wme_threshold",
]
