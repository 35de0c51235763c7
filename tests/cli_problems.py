"""Problems for `sgdstab measure/stability --problem cli_problems:<function>` in tests/test_cli.py."""

import torch
from torch import nn

import sgdstab


def tiny_problem() -> sgdstab.Problem:
    """A 2-8-1 tanh network fitted exactly to 6 points (a minimum), in float64."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    inputs = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        targets = model(inputs)  # interpolated by construction: every residual is zero
    return sgdstab.Problem(model, inputs, targets)


def not_a_problem():
    return 42


def needs_arg(x):
    return tiny_problem()


def exits():
    raise SystemExit(0)


def raises_value():
    raise ValueError("the user's own mistake")
