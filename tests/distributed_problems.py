"""The problem that tests/test_distributed.py measures in one process, on 2 gloo ranks and by the CLI."""

import torch
from torch import nn

import sgdstab

#: Not divisible by the 2 ranks of the tests, so the shards differ in size (19 and 18).
NUM_SAMPLES = 37
#: Several chunks per shard, one of them partial.
CHUNK_SIZE = 8


def model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 3-6-2 tanh network away from any minimum (nonzero gradient and residuals), float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(NUM_SAMPLES, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(NUM_SAMPLES, 2, generator=generator, dtype=torch.float64)
    return model, inputs, targets


def whole_problem() -> sgdstab.Problem:
    """Every sample in one Problem (``--problem distributed_problems:whole_problem`` for the CLI)."""
    return sgdstab.Problem(*model_and_data(), chunk_size=CHUNK_SIZE)
