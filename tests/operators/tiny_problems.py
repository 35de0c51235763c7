"""Tiny float64 problems whose dense curvature matrices torch.func can build exactly."""

import torch
from torch import nn

import sgdstab

NUM_SAMPLES = 7


def tiny_mlp(num_outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, num_outputs)).double()


def tiny_cnn(num_outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, num_outputs)
    ).double()


def make_problem(architecture: str, loss: str, chunk_size: int = 3) -> sgdstab.Problem:
    generator = torch.Generator().manual_seed(1)
    num_outputs = 3
    if architecture == "mlp":
        model, inputs = (
            tiny_mlp(num_outputs),
            torch.randn(NUM_SAMPLES, 3, generator=generator, dtype=torch.float64),
        )
    else:
        model, inputs = (
            tiny_cnn(num_outputs),
            torch.randn(NUM_SAMPLES, 1, 5, 5, generator=generator, dtype=torch.float64),
        )
    if loss == "mse":
        targets = torch.randn(NUM_SAMPLES, num_outputs, generator=generator, dtype=torch.float64)
    else:
        targets = torch.randint(0, num_outputs, (NUM_SAMPLES,), generator=generator)
    return sgdstab.Problem(model, inputs, targets, loss=loss, chunk_size=chunk_size)


def all_inputs_targets(problem: sgdstab.Problem):
    xs, ys = zip(*problem.chunks())
    return torch.cat(xs), torch.cat(ys)


def dense_loss(problem: sgdstab.Problem):
    """L(theta) written out directly from SPEC.md section 1, independent of Problem's chunking."""
    inputs, targets = all_inputs_targets(problem)

    def loss(theta):
        outputs = problem.forward(theta, inputs)
        if problem.loss_name == "mse":
            return 0.5 * ((outputs - targets) ** 2).sum() / len(inputs)
        return nn.functional.cross_entropy(outputs, targets)

    return loss
