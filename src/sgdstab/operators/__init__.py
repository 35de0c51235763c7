"""Matrix-free curvature operators on flat parameter (or sample-space) vectors."""

from sgdstab.operators.base import DenseOperator, LinearOperator, ProblemOperator
from sgdstab.operators.gauss_newton import GaussNewtonOperator, gauss_newton
from sgdstab.operators.hessian import HESSIAN_BACKENDS, HessianOperator, hessian
from sgdstab.operators.noise_covariance import NoiseCovarianceOperator, noise_covariance
from sgdstab.operators.ntk import NTKOperator, ntk

__all__ = [
    "DenseOperator",
    "LinearOperator",
    "ProblemOperator",
    "GaussNewtonOperator",
    "gauss_newton",
    "HESSIAN_BACKENDS",
    "HessianOperator",
    "hessian",
    "NoiseCovarianceOperator",
    "noise_covariance",
    "NTKOperator",
    "ntk",
]
