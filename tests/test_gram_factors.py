"""K from per-layer factors (``gram_factors``) against the dense Jacobian Gram J J^T of torch.func.

Every model is float64; each test also checks which layers were factored, so that a fallback
cannot pass for the factored path (or a wrongly factored layer for a correct fallback).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reference import assert_matches, dense_gram
from sgdstab import Problem
from sgdstab.gram_factors import factorable_linear_layers
from sgdstab.sample_space import gram_matrix


def _problem(
    model: nn.Module, input_shape: tuple[int, ...], n: int = 7, chunk_size: int = 4, **kwargs
) -> Problem:
    model = model.double()
    inputs = torch.randn(n, *input_shape, dtype=torch.float64)
    with torch.no_grad():
        targets = torch.randn_like(model(inputs))
    return Problem(model, inputs, targets, chunk_size=chunk_size, **kwargs)


def _factored(problem: Problem) -> list[str]:
    sample = next(iter(problem.chunks()))[0][:1]
    return [layer.name for layer in factorable_linear_layers(problem, problem.parameters(), sample)]


def _assert_gram_is_dense(problem: Problem, max_jacobian_entries: int = 2**27) -> None:
    gram = gram_matrix(problem, max_jacobian_entries=max_jacobian_entries)
    assert_matches(gram, dense_gram(problem), rtol=1e-12, atol=1e-12)
    assert torch.equal(gram, gram.T)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("num_outputs", [1, 3])
def test_mlp_layers_are_all_factored_and_give_the_dense_gram(bias, activation, num_outputs):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6, bias=bias),
        activation(),
        nn.Linear(6, 4, bias=bias),
        activation(),
        nn.Linear(4, num_outputs, bias=bias),
    )
    problem = _problem(model, (5,))
    assert _factored(problem) == ["0", "2", "4"]
    _assert_gram_is_dense(problem)


def test_panels_across_chunks_match_with_many_samples():
    # n = 1100 > one 512-sample panel of factors: blocks straddle panels and the chunks of 300.
    torch.manual_seed(1)
    problem = _problem(
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), (3,), n=1100, chunk_size=300
    )
    gram = gram_matrix(problem)
    assert_matches(gram, gram_matrix(problem, factor_layers=False), rtol=1e-11, atol=1e-12)
    assert torch.equal(gram, gram.T)


class _ConvThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("max_jacobian_entries", [2**27, 60])
def test_a_conv_layer_falls_back_to_per_sample_jacobians_next_to_a_factored_linear(max_jacobian_entries):
    torch.manual_seed(2)
    problem = _problem(_ConvThenLinear(), (1, 5, 5))
    assert _factored(problem) == ["head"]
    _assert_gram_is_dense(problem, max_jacobian_entries)


class _Tied(nn.Module):
    """An autoencoder-like net whose two Linear layers share one weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(4, 4)
        self.decode = nn.Linear(4, 4)
        self.decode.weight = self.encode.weight
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.decode(torch.tanh(self.encode(x)))))


class _CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class _WeightUsedOutside(nn.Module):
    """The first layer's weight also enters the output directly (a penalty-like extra path)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.first(x))) + self.first.weight.sum() * x[:, :1]


class _FreeParameter(nn.Module):
    """A learnt output scale that belongs to no Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.scale * self.out(torch.tanh(self.first(x)))


class _Sequence(nn.Module):
    """A Linear applied position-wise to a (T, d) input: its Jacobian is a sum over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.mix(x)).mean(dim=1))


@pytest.mark.parametrize(
    ("model", "input_shape", "factored"),
    [
        (_Tied(), (4,), ["out"]),
        (_CalledTwice(), (3,), ["out"]),
        (_WeightUsedOutside(), (3,), ["out"]),
        (_FreeParameter(), (3,), ["first", "out"]),
        (_Sequence(), (5, 3), ["out"]),
    ],
    ids=["tied", "called-twice", "weight-used-outside", "free-parameter", "sequence"],
)
def test_layers_that_do_not_factor_fall_back_and_k_stays_exact(model, input_shape, factored):
    torch.manual_seed(3)
    problem = _problem(model, input_shape)
    assert _factored(problem) == factored
    _assert_gram_is_dense(problem)


@pytest.mark.parametrize("params", [["0.bias"], ["0.weight", "2"], ["2.weight"]])
def test_a_parameter_subset_takes_only_its_own_terms(params):
    # A layer with only its bias (or only its weight) in theta contributes only that term.
    torch.manual_seed(4)
    problem = _problem(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), (3,), params=params)
    assert _factored(problem) == sorted({name.split(".")[0] for name in params})
    _assert_gram_is_dense(problem)
