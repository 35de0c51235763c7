"""sgdstab: curvature, SGD noise alignment and linear stability of SGD for PyTorch models."""
from sgdstab.problem import Problem, ProblemError

__all__ = ["Problem", "ProblemError"]
__version__ = "0.1.0"
