"""sgdstab: curvature, SGD noise alignment and linear stability of SGD for PyTorch models.

Implements Wu, Wang & Su, "The alignment property of SGD noise and how it helps select flat
minima: a stability analysis" (NeurIPS 2022); see README.md for a tour.
"""

from sgdstab.alignment import AlignmentResult, alignment
from sgdstab.data import DatasetNotFoundError, load_dataset
from sgdstab.errors import (
    DataError,
    DataNotFoundError,
    InputError,
    ResourceLimitError,
    RunFolderError,
    SgdstabError,
)
from sgdstab.estimators import (
    exact_eigenvalues,
    exact_frobenius_norm,
    exact_spectral_density,
    exact_trace,
    frobenius_norm,
    hutchpp_trace,
    power_iteration,
    spectral_density,
    top_eigenvalues,
    trace,
)
from sgdstab.io import RunFolder
from sgdstab.models import build_model
from sgdstab.monitor import Monitor
from sgdstab.operators import DenseOperator, LinearOperator, gauss_newton, hessian, noise_covariance, ntk
from sgdstab.problem import Problem, ProblemError
from sgdstab.stability import (
    SimulationResult,
    StabilityResult,
    batch_noise_factor,
    simulate_linearized_sgd,
    stability,
)
from sgdstab.summary import CurvatureSummary, curvature_summary
from sgdstab.training import TrainResult, train

__all__ = [
    "DataError",
    "DataNotFoundError",
    "InputError",
    "ResourceLimitError",
    "RunFolderError",
    "SgdstabError",
    "AlignmentResult",
    "CurvatureSummary",
    "SimulationResult",
    "StabilityResult",
    "alignment",
    "batch_noise_factor",
    "curvature_summary",
    "simulate_linearized_sgd",
    "stability",
    "DatasetNotFoundError",
    "DenseOperator",
    "LinearOperator",
    "Monitor",
    "Problem",
    "ProblemError",
    "RunFolder",
    "TrainResult",
    "build_model",
    "exact_eigenvalues",
    "exact_frobenius_norm",
    "exact_spectral_density",
    "exact_trace",
    "frobenius_norm",
    "gauss_newton",
    "hessian",
    "hutchpp_trace",
    "load_dataset",
    "noise_covariance",
    "ntk",
    "power_iteration",
    "spectral_density",
    "top_eigenvalues",
    "trace",
    "train",
]
__version__ = "0.1.0"
