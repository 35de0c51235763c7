"""Monte Carlo runs of linearised SGD at a minimum, in sample space (SPEC.md section 3).

The empirical counterpart of the growth factor rho(T) and of the exact threshold eta*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sgdstab.errors import DataError, InputError
from sgdstab.problem import Problem
from sgdstab.sample_space import (
    DEFAULT_MAX_GRAM_ENTRIES,
    DEFAULT_MAX_JACOBIAN_ENTRIES,
    GramSpectrum,
    build_gram_spectrum,
    check_spectrum_matches,
    gram_matrix,
)
from sgdstab.stability.sgd import check_sgd_arguments


@dataclass(frozen=True)
class SimulationResult:
    """E L~_t of linearised SGD from a minimum, over independent chains.

    loss_mean, loss_stderr: (num_steps + 1,) float64, the mean over chains of
        L~_t = ||u_t||^2 / (2n) and its standard error (chain standard deviation / sqrt(chains)).
    growth_factor: (loss_mean[-1] / loss_mean[h])^(1 / (num_steps - h)), h = num_steps // 2: the
        empirical per-step factor after the first half; it tends to rho(T) as the run lengthens,
        slowly when rho comes from flat modes, which weigh little in L~.
    """

    loss_mean: Tensor
    loss_stderr: Tensor
    growth_factor: float
    lr: float
    batch_size: int
    sampling: str
    num_chains: int


def _batch_weights(
    num_chains: int, num_samples: int, batch_size: int, sampling: str, generator: torch.Generator
) -> Tensor:
    """(chains, n): how many times each sample is in each chain's batch, divided by B."""
    if sampling == "with_replacement":
        picks = torch.randint(num_samples, (num_chains, batch_size), generator=generator)
    else:
        picks = torch.rand(num_chains, num_samples, generator=generator).argsort(dim=1)[:, :batch_size]
    counts = torch.zeros(num_chains, num_samples, dtype=torch.float64)
    counts.scatter_add_(1, picks, torch.ones(num_chains, batch_size, dtype=torch.float64))
    return counts / batch_size


def simulate_linearized_sgd(
    problem: Problem,
    lr: float,
    batch_size: int,
    sampling: str = "with_replacement",
    num_steps: int = 100,
    num_chains: int = 1000,
    seed: int = 0,
    init: str | Tensor = "gaussian",
    theta: Tensor | None = None,
    max_jacobian_entries: int = DEFAULT_MAX_JACOBIAN_ENTRIES,
    max_gram_entries: int = DEFAULT_MAX_GRAM_ENTRIES,
    spectrum: GramSpectrum | None = None,
) -> SimulationResult:
    """Run ``num_chains`` independent chains of linearised SGD at ``theta`` (SPEC.md section 3), batched.

    In sample space, with u = J delta and H_batch = (1/B) sum_b J_{i_b}^T J_{i_b},
    u_{t+1} = u_t - (eta/B) sum_b K[:, block i_b] u_t[block i_b] (a sample drawn twice with
    replacement counts twice). Batches come from a generator seeded with ``seed`` (on the CPU,
    so a seed gives the same batches on every device).

    init: "gaussian" starts every chain at an independent u_0 = J delta_0 with delta_0 ~ N(0, I_p),
        i.e. u_0 ~ N(0, K); a tensor of shape (nC,) or (num_chains, nC) gives u_0 itself (a
        parameter-space delta_0 maps to it by ``operators.ntk(problem).jacobian``).

    spectrum: K's spectrum at ``theta`` (``sample_space.build_gram_spectrum``), e.g. the one a
        ``stability`` call at the same point used; K is then not rebuilt. Only its shape is checked.

    Non-finite data or parameters raise ``DataError`` first (``Problem.check_finite``).
    """
    problem.require_square_loss("linearised SGD")
    n, outputs = problem.num_samples, problem.num_outputs
    lr, batch_size = check_sgd_arguments(n, lr, batch_size, sampling)
    lr, batch_size = float(lr), int(batch_size)
    if num_steps < 1 or num_chains < 2:
        raise InputError(f"need num_steps >= 1 and num_chains >= 2, got {num_steps} and {num_chains}")
    theta = (problem.parameters() if theta is None else theta).detach()
    problem.check_finite(theta)
    if not isinstance(init, Tensor) and init != "gaussian":
        raise InputError(f'init must be "gaussian" or a tensor of residuals, got {init!r}')
    if spectrum is not None:
        check_spectrum_matches(spectrum, problem)
        gram = spectrum.gram
    elif isinstance(init, Tensor):  # no spectrum needed: skip the eigendecomposition
        gram = gram_matrix(problem, theta, max_jacobian_entries, max_gram_entries).to(torch.float64)
    else:
        spectrum = build_gram_spectrum(
            problem, theta, max_jacobian_entries=max_jacobian_entries, max_gram_entries=max_gram_entries
        )
        gram = spectrum.gram
    generator = torch.Generator().manual_seed(seed)
    if isinstance(init, Tensor):
        if init.shape not in ((n * outputs,), (num_chains, n * outputs)):
            raise InputError(
                f"init must have shape ({n * outputs},) or ({num_chains}, {n * outputs}), got {tuple(init.shape)}"
            )
        if not bool(torch.isfinite(init).all()):
            raise DataError("init holds NaN or inf: give finite starting residuals")
        residuals = init.to(device=gram.device, dtype=torch.float64).expand(num_chains, n * outputs).clone()
    else:
        assert spectrum is not None
        draws = torch.randn(num_chains, spectrum.rank, generator=generator, dtype=torch.float64).to(
            gram.device
        )
        residuals = (draws * spectrum.values.sqrt()) @ spectrum.vectors.T
    losses = torch.empty(num_steps + 1, num_chains, dtype=torch.float64)
    losses[0] = residuals.pow(2).sum(dim=1).cpu() / (2 * n)
    for step in range(1, num_steps + 1):
        weights = _batch_weights(num_chains, n, batch_size, sampling, generator).to(gram.device)
        residuals = residuals - lr * (weights.repeat_interleave(outputs, dim=1) * residuals) @ gram
        losses[step] = residuals.pow(2).sum(dim=1).cpu() / (2 * n)
    mean = losses.mean(dim=1)
    half = num_steps // 2
    return SimulationResult(
        loss_mean=mean,
        loss_stderr=losses.std(dim=1) / math.sqrt(num_chains),
        growth_factor=(mean[-1] / mean[half]).item() ** (1 / (num_steps - half)),
        lr=lr,
        batch_size=batch_size,
        sampling=sampling,
        num_chains=num_chains,
    )
