"""SGD's own numbers in the stability analysis (SPEC.md section 1).

The mini-batch noise factor p_B, and the checks of a learning rate, batch size and sampling.
"""

from __future__ import annotations

import math
import numbers

from sgdstab.errors import InputError

SAMPLINGS = ("with_replacement", "without_replacement")


def batch_noise_factor(num_samples: int, batch_size: int, sampling: str) -> float:
    """p_B: mini-batch noise covariance is p_B Sigma (SPEC.md section 1).

    1/B with replacement; (n - B)/(B (n - 1)) without (0 when B = n: every batch is the full data).
    """
    check_sgd_arguments(num_samples, 1.0, batch_size, sampling)
    if sampling == "with_replacement":
        return 1.0 / batch_size
    if batch_size == num_samples:
        return 0.0
    return (num_samples - batch_size) / (batch_size * (num_samples - 1))


def check_sgd_arguments(num_samples: int, lr: float, batch_size: int, sampling: str) -> None:
    """ValueError with a one-line reason for a learning rate, batch size or sampling SGD cannot use."""
    if isinstance(lr, bool) or not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive finite number, got {lr!r}")
    integral = isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
    if not (integral and 1 <= batch_size <= num_samples):
        raise InputError(f"batch_size must be an integer between 1 and n={num_samples}, got {batch_size!r}")
    if sampling not in SAMPLINGS:
        raise InputError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
