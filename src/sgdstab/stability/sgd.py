"""SGD's own numbers in the stability analysis (SPEC.md section 1).

The mini-batch noise factor p_B, and the checks of a learning rate, batch size and sampling.
"""

from __future__ import annotations

from sgdstab._checks import SAMPLINGS, check_sgd_arguments

__all__ = ["SAMPLINGS", "batch_noise_factor", "check_sgd_arguments"]


def batch_noise_factor(num_samples: int, batch_size: int, sampling: str) -> float:
    """p_B: mini-batch noise covariance is p_B Sigma (SPEC.md section 1).

    1/B with replacement; (n - B)/(B (n - 1)) without (0 when B = n: every batch is the full data).
    """
    _, batch_size = check_sgd_arguments(num_samples, 1.0, batch_size, sampling)
    if sampling == "with_replacement":
        return 1.0 / batch_size
    if batch_size == num_samples:
        return 0.0
    return (num_samples - batch_size) / (batch_size * (num_samples - 1))
