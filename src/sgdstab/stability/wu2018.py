"""The one-step stability condition of Wu, Ma & E (2018) (SPEC.md section 3).

L. Wu, C. Ma and W. E, "How SGD selects the global minima in over-parameterized learning: a
dynamical stability perspective", NeurIPS 2018. Their sharpness a = lambda_max(H) and
non-uniformity s = sqrt(lambda_max(Sigma_H)); the one-step condition below is sufficient for
linear stability only, and s <= 1/(eta sqrt(p_B)) is not a true necessary condition (SPEC.md
reports it as their criterion, not as a bound).
"""

from __future__ import annotations

import torch

from sgdstab.sample_space import block_congruence
from sgdstab.stability.second_moment import SecondMomentMap


def wme_threshold(second_moment: SecondMomentMap) -> float:
    """Wu, Ma & E (2018): the largest eta with lambda_max((I - eta H)^2 + eta^2 p_B Sigma_H) <= 1.

    Sigma_H = (1/n) sum_i H_i^2 - H^2. This one-step condition (E||delta_{t+1}||^2 <= ||delta_t||^2
    for every delta) is SUFFICIENT for linear stability only, so this threshold lies below the
    exact one. It rearranges to eta [(1 - p_B) H^2 + p_B (1/n) sum_i H_i^2] <= 2H, i.e.
    eta <= 2 / lambda_max(H^{-1/2} [...] H^{-1/2}) in closed form (what bisection would find);
    in the row-space basis H^{-1/2} (1/n) sum_i H_i^2 H^{-1/2} = sum_i V_i^T (M_i M_i^T) V_i.
    """
    factors = second_moment.sample_factors
    blocks = torch.bmm(factors, factors.transpose(1, 2))
    matrix = second_moment.batch_noise * block_congruence(second_moment.spectrum.vectors, blocks)
    matrix = matrix + torch.diag((1 - second_moment.batch_noise) * second_moment.curvature)
    return 2 / torch.linalg.eigvalsh((matrix + matrix.T) / 2)[-1].item()
