"""The Frobenius bound and the escape factor of Wu, Wang & Su (2022) (SPEC.md section 3).

L. Wu, M. Wang and W. J. Su, "The alignment property of SGD noise and how it helps select flat
minima: a stability analysis", NeurIPS 2022. One step of linearised SGD from a minimum gives
E L~_{t+1} >= eta^2 p_B mu ||H||_F^2 L~_t, with mu the alignment factor of the current residual
(SPEC.md section 2). Two readings of the same inequality, kept apart by name:

- ``frobenius_bound``: the paper's form, a bound on the minimum, ||H||_F <= 1/(eta sqrt(p_B mu))
  (= sqrt(B/mu)/eta with replacement), with the measured mu of the minimum;
- ``frobenius_criterion``: a bound on the learning rate, eta* <= 1/(||H||_F sqrt(p_B mu_min)),
  which with the worst-case mu_min over range(K) is a rigorous necessary condition for linear
  stability.

``escape_factor`` is the one-step factor itself: above 1, E L~_t >= factor^t L~_0.
"""

from __future__ import annotations

import math


def frobenius_bound(lr: float, batch_noise: float, mu: float) -> float:
    """1 / (eta sqrt(p_B mu)): the largest ||H||_F of a minimum linearly stable for SGD (Wu, Wang & Su 2022).

    ``sqrt(B/mu)/eta`` with replacement; math.inf when p_B mu = 0 (no noise, or no alignment).
    """
    return math.inf if batch_noise * mu <= 0 else 1 / (lr * math.sqrt(batch_noise * mu))


def frobenius_criterion(hessian_frobenius: float, batch_noise: float, mu_min: float) -> float:
    """1 / (||H||_F sqrt(p_B mu_min)): the largest lr the Frobenius condition allows (Wu, Wang & Su 2022).

    With the worst-case alignment ``mu_min`` (``sample_space.worst_case_alignment``) every
    linearly stable learning rate lies below it (SPEC.md section 3); math.inf when p_B mu_min = 0.
    """
    denominator = hessian_frobenius * math.sqrt(batch_noise * max(mu_min, 0.0))
    return math.inf if denominator <= 0 else 1 / denominator


def escape_factor(lr: float, hessian_frobenius: float, batch_noise: float, mu: float) -> float:
    """eta^2 p_B mu ||H||_F^2, the least one-step growth of E L~ (Wu, Wang & Su 2022).

    With ``mu = mu_min`` it bounds every step: when it exceeds 1, E L~_t >= factor^t L~_0
    (SPEC.md section 3); with the measured mu it is the paper's estimate of the escape rate.
    """
    return lr**2 * batch_noise * mu * hessian_frobenius**2


def escape_learning_rate(factor: float, hessian_frobenius: float, batch_noise: float, mu: float) -> float:
    """The lr whose ``escape_factor`` is ``factor``: sqrt(factor) / (||H||_F sqrt(p_B mu))."""
    return math.sqrt(factor / (batch_noise * mu * hessian_frobenius**2))
