"""Estimators over any symmetric ``LinearOperator``: extreme eigenpairs (Lanczos, power
iteration), trace (Hutchinson, Hutch++, XTrace), Frobenius norm (Hutchinson), spectral density
(stochastic Lanczos quadrature), and their exact dense counterparts for small operators.

Each returns a frozen result carrying its error estimate and ``num_matvecs``, the number of
operator applications it cost.
"""

from sgdstab.estimators.dense import (
    exact_eigenvalues,
    exact_frobenius_norm,
    exact_spectral_density,
    exact_trace,
)
from sgdstab.estimators.epperly2024xtrace import xtrace, xtrace_to_error
from sgdstab.estimators.hutchinson import frobenius_norm, trace
from sgdstab.estimators.lanczos import LanczosProcess, top_eigenvalues
from sgdstab.estimators.meyer2020hutchpp import hutchpp_trace
from sgdstab.estimators.power_iteration import power_iteration
from sgdstab.estimators.results import DensityResult, EigenResult, FrobeniusResult, TraceResult
from sgdstab.estimators.slq import spectral_density

__all__ = [
    "DensityResult",
    "EigenResult",
    "FrobeniusResult",
    "LanczosProcess",
    "TraceResult",
    "exact_eigenvalues",
    "exact_frobenius_norm",
    "exact_spectral_density",
    "exact_trace",
    "frobenius_norm",
    "hutchpp_trace",
    "power_iteration",
    "spectral_density",
    "top_eigenvalues",
    "trace",
    "xtrace",
    "xtrace_to_error",
]
