"""Mulayoff & Michaeli (2023): their necessary conditions (15), (16) and (24) (SPEC.md section 3).

R. Mulayoff and T. Michaeli, "Exact mean square linear stability analysis for SGD", COLT 2023.
Each function takes the second-moment map of a minimum (``second_moment.SecondMomentMap``) and
returns the largest learning rate its condition allows; the exact threshold eta* lies below all three.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch

from sgdstab.stability.second_moment import SecondMomentMap

#: Starting directions for maximising Mulayoff & Michaeli's (24), from each family.
_MULAYOFF24_STARTS = 4


def mulayoff15_threshold(second_moment: SecondMomentMap) -> float:
    """Mulayoff & Michaeli (2023), their (15): 2l / (l^2 + (p_B/n) sum_i (v^T H_i v - l)^2).

    l = lambda_max(H), v its eigenvector.
    """
    top = second_moment.rank - 1
    top_curvature = second_moment.curvature[top].item()
    along = second_moment.sample_factors[:, :, top].pow(2).sum(dim=1)  # v^T H_i v = ||M_i v||^2
    spread = (along - top_curvature).pow(2).sum().item()
    return (
        2
        * top_curvature
        / (top_curvature**2 + second_moment.batch_noise / second_moment.num_samples * spread)
    )


def mulayoff16_threshold(second_moment: SecondMomentMap) -> float:
    """Mulayoff & Michaeli (2023), their (16): 2 tr H / ((1 - p_B) ||H||_F^2 + (p_B/n) sum_i ||H_i||_F^2)."""
    factors = second_moment.sample_factors
    # ||H_i||_F = ||M_i^T M_i||_F = ||M_i M_i^T||_F, a C x C matrix.
    per_sample = torch.bmm(factors, factors.transpose(1, 2)).pow(2).sum().item()
    denominator = (1 - second_moment.batch_noise) * second_moment.curvature.pow(2).sum().item()
    denominator += second_moment.batch_noise / second_moment.num_samples * per_sample
    return 2 * second_moment.curvature.sum().item() / denominator


def mulayoff24_threshold(second_moment: SecondMomentMap) -> float:
    """Mulayoff & Michaeli (2023), their (24): 2/eta* >= max_{|v|=1} v^T H v + p_B Var_i(v^T H_i v) / v^T H v.

    Var_i is the mean over samples of (v^T H_i v - v^T H v)^2. Every v gives a valid necessary
    condition, so the maximum found by L-BFGS on phi(a)/|a|^2 over the row space, from the top
    eigenvectors of H and the top singular vectors of the sharpest samples' M_i, is a bound
    whatever the optimiser's luck; from the top eigenvector it is already their (15).
    """
    n, p_b, curvature = second_moment.num_samples, second_moment.batch_noise, second_moment.curvature
    factors = second_moment.sample_factors

    def negative_objective(point: np.ndarray) -> tuple[float, np.ndarray]:
        a = torch.as_tensor(point, dtype=curvature.dtype, device=curvature.device)
        outputs = factors @ a  # M_i a, (n, C)
        along = outputs.pow(2).sum(dim=1)
        mean = (curvature * a**2).sum()
        deviation = along - mean  # sums to zero: mean is the average of v^T H_i v
        variance = deviation.pow(2).mean()
        phi = mean + p_b * variance / mean
        grad_mean = 2 * curvature * a
        # sum_i deviation_i M_i^T (M_i a) as one matrix-vector product: no (n, C, r) temporary.
        weighted = (deviation[:, None] * outputs).reshape(-1)
        grad_variance = (4 / n) * (factors.reshape(weighted.numel(), -1).T @ weighted)
        grad_phi = grad_mean + p_b * (grad_variance / mean - variance * grad_mean / mean**2)
        norm_sq = a @ a
        value = phi / norm_sq
        grad = grad_phi / norm_sq - 2 * value * a / norm_sq
        return -value.item(), -grad.cpu().numpy()

    starts = []
    for index in range(second_moment.rank - 1, max(second_moment.rank - 1 - _MULAYOFF24_STARTS, -1), -1):
        starts.append(torch.zeros(second_moment.rank, dtype=curvature.dtype))
        starts[-1][index] = 1.0
    sharpest = torch.linalg.matrix_norm(factors).argsort(descending=True)[:_MULAYOFF24_STARTS]
    starts += [torch.linalg.svd(factors[i], full_matrices=False).Vh[0].cpu() for i in sharpest.tolist()]
    best = 0.0
    for start in starts:
        initial = -negative_objective(start.numpy())[0]
        found = scipy.optimize.minimize(negative_objective, start.numpy(), jac=True, method="L-BFGS-B")
        best = max(best, initial, -found.fun)
    return 2 / best
